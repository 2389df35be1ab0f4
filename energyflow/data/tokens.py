"""Text at scale: tokenizers, pre-tokenized corpora in flat (memory-mappable) shards, and the ``DataSource`` over them.

Tokenizers are Hugging Face ``tokenizers`` files (the ``hf`` extra): any ``tokenizer.json`` a user has (e.g.
GPT-NeoX's, 50,277 tokens with its special tokens), or a byte-level BPE trained here on local text
(``train_tokenizer``; ``energyflow tokenizer train``). Nothing is downloaded.

``prepare_corpus`` (``energyflow prepare``) tokenizes documents -- local text files (split into documents at
blank lines), one field of a JSONL file, or a Hugging Face dataset read in streaming mode -- into shards of
raw tokens, ``train_00000.bin``, ``validation_00000.bin``, ... (``uint16`` when the vocabulary fits, else
``uint32``), each document followed by the tokenizer's end-of-text token, plus ``meta.json`` (the tokenizer's
SHA-256 and vocabulary size, the dtype, every shard's token count, document and token counts per split). A
document goes to the validation split iff the SHA-256 of its text falls in the first ``validation_fraction``
of the hash range: deterministic, independent of order and of the number of documents. Shards are written
atomically at document boundaries and ``meta.json`` records the documents consumed after each one, so a killed
``prepare`` resumes where its last shard ended and writes the same shards as an uninterrupted run.

``token_shards`` (``TokenShards``) serves windows of ``S + 1`` tokens at stride ``S`` over each split's
concatenated shards, each window read with a positioned read from shards opened on first use, so a corpus
larger than memory trains with flat RSS (neither heap nor mapped pages grow; ``benchmarks/token_stream.py``). Training order is ``"random"`` (an affine permutation of the window indices per epoch,
``i -> (a i + b) mod W`` with ``a`` coprime to ``W``, drawn from the seed and the epoch: no index array is
materialized) or ``"sequential"``; the stream is rank-sharded and resumable bit for bit exactly like the byte
corpus's (``energyflow.data.base.BatchStream``: its position is the whole state).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from energyflow.data.base import Batch, BatchStream

META = "meta.json"
FORMAT = "energyflow-tokens-v1"
SPLITS = ("train", "validation")
END_OF_TEXT = "<|endoftext|>"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise ImportError("tokenizers are the optional extra: pip install 'energyflow[hf]'") from error
    return tokenizers


def file_sha256(path: Union[str, Path]) -> str:
    from energyflow.checkpoint import file_digest

    return file_digest(path)


def load_tokenizer(path: Union[str, Path]):
    """A ``tokenizers.Tokenizer`` from a ``tokenizer.json`` on disk (a clear error for a missing or foreign file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}; give a tokenizer.json (e.g. one trained with "
                                "`energyflow tokenizer train`)")
    try:
        return _tokenizers().Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises its own exception type for malformed JSON
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({str(error).splitlines()[0]}); give the "
                         "file a tokenizer was saved to") from error


def end_of_text_id(tokenizer) -> int:
    """The id of the document separator: ``<|endoftext|>`` if the tokenizer has it, else its last special token."""
    token = tokenizer.token_to_id(END_OF_TEXT)
    if token is not None:
        return token
    special = [t for t, added in tokenizer.get_added_tokens_decoder().items() if added.special]
    if not special:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT!r} and no special token to separate documents; "
                         f"train one with `energyflow tokenizer train` (it adds {END_OF_TEXT!r})")
    return max(special)


