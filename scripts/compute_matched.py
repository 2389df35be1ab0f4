"""EBT thinking against compute-matched Transformer++ test-time compute, on generation.

The EBT spends test-time compute by thinking: more descent steps per token (K) and self-verification over
random starts (N candidates, the lowest final energy kept). The Transformer++'s own lever is best-of-N: draw N
continuations and keep the one it finds most likely (``energyflow.inference.best_of_n_baseline``). Next-byte
loss gives the Transformer++ no such lever (a distribution is one forward pass; there is nothing to pick
from), so the comparison is on generation, where best-of-N applies: each model continues held-out prompts by
``--new`` bytes, both sampling at temperature 1, and is scored against the text's true continuation (the
share of bytes that match, position by position, and the length of the matching prefix).

Compute, counted analytically per prompt in forward passes of one token through the stack (``C``, as in
``scripts/scaling_fit.py``: ``2 N + 2 L S d`` at the mean attended length ``S``):
- Transformer++, best-of-N: ``N (P + M - 1) C`` (the prompt and the continuation, once per sample: each
  sample is its own row with its own KV cache).
- EBT, K steps and N candidates: ``(P + M - 1) C`` for the context stream (the prompt once, then each chosen
  byte appended to the cache) plus ``2 M N K C`` for the thinking: per step and candidate, the prediction
  stream's forward and its backward to the candidate (activation gradients only, no weight gradients: about
  one forward's matrix multiplies). Embeddings, norms and heads are left out of both.
Wall-clock on this CPU (one thread) is measured too.

Runs: every ``PAIR`` directory holds an ``ebt`` and a ``baseline`` run trained alike (a ``compare`` recipe's
output, e.g. ``sweeps/scaling_data/NUM_STEPS=600,seed=0``); with several pairs (seeds), each figure is the mean
over pairs with its standard error. Without any, the quickstart runs are trained into ``runs/quickstart``.

    python scripts/compute_matched.py /work/sweeps/scaling_data/NUM_STEPS=600,seed={0,1,2} \
        --out docs/results_compute_matched.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from energyflow.data import pack, text_files  # noqa: E402
from energyflow.inference import Decoding, best_of_n_baseline, generate_ebt, thinking_config  # noqa: E402
from energyflow.inference.sweep import spread_batches  # noqa: E402
from energyflow.objectives.components import resolve_num_steps  # noqa: E402
from energyflow.runs import load_run  # noqa: E402
from reproduce_thinking import PYTHON_FILES, STDLIB, ensure_runs  # noqa: E402
from energyflow import flops  # noqa: E402

def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"2x1,4x4"`` -> ``[(2, 1), (4, 4)]``: EBT (steps, candidates)."""
    configs = []
    for part in text.split(","):
        steps, _, candidates = part.strip().partition("x")
        try:
            configs.append((int(steps), int(candidates or 1)))
        except ValueError:
            raise SystemExit(f"--ebt {text!r}: each entry is STEPSxCANDIDATES, e.g. 4x1 or 2x4") from None
    return configs


