"""System 2 inference speed: a thinking step with the cached context vs recomputing both streams, and
generation tokens per second, EBT vs Transformer++ (each with and without its cache).

Measured side by side in one process on untrained models of one preset (speed does not depend on the
weights), repetitions interleaved with alternating variant order so shared-CPU contention hits all alike;
reported numbers are medians.
- ``thinking``: ``energyflow.inference.think`` for K steps on a ``[B, S]`` batch with vocabulary-logit
  states (the real inference path). ``cached``: the context is encoded once (timed) and every step runs the
  prediction stream against it; ``recompute``: every step runs the model's uncached two-stream forward.
  Seconds per step = total / K.
- ``generation``: ``generate_ebt`` (``thinking_steps`` steps, 1 candidate, greedy) and
  ``generate_baseline`` (greedy), each cached and recomputing, from a ``prompt``-byte prompt.

Run: ``python benchmarks/inference.py`` (defaults below); ``--preset 4xs --seq 32 --new 8 --repeats 1`` for a
smoke run. Writes ``benchmarks/results/inference.json`` and ``inference.md``.
"""
from __future__ import annotations

import argparse
import platform
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from energyflow import bench  # noqa: E402
from architectures import EBT, TransformerConfig, TransformerPP  # noqa: E402
from energyflow.inference import Decoding, ThinkingConfig, generate_baseline, generate_ebt, think  # noqa: E402
from energyflow.models import TextEBM  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 256
STEP_SIZE = 100.0


def build(args: argparse.Namespace) -> tuple[TextEBM, TransformerPP]:
    torch.manual_seed(0)
    config = TransformerConfig.from_preset(args.preset, max_seq_len=max(args.seq, args.prompt + args.new))
    return TextEBM(EBT(config), VOCAB).eval(), TransformerPP(config, VOCAB).eval()


def thinking_runs(model: TextEBM, args: argparse.Namespace, num_steps: int) -> dict[str, Callable[[], None]]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq), generator=generator)
    y0 = torch.randn(args.batch, args.seq, VOCAB, generator=generator)
    config = ThinkingConfig(num_steps=num_steps, step_size=STEP_SIZE)

    def cached() -> None:
        with torch.no_grad():
            cache = model.encode(tokens)
        think(lambda y: model.energy(cache, y), y0, config)

    def recompute() -> None:
        think(lambda y: model(tokens, y), y0, config)

    def compiled() -> None:  # cached, the energy-and-gradient through torch.compile (the warm-up compiles)
        with torch.no_grad():
            cache = model.encode(tokens)
        think(lambda y: model.energy(cache, y), y0, replace(config, compile=True))

    return {"cached": cached, "recompute": recompute, "compiled": compiled}


def generation_runs(ebt: TextEBM, baseline: TransformerPP, args: argparse.Namespace) -> dict[str, Callable[[], None]]:
    prompt = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    config = ThinkingConfig(num_steps=args.thinking_steps, step_size=STEP_SIZE)
    runs = {}
    for use_cache in (True, False):
        suffix = "cached" if use_cache else "recompute"
        runs[f"ebt_{suffix}"] = (lambda c=use_cache: generate_ebt(ebt, prompt, args.new, config, Decoding(),
                                                                   generator=torch.Generator().manual_seed(0),
                                                                   use_cache=c))
        runs[f"baseline_{suffix}"] = (lambda c=use_cache: generate_baseline(baseline, prompt, args.new, Decoding(),
                                                                            use_cache=c))
    runs["ebt_compiled"] = lambda: generate_ebt(ebt, prompt, args.new, replace(config, compile=True), Decoding(),
                                                generator=torch.Generator().manual_seed(0))
    return runs


