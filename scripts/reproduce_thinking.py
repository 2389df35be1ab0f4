"""Small reproduction of the paper's System 2 claims: do thinking longer and self-verification help, and
does the gain grow as text moves out of distribution?

Trains the quickstart models (``recipes/experiments/quickstart.gin``: a 4xs EBT and Transformer++ on the
pydoc corpus) into ``--runs`` unless both runs are already there, then evaluates on four offline text sets,
from in-distribution to far out of it:

1. held-out pydoc text (the runs' validation split);
2. Python source code from the standard library on disk;
3. the held-out pydoc text under ROT13 (same bytes-per-letter statistics, scrambled words);
4. Chinese, Japanese and Korean text (the UTF-8 files of CPython's ``test/cjkencodings``, if installed).

For each: the Transformer++ loss (how out-of-distribution the set is for a feed-forward model), the EBT
loss after 1..K thinking steps and with best-of-N self-verification, the AUROC of telling the set from
held-out pydoc text by the mean energy of its observed bytes, and (in distribution) the Spearman
correlation of a prediction's final energy with its loss. Writes ``docs/results.md`` and a PNG beside it.

    python scripts/reproduce_thinking.py            # trains runs/quickstart if needed (a few CPU minutes)
    python scripts/reproduce_thinking.py --runs runs/quickstart_logits --bind "DESCENT_SPACE = 'logits'" \
        --out docs/results_logits.md                # the logit-space descent rule instead of the paper's
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import torch

SWEEPS_MARKER = "<!-- sweeps: kept when this script rewrites the file -->"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from energyflow import plots  # noqa: E402
from energyflow.data import pack, text_files, to_batch  # noqa: E402
from energyflow.runs import load_run  # noqa: E402
from energyflow.inference import think_tokens, thinking_config  # noqa: E402
from energyflow.inference.sweep import baseline_loss, spread_batches, thinking_sweep  # noqa: E402
from energyflow.objectives.components import resolve_num_steps  # noqa: E402
from energyflow.verifier import auroc, byte_pieces, spearman, token_energies, write_html  # noqa: E402

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PYTHON_FILES = ["argparse.py", "textwrap.py", "json/decoder.py", "json/encoder.py", "fractions.py", "shlex.py"]


def ensure_runs(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(ebt, baseline)`` run directories, training the quickstart recipe into ``--runs`` if they are missing."""
    ebt, baseline = args.runs / "ebt", args.runs / "baseline"
    if not all((run / "operative_config.gin").is_file() for run in (ebt, baseline)):
        print(f"training {args.recipe} into {args.runs} ...", flush=True)
        command = [sys.executable, "-m", "energyflow.cli", "train", args.recipe, "--out", str(args.runs),
                   "--bind", "Trainer.progress = False", *(part for b in args.bind for part in ("--bind", b))]
        subprocess.run(command, check=True, cwd=ROOT)
    return ebt, baseline


def rot13(windows: torch.Tensor) -> torch.Tensor:
    """ROT13 of the ASCII letters in uint8 windows (every other byte unchanged)."""
    table = torch.arange(256, dtype=torch.uint8)
    for first in (ord("a"), ord("A")):
        table[first:first + 26] = torch.roll(torch.arange(first, first + 26, dtype=torch.uint8), -13)
    return table[windows.long()]


def datasets(validation: torch.Tensor, seq_len: int, args: argparse.Namespace) -> dict[str, list[torch.Tensor]]:
    """Name -> ``--batches`` batches of ``--batch-size`` uint8 windows spread through the set, in-distribution first."""
    def spread(windows: torch.Tensor) -> list[torch.Tensor]:
        return spread_batches(windows, args.batches, args.batch_size)

    def from_files(paths):
        return spread(pack(torch.frombuffer(bytearray(text_files(paths)), dtype=torch.uint8), seq_len))

    sets = {"pydoc (held out)": spread(validation),
            "Python source (stdlib)": from_files([STDLIB / name for name in PYTHON_FILES])}
    sets["pydoc, ROT13"] = [rot13(batch) for batch in sets["pydoc (held out)"]]
    cjk = sorted((STDLIB / "test" / "cjkencodings").glob("*-utf8.txt"))
    if cjk:
        sets["Chinese/Japanese/Korean"] = from_files(cjk)
    else:
        print("CPython's test/cjkencodings is not installed here: skipping the non-English set", flush=True)
    return sets


def calibration(model, windows: torch.Tensor, config, initial_state, device, html_path: Path) -> float:
    """Spearman correlation, over tokens, of the chosen prediction's final energy with its loss; writes the
    first window coloured by those energies to ``html_path``."""
    batch = to_batch(windows, device)
    verified = think_tokens(model, batch["tokens"], config, targets=batch["targets"], initial_state=initial_state,
                            generator=torch.Generator(device=device).manual_seed(0))
    # Byte 0 is context only; byte i+1 takes the energy of the prediction made at position i.
    values = [float("nan")] + verified.energies[0].tolist()
    write_html(html_path, byte_pieces(windows[0].tolist(), values),
               title="EBT energy of its own prediction for each held-out byte (quickstart model)")
    return spearman(verified.energies.flatten(), verified.thinking.records[-1].flatten())


