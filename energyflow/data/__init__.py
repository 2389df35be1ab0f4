"""Data: the ``DataSource`` contract the trainer sees (``energyflow.data.base``) and the data sets behind it,
one module per modality (``text``: offline byte-level corpora; ``vectors``: continuous examples)."""
from __future__ import annotations

from energyflow.data.base import Batch, BatchStream, DataSource, TrainStream, fixed_batches
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
from energyflow.data.vectors import VectorData, gaussian_data

__all__ = ["Batch", "BatchStream", "DataSource", "TextData", "TrainStream", "VOCAB_SIZE", "VectorData", "fixed_batches",
           "gaussian_data", "hf_corpus", "pack", "pydoc_corpus", "split_bytes", "text_data", "text_files", "to_batch"]
