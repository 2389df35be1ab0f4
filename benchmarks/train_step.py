"""Seconds per optimizer step: EBT (System 1: 2 descent steps) vs the Transformer++ of the same size.

CPU (default): four variants -- the Transformer++ on the math attention path (what ``attention_backend="auto"``
picks while a graph is built) and on the fused SDPA kernel (all a first-order baseline needs), EBT with the
cached context, EBT through the reference whole-sequence forward (no cache) -- are timed in one process with
their steps interleaved round by round, so a change in machine load hits all alike; the median over rounds
is reported, with the EBT ratios against both baselines (the faster one is the headline). Peak memory is measured per variant in a fresh subprocess (peak RSS growth over two steps).
As the Trainer runs on CPU: denormals flushed to zero and freed memory retained by the allocator
(``energyflow.host_memory``); ``--keep-denormals`` and ``--return-freed-memory`` turn each off.
CUDA (``--device cuda``): the real trainer (bf16 autocast) on each task; the median time from one training
step to the next, tokens/s, MFU and peak allocated memory (``trainer_report``).

    python benchmarks/train_step.py                      # CPU, xxs, sequence 256, batch 8, vocabulary 256
    python benchmarks/train_step.py --device cuda --rounds 50
Writes benchmarks/results/train_step_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from energyflow import bench, host_memory  # noqa: E402
from architectures import EBT, TransformerConfig, TransformerPP  # noqa: E402
from energyflow.data import text_data, to_batch  # noqa: E402
from energyflow.models import TextEBM  # noqa: E402
from energyflow.objectives import EBTObjective, RandomNoise  # noqa: E402
from energyflow.optim import build_optimizer, param_groups  # noqa: E402
from energyflow.tasks import LanguageModelTask, Task  # noqa: E402
from energyflow.tasks import EBTLanguageModelTask  # noqa: E402
from samplers import GradientDescent  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("transformer_pp", "transformer_pp_fused", "ebt_cached", "ebt_cached_math_context", "ebt_uncached")
BASELINES = ("transformer_pp", "transformer_pp_fused")


class UncachedTextEBM(nn.Module):
    """The same ``TextEBM`` scored by the reference formulation: all 2S tokens through the stack at every
    descent step (what the paper's code does); ``encode`` only hands the tokens on."""

    def __init__(self, model: TextEBM) -> None:
        super().__init__()
        self.model = model

    def encode(self, tokens: Tensor) -> Tensor:
        return tokens

    def energy(self, tokens: Tensor, candidate: Tensor) -> Tensor:
        return self.model(tokens, candidate)

    def candidate_shape(self, targets: Tensor) -> tuple[int, ...]:
        return self.model.candidate_shape(targets)


def build_task(variant: str, size: str, seq_len: int, vocab: int = 256) -> Task:
    """System 1 EBT (2 steps, step size 500 learnable x1500, noise start) or the Transformer++ (math or fused
    attention)."""
    torch.manual_seed(0)
    config = TransformerConfig.from_preset(size, max_seq_len=seq_len)
    if variant.startswith("transformer_pp"):
        backend = "fused" if variant == "transformer_pp_fused" else "auto"
        return LanguageModelTask(TransformerPP(replace(config, attention_backend=backend), vocab))
    # The EBT's context stream: the fused kernel (first order only, the default), or the math path it had before.
    context = "auto" if variant == "ebt_cached_math_context" else "fused"
    model = TextEBM(EBT(config, context_attention=context), vocab)
    objective = EBTObjective(GradientDescent(500.0, learnable=True), num_steps=2, initial_state=RandomNoise(1.0))
    task = EBTLanguageModelTask(model, objective)
    if variant == "ebt_uncached":
        task.model = UncachedTextEBM(model)
    return task


def make_step(task: Task, device: torch.device):
    """The trainer's optimizer step: loss, backward, clip 1.0, AdamW (with the task's parameter groups)."""
    groups = param_groups(task.named_parameters(), weight_decay=0.01, lr_multipliers=task.lr_multipliers(),
                          no_weight_decay=task.no_weight_decay())
    optimizer = build_optimizer(groups, learning_rate=1e-3, betas=(0.9, 0.999))
    generator = torch.Generator(device=device).manual_seed(0)

    def step(batch, index: int) -> None:
        loss, _ = task.loss(batch, step=index, generator=generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def batches(seq_len: int, batch_size: int, count: int, device: torch.device) -> list[dict[str, Tensor]]:
    windows = text_data(seq_len=seq_len).train
    return [to_batch(windows[i * batch_size:(i + 1) * batch_size], device) for i in range(count)]


def time_interleaved(args) -> dict[str, list[float]]:
    """Per variant, the seconds of each measured step, rounds interleaved across variants."""
    device = torch.device("cpu")
    steps = {v: make_step(build_task(v, args.size, args.seq_len), device) for v in VARIANTS}
    data = batches(args.seq_len, args.batch_size, args.warmup + args.rounds, device)
    return bench.interleaved_steps(steps, data, warmup=args.warmup)


def peak_memory_child(args) -> None:
    """(subprocess) Print the peak RSS growth of two optimizer steps of one variant, in bytes."""
    task = build_task(args.memory_of, args.size, args.seq_len)
    step = make_step(task, torch.device("cpu"))
    data = batches(args.seq_len, args.batch_size, 2, torch.device("cpu"))
    print(bench.peak_memory(lambda: [step(batch, index) for index, batch in enumerate(data)], "cpu"))


def peak_memory(variant: str, args) -> int:
    command = [sys.executable, __file__, "--memory-of", variant, "--size", args.size, "--seq-len",
               str(args.seq_len), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               *(["--keep-denormals"] if args.keep_denormals else []),
               *(["--return-freed-memory"] if args.return_freed_memory else [])]
    return int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def cpu_report(args) -> dict:
    load_start = os.getloadavg()[0]
    times = time_interleaved(args)
    medians = {v: statistics.median(t) for v, t in times.items()}
    baseline = min(BASELINES, key=medians.get)  # the headline compares against the faster baseline
    # Rounds are interleaved, so a round's ratio compares steps taken under the same load.
    round_ratio = lambda ebt, base: statistics.median(e / t for e, t in zip(times[ebt], times[base]))  # noqa: E731
    return {
        "median_step_seconds": medians, "step_seconds": times, "headline_baseline": baseline,
        "ratio_ebt_cached_to_tpp": medians["ebt_cached"] / medians[baseline],
        "ratio_ebt_uncached_to_tpp": medians["ebt_uncached"] / medians[baseline],
        "ratio_ebt_cached_to_each_baseline": {b: medians["ebt_cached"] / medians[b] for b in BASELINES},
        "speedup_cached_over_uncached": medians["ebt_uncached"] / medians["ebt_cached"],
        "speedup_fused_context": medians["ebt_cached_math_context"] / medians["ebt_cached"],
        "median_round_speedup_fused_context": statistics.median(
            m / f for m, f in zip(times["ebt_cached_math_context"], times["ebt_cached"])),
        "median_round_ratio_ebt_cached_to_tpp": round_ratio("ebt_cached", baseline),
        "median_round_ratio_ebt_cached_to_each_baseline": {b: round_ratio("ebt_cached", b) for b in BASELINES},
        "peak_memory_growth_bytes": {v: peak_memory(v, args) for v in VARIANTS},
        "load_average_1min_start": load_start, "load_average_1min": os.getloadavg()[0],
    }


def trainer_report(args, device: torch.device) -> dict:
    """The trainer itself (its default precision: bf16 autocast on CUDA) on ``device``: median step time, tokens/s,
    the model FLOPs per step and MFU (``energyflow.flops``, against the device's peak) and peak memory (allocated
    on CUDA, the resident set's growth on the CPU). What ``--device cuda`` reports; ``benchmarks/gpu_suite.py
    --smoke`` runs it on the CPU.

    A step is timed from one ``task.loss`` call to the next (one micro-batch per step), so it includes
    everything the trainer does per step: forward, backward, clipping, AdamW, metrics and logging.
    """
    from energyflow.flops import device_peak
    from energyflow.trainer import Trainer

    data = text_data(seq_len=args.seq_len)
    peak = device_peak(device)
    report = {}
    for variant in ("transformer_pp", "ebt_cached"):
        task, stamps = build_task(variant, args.size, args.seq_len), []
        loss = task.loss

        def timed_loss(*loss_args, _loss=loss, _stamps=stamps, **loss_kwargs):
            bench.synchronize(device)
            _stamps.append(time.perf_counter())
            return _loss(*loss_args, **loss_kwargs)

        task.loss = timed_loss
        trainer = Trainer(num_steps=args.warmup + args.rounds + 1, batch_size=args.batch_size, learning_rate=1e-3,
                          device=device.type, checkpoint_every=10**9, eval_batches=1, progress=False)
        with tempfile.TemporaryDirectory() as out:
            memory = bench.peak_memory(lambda: trainer.fit(task, data, out), device)
        seconds = statistics.median(b - a for a, b in zip(stamps[args.warmup:], stamps[args.warmup + 1:]))
        tokens = args.batch_size * args.seq_len
        model_flops = task.train_flops_per_token(args.seq_len) * tokens
        report[variant] = {"step_seconds": seconds, "tokens_per_second": tokens / seconds,
                           "model_flops_per_step": model_flops, "mfu": model_flops / seconds / peak if peak else None,
                           "peak_memory_bytes": memory}
    report["ratio_ebt_cached_to_tpp"] = report["ebt_cached"]["step_seconds"] / report["transformer_pp"]["step_seconds"]
    report["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    report["autocast"] = "bf16" if device.type == "cuda" else "off"
    return report


def markdown(result: dict) -> str:
    settings = result["settings"]
    head = (f"# Train step: EBT (System 1, 2 descent steps) vs Transformer++\n\n{settings['size']}, sequence "
            f"{settings['seq_len']}, batch {settings['batch_size']}, vocabulary 256, device {settings['device']}"
            f"{' (' + settings['cpu_model'] + ')' if settings.get('cpu_model') else ''}, "
            f"{settings['threads']} thread(s), torch {settings['torch']}, denormals "
            f"{'flushed to zero (as the Trainer runs)' if settings.get('flush_denormal') else 'kept'}, freed memory "
            f"{'retained (as the Trainer runs)' if settings.get('retain_freed_memory') else 'returned to the kernel'}"
            ".\n\n")
    if settings["device"] == "cuda":
        rows = [f"| {v} | {r['step_seconds']:.4f} | {r['tokens_per_second']:.0f} | "
                f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['peak_memory_bytes'] / 2**20:.0f} |"
                for v, r in result["report"].items() if isinstance(r, dict)]
        return head + ("| variant | s/step | tokens/s | MFU | peak MiB |\n|---|---|---|---|---|\n" + "\n".join(rows) +
                       f"\n\nEBT / Transformer++: {result['report']['ratio_ebt_cached_to_tpp']:.2f}x\n")
    report = result["report"]
    medians, baseline = report["median_step_seconds"], report["headline_baseline"]
    rows = [f"| {v} | {medians[v]:.3f} | {medians[v] / medians['transformer_pp']:.2f}x | "
            f"{medians[v] / medians['transformer_pp_fused']:.2f}x | "
            f"{report['peak_memory_growth_bytes'][v] / 2**20:.0f} |" for v in VARIANTS]
    per_round = ", ".join(f"{r:.2f}x vs {b}" for b, r in report["median_round_ratio_ebt_cached_to_each_baseline"].items())
    return head + ("| variant | median s/step | vs Transformer++ (math) | vs Transformer++ (fused) | "
                   "peak RSS growth MiB |\n|---|---|---|---|---|\n" + "\n".join(rows) +
                   f"\n\nHeadline: EBT (cached) / faster baseline ({baseline}) = "
                   f"{report['ratio_ebt_cached_to_tpp']:.2f}x. Median over rounds of the per-round EBT/TPP ratio: "
                   f"{per_round}. Cached context speed-up over the reference (uncached) formulation: "
                   f"{report['speedup_cached_over_uncached']:.2f}x. The fused kernel in the context stream (first "
                   f"order only) against the math path there: {report['speedup_fused_context']:.3f}x (per-round "
                   f"median {report['median_round_speedup_fused_context']:.3f}x). Rounds: {settings['rounds']} "
                   "(interleaved), "
                   f"1-min load average at the start / end: {report['load_average_1min_start']:.1f} / "
                   f"{report['load_average_1min']:.1f}.\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", default="xxs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and markdown results")
    parser.add_argument("--keep-denormals", action="store_true",
                        help="do not flush denormals to zero (the Trainer flushes them by default, see Trainer)")
    parser.add_argument("--return-freed-memory", action="store_true",
                        help="leave glibc's allocator as it is (the Trainer retains freed memory, see "
                             "energyflow.host_memory; benchmarks/host_memory.py compares the two)")
    parser.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.flush_denormal = not args.keep_denormals and torch.set_flush_denormal(True)  # as Trainer.fit does
    args.retain_freed_memory = not args.return_freed_memory and host_memory.retain_freed_memory()  # as on CPU
    if args.memory_of:
        return peak_memory_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; run on a GPU machine or use --device cpu")
    report = trainer_report(args, torch.device("cuda")) if args.device == "cuda" else cpu_report(args)
    settings = {**{k: v for k, v in vars(args).items()
                   if k not in ("memory_of", "keep_denormals", "return_freed_memory", "out")},
                "torch": torch.__version__, "cpu_model": bench.cpu_model()}
    result = {"settings": settings, "report": report}
    bench.write(args.out, f"train_step_{args.device}", result, markdown(result), device=args.device)
    print(markdown(result))


if __name__ == "__main__":
    main()
