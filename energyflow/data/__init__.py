"""Data: the ``DataSource`` contract the trainer sees (``energyflow.data.base``) and the data sets behind it,
one module per modality (``text``: offline byte-level corpora; ``vectors``: continuous examples; ``images``:
photographs bundled with scikit-image, sklearn's digits, image folders, Hugging Face image columns; ``video``:
procedurally generated clips and local ``.npy`` clips)."""
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
from energyflow.data.images import ImageData, digits_images, hf_images, image_folder, photo_patches
from energyflow.data.vectors import VectorData, gaussian_data
from energyflow.data.video import VideoData, bouncing_shapes, moving_digits, npy_clips

__all__ = ["Batch", "BatchStream", "DataSource", "ImageData", "TextData", "digits_images", "hf_images", "image_folder",
           "photo_patches", "TrainStream", "VOCAB_SIZE", "VectorData", "fixed_batches",
           "gaussian_data", "hf_corpus", "pack", "pydoc_corpus", "split_bytes", "text_data", "text_files", "to_batch",
           "VideoData", "bouncing_shapes", "moving_digits", "npy_clips"]
