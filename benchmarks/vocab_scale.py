"""The training step against the vocabulary size, before and after the memory work, and ``prepare`` throughput.

Step: the EBT (System 1, 2 descent steps, xxs) and the Transformer++ at V = 256, 4096 and 50,277 (the paper's
GPT-NeoX vocabulary), seconds and peak memory side by side. The EBT's state is ``[B, S, V]`` and its
second-order graph keeps several such tensors per descent step, so at V ~ 50k memory, not compute, decides what
fits. Variants, per vocabulary size:
- ``transformer_pp``: the Transformer++ (fused attention: all a first-order step needs);
- ``ebt_before``: the EBT with its candidate map ``softmax(y) @ E`` left to autograd (what it was before: the
  probabilities, ``dE/dp`` and the softmax's backward inputs saved per step, the softmax's second-order backward
  run on whole ``[B, S, V]`` tensors); the loss at each step is already ``CrossEntropy``'s fused form;
- ``ebt``: the candidate map as ``energyflow.models.text.softmax_embedding`` (only the logits saved; the
  probabilities recomputed in the backward, chunked over positions): how the EBT trains from
  ``RECOMPUTE_FROM_VOCAB`` = 4096 classes on, and forced on at V = 256 here for the comparison (the default there
  is ``ebt_before``).
Seconds: the median over ``--rounds`` steps, the variants of one vocabulary size interleaved round by round.
Peak memory: the growth of peak RSS over two optimizer steps, each variant in a fresh subprocess (set-up
allocations excluded). Tokens are uniform random ids (speed and memory do not depend on the text). At the largest
V the EBT and the Transformer++ are also measured at half the batch: the difference is the memory per token of
batch x sequence (parameters and optimizer state, the same at both batches, cancel), from which the
``batch x sequence`` that fits per GB follows.

Prepare: ``energyflow prepare``'s function (``energyflow.data.tokens.prepare_corpus``) on the ``pydoc_data``
corpus repeated ``--prepare-repeats`` times, with a byte-level BPE trained by ``train_tokenizer`` on that corpus
(``--prepare-vocab``); tokens/s and MB/s of text, median of ``--prepare-rounds`` fresh runs.

    python benchmarks/vocab_scale.py                      # xxs, sequence 256, batch 4, 1 thread (~25 min)
Writes benchmarks/results/vocab_scale.json and .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import train_step  # noqa: E402  (benchmarks/ is this script's directory, first on sys.path)
from energyflow import bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("transformer_pp", "ebt_before", "ebt")
VOCABULARIES = (256, 4096, 50277)


def build(variant: str, size: str, seq_len: int, vocab: int):
    task = train_step.build_task("transformer_pp_fused" if variant == "transformer_pp" else "ebt_cached", size,
                                 seq_len, vocab)
    if variant != "transformer_pp":
        task.model.candidate.recompute_probabilities = variant == "ebt"
    return task


def batches(vocab: int, seq_len: int, batch_size: int, count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        windows = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=generator)
        out.append({"tokens": windows[:, :-1], "targets": windows[:, 1:]})
    return out


def time_vocabulary(vocab: int, args) -> dict[str, list[float]]:
    steps = {v: train_step.make_step(build(v, args.size, args.seq_len, vocab), torch.device("cpu")) for v in VARIANTS}
    data = batches(vocab, args.seq_len, args.batch_size, args.warmup + args.rounds)
    return bench.interleaved_steps(steps, data, warmup=args.warmup)


def peak_memory_child(args) -> None:
    task = build(args.memory_of, args.size, args.seq_len, args.vocab)
    step = train_step.make_step(task, torch.device("cpu"))
    data = batches(args.vocab, args.seq_len, args.batch_size, 2)
    print(bench.peak_memory(lambda: [step(batch, index) for index, batch in enumerate(data)], "cpu"))


def peak_memory(variant: str, vocab: int, args, batch_size: int) -> int:
    command = [sys.executable, __file__, "--memory-of", variant, "--vocab", str(vocab), "--size", args.size,
               "--seq-len", str(args.seq_len), "--batch-size", str(batch_size), "--threads", str(args.threads)]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def prepare_throughput(args) -> dict:
    """``prepare_corpus`` on a repeated local corpus with a tokenizer trained here (see the module docstring)."""
    import pydoc_data.topics

    from energyflow.data.tokens import prepare_corpus, text_file_documents, train_tokenizer

    text = "\n\n".join(pydoc_data.topics.topics.values())
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        corpus = scratch / "corpus.txt"
        corpus.write_text("\n\n".join([text] * args.prepare_repeats), encoding="utf-8")
        once = scratch / "once.txt"
        once.write_text(text, encoding="utf-8")
        tokenizer = train_tokenizer([once], args.prepare_vocab, scratch / "tokenizer.json")
        runs = []
        for index in range(args.prepare_rounds):
            started = time.perf_counter()
            meta = prepare_corpus(lambda: text_file_documents([corpus]), tokenizer, scratch / f"out{index}",
                                  source=str(corpus))
            runs.append(time.perf_counter() - started)
        tokens = meta["tokens"]["train"] + meta["tokens"]["validation"]
        seconds = statistics.median(runs)
        return {"vocab_size": meta["vocab_size"], "dtype": meta["dtype"], "documents": sum(meta["documents"].values()),
                "tokens": tokens, "text_bytes": corpus.stat().st_size, "seconds": runs,
                "tokens_per_second": tokens / seconds, "megabytes_per_second": corpus.stat().st_size / seconds / 1e6,
                "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS", "unset (the tokenizers library's pool)")}


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Training step against the vocabulary size: EBT vs Transformer++, before and after the memory work\n",
             f"{s['size']}, sequence {s['seq_len']}, batch {s['batch_size']}, {s['threads']} thread(s), CPU, torch "
             f"{s['torch']}; median of {s['rounds']} interleaved rounds; peak memory = peak RSS growth over two "
             "steps in a fresh process; 1-min load average "
             f"{s['load_average_1min_start']:.1f} at the start, {s['load_average_1min_end']:.1f} at the end "
             "(a shared machine: the seconds are noisy, the memory is not).\n",
             "| V | variant | s/step | vs Transformer++ | peak MiB | vs Transformer++ |", "|---:|---|---:|---:|---:|---:|"]
    for vocab, row in result["vocabularies"].items():
        base_s, base_m = row["seconds"]["transformer_pp"], row["peak_bytes"]["transformer_pp"]
        for variant in VARIANTS:
            seconds, peak = row["seconds"][variant], row["peak_bytes"][variant]
            lines.append(f"| {int(vocab):,} | {variant} | {seconds:.3f} | {seconds / base_s:.2f}x | "
                         f"{peak / 2**20:,.0f} | {peak / base_m:.2f}x |")
    lines.append("")
    for vocab, row in result["vocabularies"].items():
        before, after = row["peak_bytes"]["ebt_before"], row["peak_bytes"]["ebt"]
        lines.append(f"- V = {int(vocab):,}: recomputing the probabilities lowers the EBT's peak by "
                     f"{(before - after) / 2**20:,.0f} MiB ({(before - after) / before:.0%}); its step takes "
                     f"{row['seconds']['ebt'] / row['seconds']['ebt_before']:.2f}x the time.")
    fit = result["fit_per_gb"]
    lines.append(f"- At V = {fit['vocab']:,}, batch {fit['half_batch']} -> {s['batch_size']} (sequence {s['seq_len']}): "
                 "peak growth per token of batch x sequence "
                 + ", ".join(f"{name} {fit[name]['kib_per_token']:,.0f} KiB, so {fit[name]['tokens_per_gb']:,.0f} "
                             f"tokens ({fit[name]['tokens_per_gb'] / s['seq_len']:.1f} sequences of {s['seq_len']}) "
                             "per GB" for name in ("ebt_before", "ebt", "transformer_pp"))
                 + " (the difference of two measured batches: parameters and optimizer state cancel).")
    p = result["prepare"]
    lines += ["", "## `prepare` throughput\n",
              f"`prepare_corpus` on the pydoc corpus x{s['prepare_repeats']} ({p['text_bytes'] / 1e6:.1f} MB of text, "
              f"{p['documents']:,} documents), a byte-level BPE trained on it (vocabulary {p['vocab_size']:,}, "
              f"{p['dtype']} shards), median of {s['prepare_rounds']} fresh runs; tokenizers' threads: "
              f"{p['rayon_num_threads']}.\n",
              "| tokens | seconds | tokens/s | MB/s of text |", "|---:|---:|---:|---:|",
              f"| {p['tokens']:,} | {statistics.median(p['seconds']):.2f} | {p['tokens_per_second']:,.0f} | "
              f"{p['megabytes_per_second']:.1f} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="xxs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--vocabularies", default=",".join(map(str, VOCABULARIES)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prepare-repeats", type=int, default=40)
    parser.add_argument("--prepare-vocab", type=int, default=4096)
    parser.add_argument("--prepare-rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as Trainer.fit does
    if args.memory_of:
        peak_memory_child(args)
        return 0
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (memory per token is the difference against half the batch)")
    vocabularies = [int(v) for v in args.vocabularies.split(",")]
    started, load = time.perf_counter(), os.getloadavg()[0]
    result = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("memory_of", "vocab", "out")},
                           "torch": torch.__version__, "load_average_1min_start": load},
              "vocabularies": {}}
    for vocab in vocabularies:
        times = time_vocabulary(vocab, args)
        result["vocabularies"][str(vocab)] = {
            "seconds": {v: statistics.median(t) for v, t in times.items()}, "step_seconds": times,
            "peak_bytes": {v: peak_memory(v, vocab, args, args.batch_size) for v in VARIANTS}}
    largest, half = max(vocabularies), args.batch_size // 2
    full_row = result["vocabularies"][str(largest)]["peak_bytes"]
    fit = {"vocab": largest, "half_batch": half}
    for variant in VARIANTS:
        at_half = peak_memory(variant, largest, args, half)
        per_token = (full_row[variant] - at_half) / ((args.batch_size - half) * args.seq_len)
        fit[variant] = {"peak_bytes_half_batch": at_half, "kib_per_token": per_token / 2**10,
                        "tokens_per_gb": 2**30 / per_token}
    result["fit_per_gb"] = fit
    result["prepare"] = prepare_throughput(args)
    result["settings"]["load_average_1min_end"] = os.getloadavg()[0]
    result["settings"]["seconds"] = time.perf_counter() - started
    bench.write(args.out, "vocab_scale", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