def prompt_sets(validation: torch.Tensor, length: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Name -> ``[--prompts, length]`` windows spread through the set: held-out pydoc, then Python source."""
    def spread(windows: torch.Tensor) -> torch.Tensor:
        return torch.cat(spread_batches(windows[:, :length], 1, args.prompts)).long()

    source = pack(torch.frombuffer(bytearray(text_files([STDLIB / n for n in PYTHON_FILES])), dtype=torch.uint8),
                  length - 1)
    return {"pydoc (held out)": spread(validation), "Python source (stdlib)": spread(source)}


def match_scores(generated: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """Mean share of matching bytes and mean matching-prefix length over prompts."""
    same = generated == truth
    prefix = same.long().cumprod(dim=1).sum(dim=1).double()
    return float(same.double().mean()), float(prefix.mean())


def forward_cost(network, attended: float) -> float:
    """``C`` at the mean attended length (``energyflow.flops.forward_per_token``; no vocabulary matrices)."""
    blocks = sum(p.numel() for p in network.blocks.parameters())
    return flops.forward_per_token(flops.Shape(blocks, network.config.num_layers, network.config.dim, 0, attended))


def evaluate_pair(pair: Path, args: argparse.Namespace, ebt_configs, baseline_samples) -> dict:
    ebt_run, _, _ = load_run(pair / "ebt", device="cpu")
    baseline_run, _, _ = load_run(pair / "baseline", device="cpu")
    task, baseline = ebt_run.task.eval(), baseline_run.task.eval().model
    model, objective = task.model, task.objective
    trained = resolve_num_steps(objective.num_steps, 0, training=False)
    prompt_len, new = args.prompt_len, args.new
    sets = prompt_sets(torch.cat(ebt_run.validation_windows), prompt_len + new, args)
    attended = prompt_len + new / 2
    c_ebt, c_baseline = forward_cost(model.backbone, attended), forward_cost(baseline, attended)
    rows = {}

    def record(key, name, generated, truth, seconds, flops):
        accuracy, prefix = match_scores(generated, truth)
        rows.setdefault(key, {})[name] = {"accuracy": accuracy, "prefix": prefix, "seconds": seconds,
                                          "flops": flops}

    decodings = {"greedy": Decoding(), **{f"T={t:g}": Decoding("sample", temperature=t) for t in args.temperatures}}
    for name, windows in sets.items():
        prompts, truth = windows[:, :prompt_len], windows[:, prompt_len:]
        for key, decoding in decodings.items():
            for samples in ([1] if decoding.strategy == "greedy" else baseline_samples):
                started = time.perf_counter()
                out = best_of_n_baseline(baseline, prompts, new, samples, decoding,
                                         generator=torch.Generator().manual_seed(args.seed))
                record(("baseline", key, samples), name, out.tokens, truth, time.perf_counter() - started,
                       samples * (prompt_len + new - 1) * c_baseline)
            for steps, candidates in ebt_configs:
                config = thinking_config(objective, num_steps=steps, noise_scale=args.noise if candidates > 1 else 0.0)
                started = time.perf_counter()
                out = generate_ebt(model, prompts, new, config, decoding, num_candidates=candidates,
                                   generator=torch.Generator().manual_seed(args.seed),
                                   initial_state=objective.initial_state,
                                   step_index_mode=getattr(objective, "step_index_mode", "per_step"))
                record(("ebt", key, steps, candidates), name, out.tokens, truth, time.perf_counter() - started,
                       ((prompt_len + new - 1) + 2 * new * candidates * steps) * c_ebt)
    return {"rows": rows, "trained_steps": trained, "c": {"ebt": c_ebt, "baseline": c_baseline}}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def label(key) -> str:
    if key[0] == "baseline":
        return f"Transformer++ {key[1]}" + (f", best of {key[2]} by likelihood" if key[2] > 1 else "")
    return f"EBT {key[1]}, {key[2]} step{'s' * (key[2] > 1)}" + (f", best of {key[3]} by energy" if key[3] > 1 else "")


def summarize(results: list[dict], pairs: Sequence[Path], reference_flops: float) -> dict:
    keys = list(results[0]["rows"])
    sets = list(results[0]["rows"][keys[0]])
    table = {}
    for key in keys:
        entry = {"label": label(key), "model": key[0], "decoding": key[1], "flops": results[0]["rows"][key][sets[0]]["flops"] / reference_flops}
        entry["seconds"] = sum(r["rows"][key][s]["seconds"] for r in results for s in sets) / len(results)
        for name in sets:
            for metric in ("accuracy", "prefix"):
                entry[f"{name}|{metric}"] = mean_se([r["rows"][key][name][metric] for r in results])
        table["|".join(map(str, key))] = entry
    return {"pairs": [str(p) for p in pairs], "sets": sets, "table": table}


def report(summary: dict, args: argparse.Namespace, seconds: float) -> str:
    sets = summary["sets"]
    seeds = len(summary["pairs"])
    spread = "mean ± standard error over the pairs (seeds)" if seeds > 1 else "one pair: no spread over seeds"
    lines = ["# EBT thinking against compute-matched Transformer++ best-of-N", "",
             f"`python scripts/compute_matched.py` over {seeds} run pair(s) ({', '.join(summary['pairs'])}), "
             f"{args.prompts} prompts of {args.prompt_len} bytes per set, {args.new} new bytes, both models "
             f"decoding alike (greedy, or sampling at temperature T); {seconds:.0f} s on this CPU. Compute: forward-pass "
             "FLOPs per prompt relative to the Transformer++ decoding once (counted as in the script's docstring); "
             "seconds: generation time summed over the sets (one thread). Scores: the share of generated bytes "
             f"equal to the true continuation, and the length of the matching prefix; {spread}.", "",
             "| decoding | compute (x) | seconds | " + " | ".join(f"{n}: bytes matched | {n}: prefix"
                                                            for n in sets) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(sets)]
    order = lambda e: (e["decoding"] != "greedy", e["decoding"], e["model"], e["flops"])  # noqa: E731
    for entry in sorted(summary["table"].values(), key=order):
        cells = []
        for name in sets:
            for metric, digits in (("accuracy", 3), ("prefix", 2)):
                mean, se = entry[f"{name}|{metric}"]
                cells.append(f"{mean:.{digits}f}" + ("" if math.isnan(se) else f" ± {se:.{digits}f}"))
        lines.append(f"| {entry['label']} | {entry['flops']:.1f} | {entry['seconds']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="*", type=Path, help="directories holding an ebt and a baseline run")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quickstart",
                        help="trained from --recipe when no PAIR is given")
    parser.add_argument("--recipe", default="experiments/quickstart.gin")
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=128, help="prompts per set")
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--new", type=int, default=16, help="bytes generated per prompt")
    parser.add_argument("--ebt", default="1x1,2x1,4x1,8x1,16x1,2x4,4x4", help="EBT STEPSxCANDIDATES list")
    parser.add_argument("--best-of", default="1,2,3,5,9,17,33", help="Transformer++ sample counts")
    parser.add_argument("--temperatures", default="1,0.5", type=lambda text: [float(v) for v in text.split(",")],
                        help="sampling temperatures (both models; greedy always runs too)")
    parser.add_argument("--noise", type=float, default=0.0, help="thinking noise when candidates > 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results_compute_matched.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pairs = list(args.pairs)
    if not pairs:
        ensure_runs(args)
        pairs = [args.runs]
    missing = [p for p in pairs if not all((p / m / "operative_config.gin").is_file() for m in ("ebt", "baseline"))]
    if missing:
        raise SystemExit(f"{missing[0]} does not hold an ebt and a baseline run; give the output directory of a "
                         "compare recipe (e.g. experiments/quickstart.gin)")
    try:
        best_of = [int(v) for v in args.best_of.split(",")]
    except ValueError:
        raise SystemExit(f"--best-of {args.best_of!r}: a comma-separated list of sample counts, e.g. 1,5,9") from None
    started = time.perf_counter()
    results = [evaluate_pair(pair, args, parse_configs(args.ebt), best_of) for pair in pairs]
    greedy = results[0]["rows"][("baseline", "greedy", 1)]
    summary = summarize(results, pairs, next(iter(greedy.values()))["flops"])
    text = report(summary, args, time.perf_counter() - started)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(text)
    return summary


if __name__ == "__main__":
    main()
