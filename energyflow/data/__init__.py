"""Data: the ``DataSource`` contract the trainer sees (``energyflow.data.base``) and the data sets behind it,
one module per modality (``text``: offline byte-level corpora)."""
from __future__ import annotations

from energyflow.data.base import Batch, BatchStream, DataSource, TrainStream
from energyflow.data.text import (
    VOCAB_SIZE,
    TextData,
    hf_corpus,
    pack,
    pydoc_corpus,
    split_bytes,
    text_data,
    text_files,
    to_batch,
)

__all__ = ["Batch", "BatchStream", "DataSource", "TextData", "TrainStream", "VOCAB_SIZE", "hf_corpus", "pack",
           "pydoc_corpus", "split_bytes", "text_data", "text_files", "to_batch"]