def train_tokenizer(files: Sequence[Union[str, Path]], vocab_size: int, out: Union[str, Path], *,
                    min_frequency: int = 2) -> Path:
    """Train a byte-level BPE (every byte is in its alphabet, so any text encodes) on local text ``files`` and
    save it to ``out``; ``<|endoftext|>`` is its one special token. Deterministic for the same files."""
    tokenizers = _tokenizers()
    files = [Path(f) for f in files]
    missing = [str(f) for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"tokenizer train needs existing text files; missing: {missing or 'none given'}")
    if not isinstance(vocab_size, int) or vocab_size < 257:
        raise ValueError(f"--vocab-size must be an integer >= 257 (the 256 bytes and {END_OF_TEXT}), got {vocab_size}")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[END_OF_TEXT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train([str(f) for f in files], trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


# --- documents --------------------------------------------------------------------------------------------------

def text_file_documents(paths: Sequence[Union[str, Path]]) -> Iterator[str]:
    """Documents of local text files: each file split at blank lines (runs of empty lines), empty pieces dropped."""
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such text file: {path}")
        text = path.read_text(encoding="utf-8")
        for piece in text.replace("\r\n", "\n").split("\n\n"):
            if piece.strip():
                yield piece.strip("\n")


def jsonl_records(path: Union[str, Path]) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-empty line of a JSONL file; a line that is not a JSON object is an
    error naming the file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def jsonl_documents(paths: Sequence[Union[str, Path]], field: str = "text") -> Iterator[str]:
    """The ``field`` of every line of JSONL files (a line without it is an error naming the file and line)."""
    for path in paths:
        for number, record in jsonl_records(path):
            if field not in record:
                raise ValueError(f"{path}, line {number}: no field {field!r} (fields: {sorted(record)}); "
                                 "choose it with --field")
            yield str(record[field])


def hf_documents(path: str, *, split: str = "train", field: str = "text", name: Optional[str] = None,
                 data_files: Optional[Union[str, Sequence[str]]] = None) -> Iterator[str]:
    """A Hugging Face dataset's ``field``, read in streaming mode (nothing is cached whole)."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("Hugging Face datasets are the optional extra: pip install 'energyflow[hf]'") from error
    dataset = datasets.load_dataset(path, name=name, split=split, data_files=data_files, streaming=True)
    for record in dataset:
        if field not in record:
            raise ValueError(f"dataset {path!r} has no field {field!r} (fields: {sorted(record)}); choose --field")
        yield str(record[field])


def in_validation(document: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split: its SHA-256 in the first ``fraction`` of the range."""
    head = int.from_bytes(hashlib.sha256(document.encode("utf-8")).digest()[:8], "big")
    return head < fraction * 2 ** 64


# --- prepare ----------------------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2 ** 16 else np.dtype(np.uint32)


def _write_meta(out: Path, meta: dict) -> None:
    temporary = out / (META + ".tmp")
    temporary.write_text(json.dumps(meta, indent=1))
    os.replace(temporary, out / META)


def read_meta(directory: Union[str, Path]) -> dict:
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a prepared corpus (no {META}); make one with `energyflow "
                                "prepare SOURCE --tokenizer tok.json --out DIR`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an energyflow token corpus (expected format {FORMAT!r})")
    return meta


@dataclass
class _Split:
    buffer: list = field(default_factory=list)
    buffered: int = 0


def prepare_corpus(documents: Callable[[], Iterator[str]], tokenizer_path: Union[str, Path], out: Union[str, Path],
                   *, source: str, validation_fraction: float = 0.01, shard_tokens: int = 1 << 24,
                   batch_documents: int = 256, progress: Optional[Callable[[int, int, int], None]] = None) -> dict:
    """Tokenize ``documents()`` (an iterable factory: rerunnable from the start) into ``out``; see the module
    docstring. ``progress(documents, tokens, bytes)`` is called after every batch of documents. Returns the
    finished ``meta.json`` content. A rerun into a finished corpus returns its metadata; a rerun after a crash
    resumes; a different tokenizer or source is refused."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = Path(out)
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    eot = end_of_text_id(tokenizer)
    dtype = token_dtype(vocab_size)
    digest = file_sha256(tokenizer_path)
    settings = {"tokenizer_sha256": digest, "source": source, "validation_fraction": validation_fraction,
                "shard_tokens": shard_tokens}
    if (out / META).is_file():
        meta = read_meta(out)
        differ = {k: (meta["settings"].get(k), v) for k, v in settings.items() if meta["settings"].get(k) != v}
        if differ:
            raise ValueError(f"{out} holds a corpus prepared with other settings ({differ}); choose a new --out")
        if meta["complete"]:
            return meta
    else:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "settings": settings, "tokenizer": str(tokenizer_path), "vocab_size": vocab_size,
                "dtype": dtype.name, "end_of_text": eot, "complete": False, "documents_consumed": 0,
                "shards": {s: [] for s in SPLITS}, "documents": {s: 0 for s in SPLITS},
                "tokens": {s: 0 for s in SPLITS}}
        _write_meta(out, meta)
    skip = meta["documents_consumed"]
    for split in SPLITS:  # a shard a crash left half-written under its temporary name is dropped
        for stray in out.glob(f"{split}_*.bin.tmp"):
            stray.unlink()
    pending = {s: _Split() for s in SPLITS}
    counts = {s: 0 for s in SPLITS}  # documents in the pending buffers
    consumed, tokens_done, bytes_done = skip, 0, 0

    def flush(split: str, force: bool = False) -> None:
        part = pending[split]
        if not part.buffered or (part.buffered < shard_tokens and not force):
            return
        name = f"{split}_{len(meta['shards'][split]):05d}.bin"
        array = np.concatenate(part.buffer).astype(dtype, copy=False)
        temporary = out / (name + ".tmp")
        with open(temporary, "wb") as handle:
            array.tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, out / name)
        meta["shards"][split].append({"name": name, "tokens": int(array.size)})
        meta["tokens"][split] += int(array.size)
        meta["documents"][split] += counts[split]
        counts[split], part.buffer, part.buffered = 0, [], 0

    iterator = iter(documents())
    for _ in range(skip):  # resume: the documents already in written shards
        if next(iterator, None) is None:
            raise ValueError(f"{out} records {skip} documents consumed but the source now has fewer; it changed "
                             "since the corpus was started: choose a new --out")
    while True:
        batch = [doc for _, doc in zip(range(batch_documents), iterator)]
        if not batch:
            break
        encoded = tokenizer.encode_batch(batch)
        for text, encoding in zip(batch, encoded):
            split = "validation" if in_validation(text, validation_fraction) else "train"
            ids = np.asarray(encoding.ids + [eot], dtype=np.int64)
            pending[split].buffer.append(ids)
            pending[split].buffered += ids.size
            counts[split] += 1
            tokens_done += ids.size
            bytes_done += len(text.encode("utf-8"))
        consumed += len(batch)
        if any(pending[split].buffered >= shard_tokens for split in SPLITS):
            # both splits at once: afterwards every document before ``consumed`` is in a written shard, which
            # is what a resumed run skips (and so writes the same shards as an uninterrupted one)
            for split in SPLITS:
                flush(split, force=True)
            meta["documents_consumed"] = consumed
            _write_meta(out, meta)
        if progress is not None:
            progress(consumed, tokens_done, bytes_done)
    for split in SPLITS:
        flush(split, force=True)
    meta["documents_consumed"] = consumed
    if meta["tokens"]["train"] == 0:
        raise ValueError(f"no training tokens: the source gave {consumed} document(s), all in the validation split "
                         "or empty; give more text or a smaller validation_fraction")
    meta["complete"] = True
    _write_meta(out, meta)
    return meta


# --- the DataSource ---------------------------------------------------------------------------------------------

class ShardWindows:
    """Windows ``[S + 1]`` at stride ``S`` over one split's concatenated shards. Indexing with a ``LongTensor`` of
    window indices gives ``[n, S + 1]`` int64 tokens. Each shard is opened on first use and read with positioned
    reads (``os.pread``) of just the window's bytes: neither the heap nor the process's mapped pages grow with
    the corpus (a memory map would map tens of kilobytes of neighbours per random window; see
    ``benchmarks/token_stream.py``). The shards stay plain arrays a user can ``numpy.memmap``."""

    def __init__(self, directory: Path, shards: Sequence[dict], dtype: str, seq_len: int) -> None:
        self.directory, self.dtype, self.seq_len = directory, np.dtype(dtype), seq_len
        self.names = [s["name"] for s in shards]
        self.starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self.total = int(self.starts[-1])
        self._files: dict[int, int] = {}
        self.count = max((self.total - 1) // seq_len, 0)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:  # file descriptors do not travel (e.g. to a DataLoader worker)
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for descriptor in getattr(self, "_files", {}).values():
            try:
                os.close(descriptor)
            except OSError:
                pass

    def _read(self, index: int, offset: int, count: int) -> np.ndarray:
        if index not in self._files:
            self._files[index] = os.open(self.directory / self.names[index], os.O_RDONLY)
        size = self.dtype.itemsize
        data = os.pread(self._files[index], count * size, offset * size)
        if len(data) != count * size:
            raise ValueError(f"{self.directory / self.names[index]} is shorter than meta.json records; the corpus "
                             "is damaged: prepare it again into a new --out")
        return np.frombuffer(data, dtype=self.dtype)

    def tokens(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the split, across shard boundaries."""
        pieces, position, end = [], start, start + length
        shard = int(np.searchsorted(self.starts, position, side="right") - 1)
        while position < end:
            offset = position - int(self.starts[shard])
            take = min(end - position, int(self.starts[shard + 1]) - position)
            pieces.append(self._read(shard, offset, take).astype(np.int64))
            position += take
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def __getitem__(self, indices) -> Tensor:
        indices = torch.as_tensor(indices).reshape(-1).tolist()
        rows = [self.tokens(i * self.seq_len, self.seq_len + 1) for i in indices]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.seq_len + 1, dtype=torch.long)


class ShardStream(BatchStream):
    """``BatchStream`` over ``ShardWindows`` with a permutation that is never materialized (``order="random"``:
    affine per epoch) or none (``"sequential"``)."""

    def __init__(self, windows: ShardWindows, *, order: str, **kwargs) -> None:
        super().__init__(windows, **kwargs)
        self.order = order
        self._affine: dict[int, tuple[int, int]] = {}

    def _permutation(self, epoch: int) -> tuple[int, int]:
        if epoch not in self._affine:
            size = len(self.windows)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            while True:
                a = int(torch.randint(1, max(size, 2), (1,), generator=generator)) if size > 1 else 1
                if math.gcd(a, size) == 1:
                    break
            b = int(torch.randint(0, size, (1,), generator=generator))
            self._affine = {epoch: (a, b)}  # one epoch at a time: nothing accumulates
        return self._affine[epoch]

    def _indices(self, start: int, count: int) -> Tensor:
        size, out = len(self.windows), []
        for position in range(start, start + count):
            epoch, index = divmod(position, size)
            if self.order == "random":
                a, b = self._permutation(epoch)
                index = (a * index + b) % size
            out.append(index)
        return torch.tensor(out, dtype=torch.long)


class TokenShards:
    """A prepared corpus (``prepare_corpus``) as a ``DataSource`` of ``seq_len + 1``-token windows."""

    def __init__(self, directory: Union[str, Path], *, seq_len: int = 256, order: str = "random") -> None:
        if order not in ("random", "sequential"):
            raise ValueError(f"order must be 'random' or 'sequential', got {order!r}")
        self.directory = Path(directory)
        meta = read_meta(self.directory)
        if not meta["complete"]:
            raise ValueError(f"{self.directory} is not finished (prepare was interrupted); rerun the same "
                             "`energyflow prepare` command to complete it")
        self.meta, self.seq_len, self.order = meta, seq_len, order
        self.vocab_size = int(meta["vocab_size"])
        self.train = ShardWindows(self.directory, meta["shards"]["train"], meta["dtype"], seq_len)
        self.validation = ShardWindows(self.directory, meta["shards"]["validation"], meta["dtype"], seq_len)
        if len(self.train) < 1:
            raise ValueError(f"{self.directory}: {self.train.total} training tokens cannot fill one window of "
                             f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or a larger corpus")

    def train_stream(self, *, micro_batch: int, accumulation_steps: int = 1, seed: int = 0, rank: int = 0,
                     world_size: int = 1) -> ShardStream:
        return ShardStream(self.train, order=self.order, micro_batch=micro_batch,
                           accumulation_steps=accumulation_steps, seed=seed, rank=rank, world_size=world_size)

    def validation_batches(self, batch_size: int, max_batches: Optional[int] = None) -> list[Tensor]:
        """Validation windows in order, in full batches of ``batch_size``, at most ``max_batches``."""
        available = len(self.validation) // batch_size
        if available < 1:
            raise ValueError(f"{self.directory}: {len(self.validation)} validation windows cannot fill one batch of "
                             f"{batch_size}; prepare with a larger validation_fraction or use a smaller batch")
        count = available if max_batches is None else min(available, max_batches)
        return [self.validation[torch.arange(i * batch_size, (i + 1) * batch_size)] for i in range(count)]

    def to_batch(self, raw: Tensor, device: Union[str, torch.device] = "cpu") -> Batch:
        windows = raw.to(device=device, dtype=torch.long)
        return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}


def token_shards(directory: str, *, seq_len: int = 256, order: str = "random") -> TokenShards:
    """Gin entry point: a prepared corpus directory as the run's data."""
    return TokenShards(directory, seq_len=seq_len, order=order)


def tokenizer_vocab_size(path: str) -> int:
    """Gin entry point: the vocabulary size of a tokenizer file (special tokens included), for
    ``VOCAB_SIZE = @tokenizer_vocab_size()`` -- the one binding the models read."""
    return int(load_tokenizer(path).get_vocab_size(with_added_tokens=True))


def corpus_vocab_size(directory: str) -> int:
    """Gin entry point: the vocabulary size a prepared corpus was tokenized with."""
    return int(read_meta(directory)["vocab_size"])


def throughput(started: float, tokens: int, size: int) -> str:
    seconds = max(time.perf_counter() - started, 1e-9)
    return f"{tokens / seconds:,.0f} tokens/s, {size / seconds / 1e6:.2f} MB/s"
