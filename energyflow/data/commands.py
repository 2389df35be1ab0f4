"""The ``tokenizer`` and ``prepare`` subcommands of ``energyflow`` (their parsers are in ``energyflow.cli``).

    energyflow tokenizer train corpus/*.txt --vocab-size 8192 --out tok.json
    energyflow prepare corpus/*.txt --tokenizer tok.json --out data/corpus
    energyflow prepare docs.jsonl --field text --tokenizer neox/tokenizer.json --out data/docs
    energyflow prepare hf:json --data-files web.jsonl --field text --tokenizer tok.json --out data/web
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from energyflow.config import RecipeError
from energyflow.data import tokens


def run_tokenizer_train(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    path = tokens.train_tokenizer(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    tokenizer = tokens.load_tokenizer(path)
    console.print(f"byte-level BPE of {tokenizer.get_vocab_size(with_added_tokens=True)} tokens (special: "
                  f"{tokens.END_OF_TEXT}) from {len(args.files)} file(s) in {time.perf_counter() - started:.1f} s "
                  f"-> {path}")
    return 0


def _documents(args: argparse.Namespace):
    sources = list(args.source)
    if sources[0].startswith("hf:"):
        if len(sources) > 1:
            raise RecipeError("give one hf:DATASET source at a time")
        name = sources[0][3:]
        return (lambda: tokens.hf_documents(name, split=args.split, field=args.field, name=args.config,
                                            data_files=args.data_files or None)), f"hf:{name}:{args.split}"
    missing = [s for s in sources if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"prepare: no such file(s) {missing}; give text files, JSONL files, or hf:DATASET")
    kind = args.format
    if kind == "auto":
        kind = "jsonl" if all(s.endswith((".jsonl", ".json")) for s in sources) else "text"
    if kind == "jsonl":
        return (lambda: tokens.jsonl_documents(sources, args.field)), f"jsonl:{','.join(sources)}:{args.field}"
    return (lambda: tokens.text_file_documents(sources)), f"text:{','.join(sources)}"


def run_prepare(args: argparse.Namespace, console: Console) -> int:
    documents, source = _documents(args)
    tokens.load_tokenizer(args.tokenizer)  # a bad tokenizer is refused before the progress display starts
    started = time.perf_counter()
    columns = (TextColumn("[bold]prepare"), BarColumn(pulse_style="cyan"), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=args.no_progress) as progress:
        task = progress.add_task("prepare", total=None, status="")

        def report(done: int, count: int, size: int) -> None:
            progress.update(task, status=f"{done:,} documents, {count:,} tokens, "
                            f"{tokens.throughput(started, count, size)}")

        meta = tokens.prepare_corpus(documents, args.tokenizer, args.out, source=source,
                                     validation_fraction=args.validation_fraction, shard_tokens=args.shard_tokens,
                                     progress=report)
    console.print(f"{args.out}: {meta['tokens']['train']:,} training tokens in {len(meta['shards']['train'])} "
                  f"shard(s) and {meta['tokens']['validation']:,} validation tokens ({meta['documents']['train']:,} "
                  f"and {meta['documents']['validation']:,} documents), {meta['dtype']}, vocabulary "
                  f"{meta['vocab_size']:,}; {time.perf_counter() - started:.1f} s")
    return 0
