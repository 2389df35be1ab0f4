"""The training step against the vocabulary size: EBT (System 1, 2 descent steps) and Transformer++ at V = 256,
4096 and 50,277 (the paper's GPT-NeoX vocabulary), seconds and peak memory, side by side.

The EBT's state is ``[B, S, V]`` and its second-order graph keeps several such tensors per descent step, so at
V ~ 50k memory, not compute, decides what fits. Variants, per vocabulary size:
- ``transformer_pp``: the Transformer++ (fused attention: all a first-order step needs);
- ``ebt``: the EBT as the recipes train it (cached context; the loss at each step is ``CrossEntropy``'s fused
  form, which saves nothing beyond the state);
- ``ebt_unfused_ce``: the same EBT with ``F.cross_entropy`` per step (what it was before: one more
  full-vocabulary log-softmax kept per step).
Seconds: the median over ``--rounds`` steps, the variants of one vocabulary size interleaved round by round.
Peak memory: the growth of peak RSS over two optimizer steps, each variant in a fresh subprocess (set-up
allocations excluded). Tokens are uniform random ids (speed and memory do not depend on the text). From the
EBT's peak at the measured batch, the largest ``batch x sequence`` per GB at V = 50,277 is extrapolated
linearly (activation memory is linear in B x S at fixed S; stated as an estimate, not measured at that size).

    python benchmarks/vocabulary.py                      # xxs, sequence 256, batch 4, 1 thread
Writes benchmarks/results/vocabulary.json and .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import train_step  # noqa: E402  (benchmarks/ is this script's directory, first on sys.path)
from energyflow import bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("transformer_pp", "ebt", "ebt_unfused_ce")
VOCABULARIES = (256, 4096, 50277)


def build(variant: str, size: str, seq_len: int, vocab: int):
    task = train_step.build_task("transformer_pp_fused" if variant == "transformer_pp" else "ebt_cached", size,
                                 seq_len, vocab)
    if variant == "ebt_unfused_ce":
        task.objective.loss_fn.fused = False
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


def peak_memory(variant: str, vocab: int, args) -> int:
    command = [sys.executable, __file__, "--memory-of", variant, "--vocab", str(vocab), "--size", args.size,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["# Training step against the vocabulary size: EBT vs Transformer++\n",
             f"{s['size']}, sequence {s['seq_len']}, batch {s['batch_size']}, {s['threads']} thread(s), CPU, torch "
             f"{s['torch']}; median of {s['rounds']} interleaved rounds; peak memory = peak RSS growth over two "
             "steps in a fresh process.\n",
             "| V | variant | s/step | vs Transformer++ | peak MiB | vs Transformer++ |", "|---:|---|---:|---:|---:|---:|"]
    for vocab, row in result["vocabularies"].items():
        base_s, base_m = row["seconds"]["transformer_pp"], row["peak_bytes"]["transformer_pp"]
        for variant in VARIANTS:
            seconds, peak = row["seconds"][variant], row["peak_bytes"][variant]
            lines.append(f"| {int(vocab):,} | {variant} | {seconds:.3f} | {seconds / base_s:.2f}x | "
                         f"{peak / 2**20:,.0f} | {peak / base_m:.2f}x |")
    lines.append("")
    for vocab, row in result["vocabularies"].items():
        saved = row["peak_bytes"]["ebt_unfused_ce"] - row["peak_bytes"]["ebt"]
        lines.append(f"- V = {int(vocab):,}: the fused per-step cross-entropy saves {saved / 2**20:,.0f} MiB of the "
                     f"EBT's peak ({saved / row['peak_bytes']['ebt_unfused_ce']:.0%}).")
    fit = result["fit_per_gb"]
    lines.append(f"- At V = {fit['vocab']:,} the EBT's step peaks at {fit['ebt_mib_per_sequence_token'] * 1024:,.1f} KiB per "
                 f"token of batch x sequence, so about {fit['ebt_tokens_per_gb']:,.0f} tokens (batch x sequence) fit "
                 f"per GB of activation memory (the Transformer++: {fit['tpp_tokens_per_gb']:,.0f}); at sequence "
                 f"{s['seq_len']} that is a batch of {fit['ebt_tokens_per_gb'] / s['seq_len']:.1f} per GB. Linear "
                 "extrapolation from the measured batch.")
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
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as Trainer.fit does
    if args.memory_of:
        peak_memory_child(args)
        return 0
    vocabularies = [int(v) for v in args.vocabularies.split(",")]
    started, load = time.perf_counter(), os.getloadavg()[0]
    result = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("memory_of", "vocab", "out")},
                           "torch": torch.__version__, "load_average_1min_start": load},
              "vocabularies": {}}
    for vocab in vocabularies:
        times = time_vocabulary(vocab, args)
        result["vocabularies"][str(vocab)] = {
            "seconds": {v: statistics.median(t) for v, t in times.items()}, "step_seconds": times,
            "peak_bytes": {v: peak_memory(v, vocab, args) for v in VARIANTS}}
    largest = result["vocabularies"][str(max(vocabularies))]
    tokens = args.batch_size * args.seq_len
    result["fit_per_gb"] = {"ebt_mib_per_sequence_token": largest["peak_bytes"]["ebt"] / tokens / 2**20,
                            "ebt_tokens_per_gb": 2**30 / (largest["peak_bytes"]["ebt"] / tokens),
                            "tpp_tokens_per_gb": 2**30 / (largest["peak_bytes"]["transformer_pp"] / tokens),
                            "vocab": max(vocabularies)}
    result["settings"]["seconds"] = time.perf_counter() - started
    bench.write(args.out, "vocabulary", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
