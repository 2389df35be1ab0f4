"""Cached context stream vs recomputing both streams: per-optimisation-step time and peak memory of the EBT.

For each mode and number of steps K, one measurement runs K energy-descent steps from the same state:
- ``train``: K steps with ``create_graph=True``, the state detached between steps (the paper's default),
  a task loss at every step and its backward to the parameters, all timed. Each step's loss is
  back-propagated right after the step, so only one step's graph is alive at a time (K graphs of the
  2S-token model at once would not fit this machine's memory at K=8). ``full`` recomputes both streams per
  step; ``cached`` encodes the context once, runs the steps against ``cache.as_leaves()`` and sends the
  gathered context gradient through the context graph once at the end (``backward_from``).
- ``inference``: K steps without a second-order graph on a frozen model (``requires_grad_(False)``).
Reported: per-step time (total / K, the context encoding included; medians over repetitions interleaved so that shared-CPU contention hits
both variants alike; the variant order alternates), the full/cached ratio, the ratio without the cached
variant's one-off context encoding (the steady per-step saving, e.g. over many thinking steps), and the peak resident memory
increase of each measurement: the kernel's RSS high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs`` before each run) minus the RSS right before the run, after ``malloc_trim`` has
returned freed heap memory. (The torch profiler on CPU records frees but not a usable peak.)

Run: ``python benchmarks/ebt_context_cache.py`` (xxs, sequence 256, batch 8, steps 2 and 8);
``--preset 4xs --seq 32 --batch 2 --repeats 1`` for a smoke run.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import ctypes
import time
from pathlib import Path

import torch

from energyflow import bench  # noqa: E402
from architectures.ebt import EBT  # noqa: E402
from architectures.transformer import TransformerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STEP_SIZE = 0.5
_LIBC = ctypes.CDLL("libc.so.6")


def build(preset: str, seq: int, batch: int) -> tuple[EBT, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = EBT(TransformerConfig.from_preset(preset, max_seq_len=seq))
    real, y0, target = (torch.randn(batch, seq, model.config.dim) for _ in range(3))
    return model, real, y0, target


def run_once(model: EBT, real, y0, target, variant: str, mode: str, num_steps: int) -> tuple[float, float]:
    """One measurement: seconds for all ``num_steps`` steps (and the parameter backward in training), and the
    part of them spent encoding the context (0 for ``full``)."""
    train = mode == "train"
    model.requires_grad_(train)
    start = time.perf_counter()
    if variant == "cached":
        cache = model.encode_context(real)
        encode_seconds = time.perf_counter() - start
        steps_cache = cache.as_leaves() if train else cache
        energy_fn = lambda y: model.energies(steps_cache, y)  # noqa: E731
    else:
        energy_fn, encode_seconds = (lambda y: model(real, y)), 0.0  # noqa: E731
    y = y0
    for _ in range(num_steps):
        y = y.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy_fn(y).sum(), y, create_graph=train)
        y = y - STEP_SIZE * grad
        if train:
            torch.nn.functional.mse_loss(y, target).backward()
    if train and variant == "cached":
        cache.backward_from(steps_cache)
    if train:
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start, encode_seconds


def measured_run(model: EBT, real, y0, target, variant: str, mode: str,
                 num_steps: int) -> tuple[float, float, int]:
    """``run_once`` plus its peak RSS increase in bytes (see the module docstring for the method)."""
    _LIBC.malloc_trim(0)
    timing = {}
    peak = bench.peak_memory(lambda: timing.update(out=run_once(model, real, y0, target, variant, mode, num_steps)))
    seconds, encode_seconds = timing["out"]
    return seconds, encode_seconds, peak


def measure(args: argparse.Namespace) -> None:
    """Run the interleaved repetitions, rewriting the result files after each one (partial runs still count)."""
    model, real, y0, target = build(args.preset, args.seq, args.batch)
    cells = [(mode, k) for mode in ("train", "inference") for k in args.steps]
    results: dict[tuple[str, int, str], dict[str, list[float]]] = {}
    for mode, _ in cells[:: len(args.steps)]:  # warm-up (allocator, thread pools), not recorded
        for variant in ("cached", "full"):
            run_once(model, real, y0, target, variant, mode, 1)
    for rep in range(args.repeats):
        order = ("cached", "full") if rep % 2 == 0 else ("full", "cached")
        for mode, k in cells:
            for variant in order:
                seconds, encode_seconds, peak = measured_run(model, real, y0, target, variant, mode, k)
                cell = results.setdefault((mode, k, variant), {"seconds_per_step": [], "peak_bytes": [],
                                                               "steps_only_seconds_per_step": []})
                cell["seconds_per_step"].append(seconds / k)
                cell["steps_only_seconds_per_step"].append((seconds - encode_seconds) / k)
                cell["peak_bytes"].append(peak)
                print(f"rep {rep} {mode:9s} K={k} {variant:6s} {seconds / k * 1000:9.1f} ms/step "
                      f"peak +{peak / 2**20:7.0f} MiB", flush=True)
        write(args, summarise(args, results), repeats_done=rep + 1)


def summarise(args: argparse.Namespace, results) -> list[dict]:
    rows = []
    for mode in ("train", "inference"):
        for k in args.steps:
            cached, full = results[(mode, k, "cached")], results[(mode, k, "full")]
            cached_s, full_s = (statistics.median(c["seconds_per_step"]) for c in (cached, full))
            steps_only = statistics.median(cached["steps_only_seconds_per_step"])
            rows.append({
                "mode": mode, "num_steps": k, "cached_ms_per_step": 1000 * cached_s,
                "full_ms_per_step": 1000 * full_s, "speedup": full_s / cached_s,
                "cached_steps_only_ms_per_step": 1000 * steps_only, "speedup_steps_only": full_s / steps_only,
                "cached_seconds_per_step": cached["seconds_per_step"], "full_seconds_per_step": full["seconds_per_step"],
                "cached_peak_rss_increase_mib": max(cached["peak_bytes"]) / 2**20,
                "full_peak_rss_increase_mib": max(full["peak_bytes"]) / 2**20,
            })
    return rows


def write(args: argparse.Namespace, rows: list[dict], repeats_done: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "seq": args.seq, "batch": args.batch, "repeats": repeats_done,
            "threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "memory_method": "max over repetitions of VmHWM (reset via /proc/self/clear_refs) - VmRSS before the run, "
                             "after malloc_trim(0)",
            "training_backward": "per step (one step graph alive); cached: as_leaves + backward_from once",
            "time_method": "median over interleaved repetitions of (total time of K steps) / K",
            "load_average_1min_at_write": os.getloadavg()[0]}
    lines = [f"EBT context cache, preset {args.preset}, sequence {args.seq}, batch {args.batch}, "
             f"{args.threads} threads, torch {torch.__version__}, medians of {repeats_done} interleaved repetitions "
             f"(peak memory: max over them); 1-min load average when written: {meta['load_average_1min_at_write']:.1f}.",
             "", "| mode | steps | cached ms/step | full ms/step | speed-up | speed-up without encoding "
             "| cached peak MiB | full peak MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['num_steps']} | {r['cached_ms_per_step']:.0f} | {r['full_ms_per_step']:.0f} "
                     f"| {r['speedup']:.2f}x | {r['speedup_steps_only']:.2f}x | {r['cached_peak_rss_increase_mib']:.0f} "
                     f"| {r['full_peak_rss_increase_mib']:.0f} |")
    bench.write(args.out, "ebt_context_cache", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="xxs")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    measure(args)


if __name__ == "__main__":
    main()
