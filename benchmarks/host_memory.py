"""The training step with freed memory retained by the allocator (the Trainer's CPU default) against glibc as is.

``energyflow.host_memory.retain_freed_memory`` is process-wide and cannot be undone, so every measurement is a
fresh subprocess: per round, the EBT (System 1, 2 descent steps, cached context) and the Transformer++ (fused
attention) each under both allocator modes, the order alternating between rounds so a change of machine load
hits all alike. A subprocess takes one unmeasured step, then ``--steps`` measured ones (the step of
``benchmarks/train_step.py``: loss, backward, clip, AdamW; denormals flushed, as the Trainer runs), and reports
the median seconds per step, minor page faults and kernel (system) seconds per step, and its peak resident set.

    python benchmarks/host_memory.py                     # xxs, sequence 256, batch 8, one thread, 3 rounds
Writes benchmarks/results/host_memory.json and .md.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import train_step
from energyflow import bench, host_memory

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("transformer_pp_fused", "ebt_cached")
MODES = ("retained", "returned")


def child(args) -> None:
    """(subprocess) Time ``args.steps`` steps of one variant under one allocator mode; print one JSON line."""
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    retained = host_memory.retain_freed_memory() if args.child_mode == "retained" else False
    step = train_step.make_step(train_step.build_task(args.child_variant, args.size, args.seq_len),
                                torch.device("cpu"))
    data = train_step.batches(args.seq_len, args.batch_size, args.steps + 1, torch.device("cpu"))
    step(data[0], 0)
    seconds, before = [], resource.getrusage(resource.RUSAGE_SELF)
    for index in range(1, args.steps + 1):
        start = time.perf_counter()
        step(data[index], index)
        seconds.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"retained": retained, "step_seconds": seconds,
                      "minor_faults_per_step": (after.ru_minflt - before.ru_minflt) / args.steps,
                      "system_seconds_per_step": (after.ru_stime - before.ru_stime) / args.steps,
                      "user_seconds_per_step": (after.ru_utime - before.ru_utime) / args.steps,
                      "peak_rss_bytes": bench.rss_bytes("VmHWM")}))


def measure(variant: str, mode: str, args) -> dict:
    command = [sys.executable, __file__, "--child-variant", variant, "--child-mode", mode, "--size", args.size,
               "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--steps", str(args.steps)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def report(args) -> dict:
    cells = [(variant, mode) for variant in VARIANTS for mode in MODES]
    runs: dict[str, list[dict]] = {f"{v}/{m}": [] for v, m in cells}
    for round_index in range(args.rounds):
        for variant, mode in (cells if round_index % 2 == 0 else cells[::-1]):
            runs[f"{variant}/{mode}"].append(measure(variant, mode, args))
    median = lambda key, field: statistics.median(  # noqa: E731
        statistics.median(r[field]) if field == "step_seconds" else r[field] for r in runs[key])
    summary = {key: {field: median(key, field) for field in ("step_seconds", "minor_faults_per_step",
                                                              "system_seconds_per_step", "user_seconds_per_step",
                                                              "peak_rss_bytes")} for key in runs}
    seconds = {key: value["step_seconds"] for key, value in summary.items()}
    return {"runs": runs, "median": summary,
            "speedup_retained": {v: seconds[f"{v}/returned"] / seconds[f"{v}/retained"] for v in VARIANTS},
            "ratio_ebt_to_tpp": {m: seconds[f"ebt_cached/{m}"] / seconds[f"transformer_pp_fused/{m}"]
                                 for m in MODES},
            "retained_took_effect": all(r["retained"] for v in VARIANTS for r in runs[f"{v}/retained"])}


def markdown(result: dict) -> str:
    s, r = result["settings"], result["report"]
    rows = [f"| {key} | {m['step_seconds']:.3f} | {m['minor_faults_per_step']:,.0f} | "
            f"{m['system_seconds_per_step']:.3f} | {m['user_seconds_per_step']:.3f} | "
            f"{m['peak_rss_bytes'] / 2**20:,.0f} |"
            for key, m in r["median"].items()]
    return (f"# Freed memory retained by the allocator vs returned to the kernel\n\n{s['size']}, sequence "
            f"{s['seq_len']}, batch {s['batch_size']}, {s['threads']} thread(s), {s['steps']} measured steps per "
            f"subprocess, {s['rounds']} rounds (medians), torch {s['torch']}.\n\n"
            "| variant / allocator | s/step | minor faults/step | system s/step | user s/step | peak RSS MiB |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) +
            "\n\nRetained over returned: " + ", ".join(f"{v} {x:.3f}x" for v, x in r["speedup_retained"].items()) +
            ". EBT / Transformer++: " + ", ".join(f"{x:.2f}x {m}" for m, x in r["ratio_ebt_to_tpp"].items()) +
            f". The retaining mode took effect in every subprocess: {r['retained_took_effect']}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="xxs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per subprocess")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    if args.child_variant:
        return child(args)
    settings = {k: v for k, v in vars(args).items() if not k.startswith("child") and k != "out"}
    result = {"settings": {**settings, "torch": torch.__version__}, "report": report(args)}
    bench.write(args.out, "host_memory", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
