"""H-Net vs Transformer++ of equal parameter count on the embedded corpus (pydoc topics, bytes).

Both models train with the same optimizer (AdamW (0.9, 0.999), weight decay 0.01, clip 1.0, linear warm-up then
constant learning rate) on the same seeded batches, for the same wall-clock training budget each. Their steps
are interleaved one for one, and each model's clock counts only its own steps, so that contention on a shared
CPU hits both alike. Reported: training bytes per second, the compression the H-Net's router reached (bytes per
chunk = 1 / boundary fraction, training tail and validation), and validation cross-entropy (nats and bits per
byte) of both after the budget. The H-Net is one stage, 1 encoder + 4 main + 1 decoder layers at the baseline's
width; the baseline is 6 layers whose FFN width is chosen to equalise the parameter counts.

Run: ``python benchmarks/hnet.py`` (width 128, sequence 256, batch 16, 150 s each); ``--budget 10`` for a smoke
run. Writes ``benchmarks/results/hnet.json`` and ``hnet.md``.
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import torch

from energyflow import bench  # noqa: E402
from architectures.hnet import HNetConfig, HNetLM  # noqa: E402
from architectures.transformer import TransformerConfig, TransformerPP  # noqa: E402
from energyflow.data import text_data, to_batch  # noqa: E402
from energyflow.tasks import LanguageModelTask  # noqa: E402
from energyflow.tasks import HNetLanguageModelTask  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_tasks(width: int, heads: int, seq: int) -> dict[str, LanguageModelTask]:
    """The H-Net task and a Transformer++ task whose FFN width makes its parameter count the closest."""
    torch.manual_seed(0)
    hnet = HNetLM(HNetConfig(dims=(width, width), num_heads=(heads, heads), encoder_layers=(1,), decoder_layers=(1,),
                             main_layers=4, compression=(6.0,), max_seq_len=seq))
    target = count(hnet)

    def baseline(hidden: int) -> TransformerPP:
        torch.manual_seed(0)
        return TransformerPP(TransformerConfig(dim=width, num_layers=6, num_heads=heads, ffn_hidden=hidden,
                                               max_seq_len=seq), vocab_size=256)

    # Parameters grow by 3 * width * num_layers per unit of FFN width: solve, then build.
    base_hidden = width
    hidden = base_hidden + round((target - count(baseline(base_hidden))) / (3 * width * 6))
    return {"hnet": HNetLanguageModelTask(hnet, ratio_loss_weight=0.03),
            "transformer_pp": LanguageModelTask(baseline(hidden))}


def train_interleaved(tasks: dict, windows: torch.Tensor, *, budget: float, batch: int, lr: float,
                      warmup: int) -> dict[str, dict]:
    """Alternate one step per task until each has spent ``budget`` seconds in its own steps."""
    state = {}
    for name, task in tasks.items():
        optimizer = torch.optim.AdamW(task.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        state[name] = dict(optimizer=optimizer, schedule=schedule, seconds=0.0, steps=0, fractions=[], losses=[],
                           times=[], generator=torch.Generator().manual_seed(0))
    while any(s["seconds"] < budget for s in state.values()):
        for name, task in tasks.items():
            s = state[name]
            if s["seconds"] >= budget:
                continue
            rows = torch.randint(0, windows.shape[0], (batch,), generator=s["generator"])
            data = to_batch(windows[rows])
            outcome = {}

            def train_step(task=task, s=s, data=data) -> None:
                loss, outcome["metrics"] = task.loss(data, step=s["steps"], generator=s["generator"])
                s["optimizer"].zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(task.parameters(), 1.0)
                s["optimizer"].step()
                s["schedule"].step()

            s["times"].append(bench.timed(train_step))
            metrics = outcome["metrics"]
            s["seconds"] += s["times"][-1]
            s["steps"] += 1
            s["losses"].append(float(metrics["loss"]))
            if "boundary_fraction_stage0" in metrics:
                s["fractions"].append(float(metrics["boundary_fraction_stage0"]))
    return state


def evaluate(task: LanguageModelTask, windows: torch.Tensor, batch: int) -> dict[str, float]:
    task.eval()
    parts = [task.evaluate(to_batch(windows[i : i + batch])) for i in range(0, windows.shape[0], batch)]
    task.train()
    return {name: statistics.mean(float(p[name]) for p in parts) for name in parts[0]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per model")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--validation-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for hnet.json / hnet.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = text_data(seq_len=args.seq)
    tasks = build_tasks(args.width, args.heads, args.seq)
    state = train_interleaved(tasks, data.train, budget=args.budget, batch=args.batch, lr=args.lr, warmup=args.warmup)
    validation = data.validation[: args.validation_windows]
    rows = {name: summarize(task, state[name], evaluate(task, validation, args.batch), args)
            for name, task in tasks.items()}
    result = {"settings": vars(args), "machine": bench.machine(), "results": rows}
    write(result)
    return result


def summarize(task: LanguageModelTask, state: dict, metrics: dict[str, float], args) -> dict:
    """One row of the table (and the H-Net's bytes-per-chunk trace, every 10th step)."""
    late = state["times"][len(state["times"]) // 2:]
    row = {"parameters": count(task), "steps": state["steps"], "train_seconds": round(state["seconds"], 1),
           "train_bytes_per_second": round(state["steps"] * args.batch * args.seq / state["seconds"], 1),
           # The H-Net's cost follows its compression, which moves early in training: the second half of the
           # steps is closer to the steady state.
           "train_bytes_per_second_second_half": round(len(late) * args.batch * args.seq / sum(late), 1),
           "final_train_loss": round(statistics.mean(state["losses"][-20:]), 4),
           "validation_loss": round(metrics["loss"], 4),
           "validation_bits_per_byte": round(metrics["loss"] / math.log(2), 4)}
    if state["fractions"]:
        row["train_bytes_per_chunk"] = round(1 / statistics.mean(state["fractions"][-20:]), 2)
        row["validation_bytes_per_chunk"] = round(1 / metrics["boundary_fraction_stage0"], 2)
        row["bytes_per_chunk_every_10_steps"] = [round(1 / f, 2) for f in state["fractions"][::10]]
    return row


def write(result: dict) -> None:
    columns = ["parameters", "steps", "train_bytes_per_second", "train_bytes_per_second_second_half",
               "train_bytes_per_chunk",
               "validation_bytes_per_chunk", "final_train_loss", "validation_loss", "validation_bits_per_byte"]
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in result["results"].items():
        lines.append(f"| {name} | " + " | ".join(str(row.get(c, "-")) for c in columns) + " |")
    hnet, baseline = result["results"]["hnet"], result["results"]["transformer_pp"]
    ratio = hnet["train_bytes_per_second"] / baseline["train_bytes_per_second"]
    late_ratio = hnet["train_bytes_per_second_second_half"] / baseline["train_bytes_per_second_second_half"]
    settings = result["settings"]
    text = (f"# H-Net vs Transformer++ (equal parameters), {settings['budget']:.0f} s of training each\n\n"
            f"width {settings['width']}, sequence {settings['seq']} bytes, batch {settings['batch']}, "
            f"{settings['threads']} threads, pydoc corpus; validation on {settings['validation_windows']} windows.\n\n"
            + "\n".join(lines) + f"\n\nH-Net / Transformer++ training throughput: {ratio:.2f}x overall, "
            f"{late_ratio:.2f}x over the second half of the steps.\n"
            f"H-Net bytes per chunk every 10 steps: {hnet.get('bytes_per_chunk_every_10_steps')}\n")
    bench.write(result["settings"].get("out") or RESULTS, "hnet", result, text)
    print(text)


if __name__ == "__main__":
    main()