def adaptive(args: argparse.Namespace, task, batches: list[torch.Tensor], config, device) -> dict:
    """Adaptive compute against the fixed budget of ``max(steps)`` steps (one sample): loss, mean steps, seconds."""
    out = {}
    for name, tolerance in (("fixed", None), ("adaptive", args.tolerance)):
        started = time.perf_counter()
        run_config = replace(config, energy_tolerance=tolerance, check_every=4 if tolerance else None)
        sweep = thinking_sweep(task.model, batches, run_config, steps=[config.num_steps], samples=[1], device=device,
                               initial_state=task.objective.initial_state)
        out[name] = {"loss": sweep.loss_at(1, config.num_steps), "mean_steps": sweep.mean_steps[1],
                     "seconds": time.perf_counter() - started}
    return out


def evaluate(args: argparse.Namespace, ebt_dir: Path, baseline_dir: Path) -> dict:
    ebt_run, _, ebt_step = load_run(ebt_dir, device="cpu")
    baseline_run, _, _ = load_run(baseline_dir, device="cpu")
    task, baseline = ebt_run.task.eval(), baseline_run.task.eval().model
    validation = torch.cat(ebt_run.validation_windows)
    sets = datasets(validation, validation.shape[1] - 1, args)
    train_steps = resolve_num_steps(task.objective.num_steps, 0, training=False)
    args.steps = sorted(set(args.steps) | {1, train_steps})  # the table reports both
    config = thinking_config(task.objective, num_steps=max(args.steps), noise_scale=args.noise)
    device = ebt_run.device
    rows, energies = {}, {}
    for name, batches in sets.items():
        started = time.perf_counter()
        sweep = thinking_sweep(task.model, batches, config, steps=args.steps, samples=args.samples, device=device,
                               initial_state=task.objective.initial_state)
        sweep.baseline_loss = baseline_loss(baseline, batches, device)
        energies[name] = token_energies(task.model, torch.cat(batches).long().to(device)).mean(dim=1)
        rows[name] = {"sweep": sweep, "auroc": auroc(energies[next(iter(sets))], energies[name]),
                      **adaptive(args, task, batches, config, device)}
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)
    in_distribution = torch.cat(sets[next(iter(sets))])
    config_train = thinking_config(task.objective, num_steps=train_steps, noise_scale=args.noise)
    spearman_value = calibration(task.model, in_distribution, config_train, task.objective.initial_state, device,
                                 args.out.with_name(f"{args.out.stem}_uncertainty.html"))
    return {"rows": rows, "train_steps": train_steps, "spearman": spearman_value, "ebt_step": ebt_step,
            "descent": task.describe()["descent"],
            "step_size": float(config.step_size.mean()) if isinstance(config.step_size, torch.Tensor)
            else float(config.step_size)}


def gain(before: float, after: float) -> float:
    """Loss reduction in percent of ``before`` (positive = better)."""
    return 100.0 * (before - after) / before


def paired_gain(sweep, before: tuple[int, int], after: tuple[int, int]) -> str:
    """``+x.x% ± s.e.``: loss reduction from ``before`` to ``after`` ((samples, steps) each), in percent of the
    loss at ``before``, with the standard error of the paired per-window differences."""
    mean, standard_error = sweep.paired_difference(before, after)
    scale = 100.0 / sweep.loss_at(*before)
    return f"{mean * scale:+.1f}% ± {standard_error * scale:.1f}"