def measure(groups: dict[str, dict[str, Callable[[], None]]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds of every run of every group, repetitions interleaved, variant order alternating."""
    for runs in groups.values():  # warm-up (allocator, thread pools), not recorded
        for run in runs.values():
            run()
    seconds: dict[str, dict[str, list[float]]] = {g: {v: [] for v in runs} for g, runs in groups.items()}
    for rep in range(repeats):
        for group, runs in groups.items():
            names = list(runs) if rep % 2 == 0 else list(reversed(list(runs)))
            for name in names:
                seconds[group][name].append(bench.timed(runs[name]))
        print(f"repetition {rep + 1}/{repeats} done", flush=True)
    return seconds


def summarise(seconds: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict:
    median = {g: {v: statistics.median(s) for v, s in runs.items()} for g, runs in seconds.items()}
    thinking = []
    for k in args.steps:
        cached, full = median[f"thinking_{k}"]["cached"] / k, median[f"thinking_{k}"]["recompute"] / k
        fast = median[f"thinking_{k}"]["compiled"] / k
        thinking.append({"num_steps": k, "cached_ms_per_step": 1000 * cached, "recompute_ms_per_step": 1000 * full,
                         "compiled_ms_per_step": 1000 * fast, "speedup": full / cached,
                         "compiled_speedup_over_cached": cached / fast})
    generation = {name: args.new / value for name, value in median["generation"].items()}
    return {"thinking": thinking, "generation_tokens_per_second": generation, "raw_seconds": seconds}


def write(summary: dict, args: argparse.Namespace) -> None:
    meta = {key: getattr(args, key) for key in ("preset", "seq", "batch", "prompt", "new", "thinking_steps",
                                                 "repeats", "threads")}
    meta.update(torch=torch.__version__, machine=platform.processor() or platform.machine(),
                time_method="median over interleaved repetitions")
    lines = [f"System 2 inference, preset {args.preset}, vocabulary {VOCAB}, {args.threads} threads, torch "
             f"{torch.__version__}, medians of {args.repeats} interleaved repetitions.", "",
             f"Thinking (batch {args.batch}, sequence {args.seq}; the cached time includes encoding the context once):",
             "", "| steps | cached ms/step | recompute ms/step | cached speed-up | compiled ms/step | compiled vs "
             "cached |", "|---|---|---|---|---|---|"]
    for row in summary["thinking"]:
        lines.append(f"| {row['num_steps']} | {row['cached_ms_per_step']:.1f} | {row['recompute_ms_per_step']:.1f} "
                     f"| {row['speedup']:.2f}x | {row['compiled_ms_per_step']:.1f} | "
                     f"{row['compiled_speedup_over_cached']:.2f}x |")
    lines += ["", f"Generation ({args.prompt}-byte prompt, {args.new} new bytes, greedy, batch 1; EBT: "
              f"{args.thinking_steps} thinking steps per token, 1 candidate):", "",
              "| model | cached tokens/s | recompute tokens/s |", "|---|---|---|"]
    rates = summary["generation_tokens_per_second"]
    for model in ("ebt", "baseline"):
        lines.append(f"| {'EBT' if model == 'ebt' else 'Transformer++'} | {rates[f'{model}_cached']:.1f} "
                     f"| {rates[f'{model}_recompute']:.1f} |")
    lines.append(f"| EBT, compiled thinking | {rates['ebt_compiled']:.1f} | - |")
    lines += ["", f"Transformer++ / EBT tokens/s (cached): {rates['baseline_cached'] / rates['ebt_cached']:.1f}x eager, "
              f"{rates['baseline_cached'] / rates['ebt_compiled']:.1f}x with compiled thinking."]
    bench.write(args.out, "inference", {"meta": meta, **summary}, "\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="4xs")
    parser.add_argument("--seq", type=int, default=128, help="thinking: sequence length")
    parser.add_argument("--batch", type=int, default=4, help="thinking: batch size")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 8], help="thinking: numbers of steps")
    parser.add_argument("--prompt", type=int, default=64, help="generation: prompt length")
    parser.add_argument("--new", type=int, default=32, help="generation: new tokens")
    parser.add_argument("--thinking-steps", type=int, default=2, help="generation: EBT steps per token")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for inference.json / .md")
    # One thread by default: on a shared CPU extra intra-op threads mostly spin against other processes.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ebt, baseline = build(args)
    groups = {f"thinking_{k}": thinking_runs(ebt, args, k) for k in args.steps}
    groups["generation"] = generation_runs(ebt, baseline, args)
    write(summarise(measure(groups, args.repeats), args), args)


if __name__ == "__main__":
    main()
