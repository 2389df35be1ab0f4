"""The System 2 ablation's thinking gain, in distribution and out of it: for every EBT trial of a sweep
(``recipes/sweeps/system2_ablation.gin``), the loss after 2 and after 16 thinking steps on the four offline text
sets of ``scripts/reproduce_thinking.py`` (held-out pydoc; Python source; ROT13 pydoc; CJK), and the gain
``loss(2) - loss(16)`` (positive: thinking longer helped); mean ± standard error over seeds per variant.

    python scripts/ablation_thinking.py sweeps/system2_ablation --out docs/results_ablation.md
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from energyflow.inference import thinking_config  # noqa: E402
from energyflow.inference.sweep import thinking_sweep  # noqa: E402
from energyflow.runs import load_run  # noqa: E402
from energyflow.sweeps import load_sweep  # noqa: E402
from reproduce_thinking import datasets  # noqa: E402


def trial_losses(run_dir: Path, steps: tuple[int, int], batches: int, batch_size: int) -> dict[str, dict[int, float]]:
    """Set name -> {steps: loss} for one EBT run (one sample, no noise: the plain descent)."""
    result, _, _ = load_run(run_dir, device="cpu")
    task = result.task.eval()
    validation = torch.cat(result.validation_windows)
    args = argparse.Namespace(batches=batches, batch_size=batch_size)
    config = thinking_config(task.objective, num_steps=max(steps))
    out = {}
    for name, windows in datasets(validation, validation.shape[1] - 1, args).items():
        sweep = thinking_sweep(task.model, windows, config, steps=list(steps), samples=[1], device=result.device,
                               initial_state=task.objective.initial_state)
        out[name] = {k: sweep.loss_at(1, k) for k in steps}
    return out


def _mean(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values) / math.sqrt(len(values)):.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--steps", type=int, nargs=2, default=[2, 16])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="markdown (default SWEEP_DIR/thinking.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    manifest, records = load_sweep(args.sweep_dir)
    short, long = args.steps
    by_variant: dict[str, list[dict]] = {}
    for record in records:
        if record.get("status") == "done":
            losses = trial_losses(args.sweep_dir / record["name"], (short, long), args.batches, args.batch_size)
            by_variant.setdefault(record["axes"].get("variant", record["name"]), []).append(losses)
    sets = list(next(iter(by_variant.values()))[0])
    lines = [f"# System 2 ablation: thinking {short} vs {long} steps (`{args.sweep_dir}`)", "",
             f"Loss (nats/byte) after {short} steps, and the gain loss({short}) - loss({long}) (positive: thinking "
             f"longer helped); mean ± standard error over seeds; {args.batches * args.batch_size} windows per set.", "",
             "| variant | seeds | " + " | ".join(f"{s}: loss@{short} | {s}: gain" for s in sets) + " |",
             "|---|---:|" + "---:|---:|" * len(sets)]
    payload = {}
    for variant, trials in by_variant.items():
        cells = []
        for name in sets:
            at_short = [t[name][short] for t in trials]
            gains = [t[name][short] - t[name][long] for t in trials]
            cells += [_mean(at_short), _mean(gains)]
            payload.setdefault(variant, {})[name] = {"loss_short": at_short, "gain": gains}
        lines.append(f"| {variant} | {len(trials)} | " + " | ".join(cells) + " |")
    out = args.out or args.sweep_dir / "thinking.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
