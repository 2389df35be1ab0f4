"""Is the EBT's energy a better uncertainty / out-of-distribution signal than what a Transformer++ gives for free?

On the quickstart runs (``recipes/experiments/quickstart.gin``, trained into ``--runs`` if missing) and the four
offline text sets of ``scripts/reproduce_thinking.py`` (held-out pydoc; Python source; pydoc under ROT13;
Chinese/Japanese/Korean), the same windows scored by:

- EBT: the energy of the observed next byte (``verifier.token_energies``), and the final energy of its own
  prediction after thinking at its trained step count;
- Transformer++ (free, one forward pass): the negative log-likelihood of the observed byte, the entropy of its
  predicted distribution, one minus its maximum probability, and minus the logsumexp of its logits.

Out-of-distribution detection: AUROC of telling each set from held-out pydoc by a window's mean score (higher =
more out of distribution). Uncertainty (held-out pydoc, per byte): Spearman correlation of each score with the
model's own loss on that byte (EBT: its prediction's final energy against its own loss; Transformer++: each
signal against its own NLL; the observed-byte NLL is the loss itself, so it is left out there).
Writes a markdown table (``--out``, default docs/results_uncertainty.md) and prints it.

    python scripts/uncertainty_vs_baseline.py --runs runs/quickstart
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from energyflow.data import to_batch  # noqa: E402
from energyflow.inference import think_tokens, thinking_config  # noqa: E402
from energyflow.objectives.components import resolve_num_steps  # noqa: E402
from energyflow.runs import load_run  # noqa: E402
from energyflow.verifier import auroc, spearman, token_energies  # noqa: E402
from reproduce_thinking import datasets, ensure_runs  # noqa: E402

SIGNALS = ("EBT energy of the observed byte", "Transformer++ NLL of the observed byte", "Transformer++ entropy",
           "Transformer++ 1 - max probability", "Transformer++ -logsumexp(logits)")


def baseline_signals(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position ``[B, L-1]``: the Transformer++'s free uncertainty signals for the next byte."""
    with torch.no_grad():
        logits = model(tokens[:, :-1]).double()
    log_probs = F.log_softmax(logits, dim=-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return {"Transformer++ NLL of the observed byte": nll,
            "Transformer++ entropy": -(log_probs.exp() * log_probs).sum(-1),
            "Transformer++ 1 - max probability": 1.0 - log_probs.exp().amax(-1),
            "Transformer++ -logsumexp(logits)": -torch.logsumexp(logits, dim=-1)}


def evaluate(args: argparse.Namespace) -> dict:
    ebt_dir, baseline_dir = ensure_runs(args)
    ebt_run, _, _ = load_run(ebt_dir, device="cpu")
    baseline_run, _, _ = load_run(baseline_dir, device="cpu")
    task, baseline = ebt_run.task.eval(), baseline_run.task.eval().model
    validation = torch.cat(ebt_run.validation_windows)
    sets = datasets(validation, validation.shape[1] - 1, args)
    scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, batches in sets.items():
        tokens = torch.cat(batches).long()
        per_position = {"EBT energy of the observed byte": token_energies(task.model, tokens).double(),
                        **baseline_signals(baseline, tokens)}
        scores[name] = {signal: values.mean(dim=1) for signal, values in per_position.items()}
    reference = next(iter(sets))
    detection = {name: {signal: auroc(scores[reference][signal], scores[name][signal]) for signal in SIGNALS}
                 for name in list(sets)[1:]}
    # per-byte uncertainty on held-out pydoc: each signal against its own model's loss
    windows = torch.cat(sets[reference])
    batch = to_batch(windows, "cpu")
    steps = resolve_num_steps(task.objective.num_steps, 0, training=False)
    verified = think_tokens(task.model, batch["tokens"], thinking_config(task.objective, num_steps=steps),
                            targets=batch["targets"], initial_state=task.objective.initial_state,
                            generator=torch.Generator().manual_seed(0))
    ebt_loss = verified.thinking.records[-1].flatten()
    free = baseline_signals(baseline, windows.long())
    nll = free.pop("Transformer++ NLL of the observed byte").flatten()
    calibration = {"EBT final energy of its prediction (vs EBT loss)": spearman(verified.energies.flatten(), ebt_loss)}
    calibration.update({f"{signal} (vs Transformer++ NLL)": spearman(values.flatten(), nll)
                        for signal, values in free.items()})
    return {"detection": detection, "calibration": calibration, "windows": {n: sum(len(b) for b in bs)
                                                                            for n, bs in sets.items()},
            "steps": steps, "ebt_loss": float(ebt_loss.mean()), "baseline_loss": float(nll.mean())}


def report(result: dict, seconds: float, args: argparse.Namespace) -> str:
    sets = list(result["detection"])
    lines = ["# Is the EBT's energy a better uncertainty signal than the Transformer++'s own?", "",
             f"`python scripts/uncertainty_vs_baseline.py --runs {args.runs}` ({seconds:.0f} s on this CPU): the "
             f"quickstart EBT and Transformer++ on the same windows ({', '.join(f'{n}: {w}' for n, w in result['windows'].items())}"
             "). Both models are the quickstart's (150 steps, 4xs).", "",
             "## Out-of-distribution detection: AUROC against held-out pydoc (mean score per window)", "",
             "| signal | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for signal in SIGNALS:
        lines.append(f"| {signal} | " + " | ".join(f"{result['detection'][n][signal]:.3f}" for n in sets) + " |")
    lines += ["", "## Uncertainty on held-out pydoc: Spearman correlation with the model's own per-byte loss", "",
              f"EBT loss after {result['steps']} thinking steps {result['ebt_loss']:.4f} nats/byte; Transformer++ NLL "
              f"{result['baseline_loss']:.4f}.", "", "| signal | Spearman |", "|---|---:|"]
    lines += [f"| {signal} | {value:+.3f} |" for signal, value in result["calibration"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quickstart")
    parser.add_argument("--recipe", default="experiments/quickstart.gin")
    parser.add_argument("--bind", action="append", default=[], help="a gin binding for training the runs")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results_uncertainty.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    result = evaluate(args)
    text = report(result, time.perf_counter() - started, args)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