def report(args: argparse.Namespace, result: dict, seconds: float) -> str:
    """The markdown page: set-up, one table row per data set, generated sentences, the plot."""
    k, n, t = max(args.steps), max(args.samples), result["train_steps"]
    lines = ["# Thinking at quickstart scale: in-distribution vs out-of-distribution text", "",
             f"Produced by `python scripts/reproduce_thinking.py` in {seconds / 60:.1f} minutes on CPU "
             f"({time.strftime('%Y-%m-%d')}). Models: `{args.recipe}` (4xs EBT, checkpoint step "
             f"{result['ebt_step']}, and the Transformer++ trained identically). Each set: "
             f"{args.batches * args.batch_size} windows spread through it, bytes, losses in nats per byte. EBT "
             f"thinking: gradient descent from random logits with the learned step size {result['step_size']:.2f} "
             f"and the descent rule it trained with (`{result['descent']}`; docs/fidelity.md), "
             f"Langevin noise {args.noise}; it trained with {t} steps. Self-verification: the lowest final energy "
             "of N random starts, per position. Gains: loss reduction in percent, ± the standard error of the paired "
             "per-window differences (windows are the independent units). AUROC: telling the set from held-out pydoc "
             "text by the mean energy of its observed bytes (1 = perfectly separated, 0.5 = chance).", "",
             f"| data | Transformer++ | EBT, 1 step | EBT, {t} steps | EBT, {k} steps | EBT, {k} steps, best of {n} "
             f"| thinking gain ({k} vs {t} steps) | self-verification gain | AUROC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        sweep = row["sweep"]
        trained, longer, verified = sweep.loss_at(1, t), sweep.loss_at(1, k), sweep.loss_at(n, k)
        lines.append(f"| {name} | {sweep.baseline_loss:.3f} | {sweep.loss_at(1, 1):.3f} | {trained:.3f} | "
                     f"{longer:.3f} | {verified:.3f} | {paired_gain(sweep, (1, t), (1, k))} | "
                     f"{paired_gain(sweep, (1, k), (n, k))} | {row['auroc']:.3f} |")
    lines += ["", *adaptive_table(args, result, k)]
    stem = args.out.stem
    lines += ["", *sentences(result, t, k, n, stem), "",
              f"![EBT loss change vs thinking steps]({stem}_thinking.png)", ""]
    return "\n".join(lines)


def adaptive_table(args: argparse.Namespace, result: dict, k: int) -> list[str]:
    lines = [f"Adaptive compute (one sample): each position stops once its energy changes by less than "
             f"{args.tolerance} in a step (the loop ends when all have; checked every 4 steps), against the fixed "
             f"budget of {k} steps. Seconds are wall-clock on a shared CPU, measured side by side.", "",
             "| data | fixed: loss | fixed: steps | fixed: s | adaptive: loss | adaptive: mean steps | adaptive: s |",
             "|---|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        fixed, adapt = row["fixed"], row["adaptive"]
        lines.append(f"| {name} | {fixed['loss']:.3f} | {fixed['mean_steps']:.1f} | {fixed['seconds']:.1f} | "
                     f"{adapt['loss']:.3f} | {adapt['mean_steps']:.1f} | {adapt['seconds']:.1f} |")
    return lines


def sentences(result: dict, t: int, k: int, n: int, stem: str) -> list[str]:
    """Plain statements of what the numbers say, written from the numbers (so they hold either way)."""
    rows = result["rows"]
    names = list(rows)
    think = {name: gain(rows[name]["sweep"].loss_at(1, t), rows[name]["sweep"].loss_at(1, k)) for name in names}
    verify = {name: gain(rows[name]["sweep"].loss_at(1, k), rows[name]["sweep"].loss_at(n, k)) for name in names}
    by_ood = sorted(names, key=lambda name: rows[name]["sweep"].baseline_loss)
    grows = all(think[a] <= think[b] for a, b in zip(by_ood, by_ood[1:]))
    return [
        "- The paper reports that the gain from thinking grows as data moves out of distribution; these rows test "
        "that at quickstart scale (4xs, minutes of CPU training), far below the paper's.",
        f"- Ordered by the Transformer++ loss (how far out of distribution a set is): {', '.join(by_ood)}.",
        f"- Thinking {k} instead of {t} steps changed the EBT loss by " +
        ", ".join(f"{think[name]:+.1f}% ({name})" for name in by_ood) +
        f"; the gain {'grows' if grows else 'does not grow monotonically'} with the Transformer++ loss.",
        f"- Best of {n} by energy changed it by a further " +
        ", ".join(f"{verify[name]:+.1f}% ({name})" for name in by_ood) + ".",
        f"- In distribution, the Spearman correlation between a prediction's final energy and its loss "
        f"({t} steps, one sample) is {result['spearman']:+.3f}; `{stem}_uncertainty.html` shows one held-out window "
        "coloured by those energies.",
    ]


def plot(args: argparse.Namespace, result: dict, path: Path) -> Path:
    """Loss change (%) relative to the training step count, per data set, against thinking steps (1 sample)."""
    t = result["train_steps"]
    series = {name: [gain(row["sweep"].loss_at(1, t), row["sweep"].loss_at(1, k)) for k in args.steps]
              for name, row in result["rows"].items()}
    return plots.line_plot(path, args.steps, series, xlabel="thinking steps",
                           ylabel=f"EBT loss reduction vs {t} steps (%)", reference=("no change", 0.0),
                           title="Thinking gains by data set (1 sample)", log_x=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="experiments/quickstart.gin")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "quickstart", help="reused if trained")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--noise", type=float, default=0.0, help="Langevin noise at inference")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="adaptive compute: energy-change tolerance")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--bind", action="append", default=[], help="a gin binding for training the runs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the shared CPU: extra threads only contend
    started = time.perf_counter()
    ebt_dir, baseline_dir = ensure_runs(args)
    result = evaluate(args, ebt_dir, baseline_dir)
    plot(args, result, args.out.with_name(f"{args.out.stem}_thinking.png"))
    kept = ""  # the sweeps' section (written by hand from `energyflow report`) survives a rerun of this script
    if args.out.is_file() and SWEEPS_MARKER in args.out.read_text():
        kept = "\n" + args.out.read_text()[args.out.read_text().index(SWEEPS_MARKER):]
    args.out.write_text(report(args, result, time.perf_counter() - started) + kept)
    print(args.out.read_text())


if __name__ == "__main__":
    main()
