"""Streaming a prepared token corpus larger than this process should hold: anonymous memory stays flat.

Writes a synthetic corpus (``--tokens`` uniform random ids, uint16, ``--shards`` shards, default 5e9 tokens =
10 GB) in the layout ``energyflow prepare`` writes (shards + ``meta.json``; the tokenizer entry is a
placeholder: ``TokenShards`` only reads ids), then draws ``--steps`` training batches (random order) and the
validation batches through ``TokenShards``, sampling the process's memory from /proc/self/status as it goes:
``RssAnon`` (the heap: what would exhaust memory) and ``RssFile`` (file pages mapped into the process; the shards
are read with positioned reads, so this should not grow either: the page cache that serves them is the
kernel's, not the process's). Reported: windows per second, and both at the start and at
the end. The corpus is deleted afterwards unless ``--keep``.

    python benchmarks/token_stream.py                     # 10 GB corpus in a temporary directory
    python benchmarks/token_stream.py --tokens 1e8        # 200 MB
Writes benchmarks/results/token_stream.json and .md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from energyflow import bench  # noqa: E402
from energyflow.data.tokens import FORMAT, META, TokenShards  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def memory() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, amount, _ = line.split()
                values[name.rstrip(":")] = int(amount) * 1024
    return values


def write_corpus(directory: Path, tokens: int, shards: int, vocab: int) -> None:
    generator = np.random.default_rng(0)
    per_shard, entries = tokens // shards, []
    block = 1 << 24
    for index in range(shards):
        name = f"train_{index:05d}.bin"
        with open(directory / name, "wb") as handle:
            for start in range(0, per_shard, block):
                generator.integers(0, vocab, min(block, per_shard - start), dtype=np.uint16).tofile(handle)
        entries.append({"name": name, "tokens": per_shard})
    validation = generator.integers(0, vocab, 1 << 20, dtype=np.uint16)
    validation.tofile(directory / "validation_00000.bin")
    meta = {"format": FORMAT, "settings": {"tokenizer_sha256": "synthetic", "source": "synthetic",
                                           "validation_fraction": 0.0, "shard_tokens": per_shard},
            "tokenizer": "synthetic", "vocab_size": vocab, "dtype": "uint16", "end_of_text": 0, "complete": True,
            "documents_consumed": 0, "shards": {"train": entries,
                                                "validation": [{"name": "validation_00000.bin",
                                                                "tokens": int(validation.size)}]},
            "documents": {"train": 0, "validation": 0}, "tokens": {"train": per_shard * shards,
                                                                  "validation": int(validation.size)}}
    (directory / META).write_text(json.dumps(meta))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=float, default=5e9)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=50277)
    parser.add_argument("--dir", type=Path, help="where to write the corpus (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="energyflow-tokens-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        write_corpus(directory, int(args.tokens), args.shards, args.vocab)
        written = time.perf_counter() - started
        start_memory = memory()
        data = TokenShards(directory, seq_len=args.seq_len)
        stream = data.train_stream(micro_batch=args.batch_size, seed=0)
        samples, started = [], time.perf_counter()
        checksum = 0
        for step in range(args.steps):
            (batch,) = stream.next_step()
            checksum += int(batch[:, 0].sum())
            if step % max(args.steps // 20, 1) == 0:
                samples.append({"step": step, **memory()})
        seconds = time.perf_counter() - started
        data.validation_batches(args.batch_size, 8)
        end_memory = memory()
        result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "corpus_bytes": int(args.tokens) * 2, "write_seconds": written,
                  "windows_per_second": args.steps * args.batch_size / seconds,
                  "tokens_per_second": args.steps * args.batch_size * args.seq_len / seconds,
                  "memory_start": start_memory, "memory_end": end_memory, "samples": samples,
                  "anon_growth_bytes": end_memory["RssAnon"] - start_memory["RssAnon"],
                  "torch": torch.__version__}
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    text = (f"# Streaming a {result['corpus_bytes'] / 1e9:.1f} GB token corpus\n\n"
            f"{args.steps} batches of {args.batch_size} x {args.seq_len + 1} tokens in random order over "
            f"{int(args.tokens):,} tokens in {args.shards} shards: {result['windows_per_second']:,.0f} windows/s "
            f"({result['tokens_per_second'] / 1e6:.1f}M tokens/s).\n\n"
            "| | RssAnon (heap) MiB | RssFile (mapped file pages) MiB |\n|---|---:|---:|\n"
            f"| after opening | {start_memory['RssAnon'] / 2**20:.0f} | {start_memory['RssFile'] / 2**20:.0f} |\n"
            f"| after streaming | {end_memory['RssAnon'] / 2**20:.0f} | {end_memory['RssFile'] / 2**20:.0f} |\n\n"
            f"Heap growth over the stream: {result['anon_growth_bytes'] / 2**20:.1f} MiB; mapped file pages: "
            f"{(end_memory['RssFile'] - start_memory['RssFile']) / 2**20:.1f} MiB.\n")
    bench.write(args.out, "token_stream", result, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
