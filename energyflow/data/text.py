"""Offline byte-level text data: corpora, a deterministic split, packing, and the text ``DataSource``.

Every corpus is read as raw UTF-8 bytes (vocabulary 256), so no tokenizer is needed and a fresh install
trains with no network. The default corpus is ``pydoc_data.topics``, the help texts that ship with the
Python interpreter (~460 KB of English).

A batch is a dict ``{"tokens": [B, S] int64, "targets": [B, S] int64}``: ``targets`` are ``tokens`` shifted
by one byte, cut from one packed window of ``S + 1`` bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from energyflow.data.base import Batch, BatchStream, fixed_batches

VOCAB_SIZE = 256


def pydoc_corpus() -> bytes:
    """The Python help topics joined in sorted-key order (deterministic across runs and machines)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics)).encode("utf-8")


def text_files(paths: Sequence[Union[str, Path]], *, encoding: str = "utf-8") -> bytes:
    """Local text files concatenated in the given order, separated by a blank line."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ValueError("text_files needs at least one path")
    missing = [str(path) for path in paths if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"text_files: no such file(s): {missing}; pass paths to existing text files")
    texts = [Path(path).read_text(encoding=encoding) for path in paths]
    return "\n\n".join(texts).encode("utf-8")


def hf_corpus(path: str, *, split: str = "train", text_field: str = "text",
              data_files: Optional[Union[str, Sequence[str]]] = None, cache_dir: Optional[str] = None) -> bytes:
    """A Hugging Face ``datasets`` split, its ``text_field`` column joined by blank lines (extra ``hf``).

    ``path`` is a hub name or a builder such as ``"text"``/``"json"`` with local ``data_files``.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf_corpus needs the optional extra: pip install 'energyflow[hf]'") from error
    dataset = datasets.load_dataset(path, split=split, data_files=data_files, cache_dir=cache_dir)
    if text_field not in dataset.column_names:
        raise ValueError(f"hf_corpus: dataset {path!r} has no column {text_field!r}; "
                         f"set text_field to one of {dataset.column_names}")
    return "\n\n".join(dataset[text_field]).encode("utf-8")


def split_bytes(data: bytes, validation_fraction: float) -> tuple[Tensor, Tensor]:
    """Deterministic split: the last ``validation_fraction`` of the bytes is validation (uint8 tensors).

    A contiguous tail (not a random sample of windows) so no training window overlaps a validation one.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    array = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    cut = int(round(len(array) * (1.0 - validation_fraction)))
    return array[:cut].clone(), array[cut:].clone()


def pack(data: Tensor, seq_len: int) -> Tensor:
    """Cut a byte stream ``[N]`` into windows ``[W, seq_len + 1]`` with stride ``seq_len``.

    Consecutive windows share one byte, so every byte after the first is a target exactly once.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    num_windows = (len(data) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"{len(data)} bytes cannot fill one window of seq_len + 1 = {seq_len + 1} bytes; "
                         "use a shorter seq_len or a larger corpus")
    return data[: num_windows * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def to_batch(windows: Tensor, device: Union[str, torch.device] = "cpu") -> Batch:
    """Windows ``[B, S+1]`` uint8 -> ``{"tokens": [B, S], "targets": [B, S]}`` int64 on ``device``."""
    windows = windows.to(device=device, dtype=torch.long)
    return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}


@dataclass
class TextData:
    """A corpus split and packed: ``train`` ``[W, S+1]`` and ``validation`` ``[V, S+1]`` uint8 windows; a
    ``DataSource``."""

    train: Tensor
    validation: Tensor
    seq_len: int
    vocab_size: int = VOCAB_SIZE

    def train_stream(self, *, micro_batch: int, accumulation_steps: int = 1, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> BatchStream:
        """The ``DataSource`` training stream over the training windows."""
        return BatchStream(self.train, micro_batch=micro_batch, accumulation_steps=accumulation_steps, seed=seed,
                           rank=rank, world_size=world_size)

    def to_batch(self, raw: Tensor, device: Union[str, torch.device] = "cpu") -> Batch:
        """Windows ``[B, S+1]`` -> the text batch on ``device`` (``to_batch``)."""
        return to_batch(raw, device)

    def validation_batches(self, batch_size: int, max_batches: Optional[int] = None) -> list[Tensor]:
        """Validation windows in order, in full batches of ``batch_size``, at most ``max_batches``."""
        return fixed_batches(self.validation, batch_size, max_batches)


def text_data(corpus: Optional[bytes] = None, *, seq_len: int = 256, validation_fraction: float = 0.05) -> TextData:
    """Split ``corpus`` (default: ``pydoc_corpus()``) and pack both parts into ``seq_len + 1`` windows."""
    corpus = pydoc_corpus() if corpus is None else corpus
    train, validation = split_bytes(corpus, validation_fraction)
    return TextData(train=pack(train, seq_len), validation=pack(validation, seq_len), seq_len=seq_len)
