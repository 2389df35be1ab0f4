"""The checks to run on the first CUDA device, in one short script (sized for a 15-minute device budget).

1. ``device``: name, capability, memory, torch and CUDA versions.
2. ``second_order``: the EBT's training loss and outer gradients (second-order terms included) on the device
   against the CPU, float64, one batch of the System 1 setup: equal to rounding (relative 1e-9), so no CUDA
   kernel on the training path drops a second-order term (a fused kernel without a double backward would
   raise instead).
3. ``bf16``: the quickstart EBT (debug size) 20 steps with the trainer's bf16 autocast against float32 on the
   device: the first loss within 1%, the mean of the last five within 10% (the CPU test's tolerances).
4. ``train_step``: ``benchmarks/train_step.py --device cuda`` (the real trainer, bf16 autocast): seconds per
   step, tokens/s and peak memory, EBT vs Transformer++, and the trainer's own MFU against the device's peak.
5. ``thinking``: seconds per thinking step on the device, eager and compiled (``ThinkingConfig(compile=True)``).

``--device cpu --tiny`` runs the same checks at toy sizes on the CPU (what the test suite does, so the script
cannot rot while no GPU is lent). Writes ``benchmarks/results/gpu_suite.json`` and ``.md`` (``--out``).

    python benchmarks/gpu_suite.py                   # on the GPU machine
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def _ebt_task(size: str, seq: int):
    from architectures import EBT, TransformerConfig
    from energyflow.models import TextEBM
    from energyflow.objectives import EBTObjective, RandomNoise
    from energyflow.tasks import EBTLanguageModelTask
    from samplers import GradientDescent

    torch.manual_seed(0)
    config = TransformerConfig.from_preset(size, max_seq_len=seq)
    return EBTLanguageModelTask(TextEBM(EBT(config, context_attention="fused"), 256),
                                EBTObjective(GradientDescent(500.0, learnable=True), num_steps=2,
                                             initial_state=RandomNoise(1.0)))


def second_order(device: torch.device, tiny: bool) -> dict:
    size, seq, batch = ("4xs", 16, 2) if tiny else ("xxs", 128, 4)
    windows = torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    results = {}
    for where in ("cpu", device.type):
        task = _ebt_task(size, seq).double().to(where)
        batch_ = {"tokens": windows[:, :-1].to(where), "targets": windows[:, 1:].to(where)}
        loss, _ = task.loss(batch_, step=0, generator=torch.Generator(device=where).manual_seed(0))
        loss.backward()
        results[where] = (float(loss.detach()), torch.cat([p.grad.flatten().cpu() for p in task.parameters()
                                                  if p.grad is not None]))
    reference, other = results["cpu"], results[device.type]
    relative = float((reference[1] - other[1]).abs().max() / reference[1].abs().max())
    return {"loss_cpu": reference[0], "loss_device": other[0], "max_relative_gradient_difference": relative,
            "passed": abs(reference[0] - other[0]) <= 1e-9 * abs(reference[0]) and relative <= 1e-9}


def bf16(device: torch.device, tiny: bool) -> dict:
    import gin

    from energyflow.configurables import parse_recipe

    runs = {}
    for name, autocast in (("float32", "off"), ("bf16", "bf16")):
        with tempfile.TemporaryDirectory() as out:
            gin.clear_config()
            parse_recipe("experiments/ebt_system1_bf16_debug.gin", [
                "Trainer.progress = False", f"OUT_DIR = '{out}'", f"Trainer.device = '{device.type}'",
                f"Trainer.autocast = '{autocast}'", *(["NUM_STEPS = 6"] if tiny else [])])
            gin.get_configurable("launch")()
            gin.clear_config()
            runs[name] = [json.loads(line)["loss"] for line in (Path(out) / "ebt" / "history.jsonl").read_text()
                          .splitlines()]
    tail = {n: statistics.mean(v[-5:]) for n, v in runs.items()}
    first = abs(runs["bf16"][0] - runs["float32"][0]) / abs(runs["float32"][0])
    end = abs(tail["bf16"] - tail["float32"]) / abs(tail["float32"])
    return {"losses": runs, "first_step_relative": first, "last_five_relative": end,
            "passed": first <= 0.01 and end <= 0.10}


def train_step(device: torch.device, tiny: bool, out: Path) -> dict:
    script = Path(__file__).resolve().parent / "train_step.py"
    command = [sys.executable, str(script), "--device", device.type, "--out", str(out)]
    command += ["--size", "4xs", "--seq-len", "16", "--batch-size", "2", "--rounds", "2"] if tiny else ["--rounds", "30"]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    report = json.loads((out / f"train_step_{device.type}.json").read_text())["report"]
    return {"seconds": time.perf_counter() - started, "report": report}


def thinking(device: torch.device, tiny: bool) -> dict:

    from architectures import EBT, TransformerConfig
    from energyflow.inference import ThinkingConfig, think
    from energyflow.models import TextEBM

    size, seq, batch, steps = ("4xs", 16, 2, 2) if tiny else ("xxs", 256, 8, 8)
    torch.manual_seed(0)
    model = TextEBM(EBT(TransformerConfig.from_preset(size, max_seq_len=seq)), 256).eval().to(device)
    tokens = torch.randint(0, 256, (batch, seq), device=device)
    y0 = torch.randn(batch, seq, 256, device=device)
    with torch.no_grad():
        cache = model.encode(tokens)
    seconds = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        config = ThinkingConfig(num_steps=steps, step_size=100.0, compile=compiled)
        think(lambda y: model.energy(cache, y), y0, config)  # warm-up (and the one-off compile)
        times = []
        for _ in range(3 if tiny else 10):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            think(lambda y: model.energy(cache, y), y0, config)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) / steps)
        seconds[name] = statistics.median(times)
    from energyflow.inference.compiled import compile_status

    return {"ms_per_step": {k: 1000 * v for k, v in seconds.items()},
            "compiled_speedup": seconds["eager"] / seconds["compiled"], "compile": compile_status()}


def markdown(result: dict) -> str:
    info = result["device"]
    lines = [f"# GPU suite on {info.get('name')} ({info['device']}, torch {info['torch']})", ""]
    checks = result["checks"]
    for name, value in checks.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"- **{name}**: failed to run: {value['error']}")
    so, bf = checks.get("second_order", {}), checks.get("bf16", {})
    if "passed" in so:
        lines.append(f"- second order (float64, device vs CPU): max relative gradient difference "
                     f"{so['max_relative_gradient_difference']:.2e} -> {'pass' if so['passed'] else 'FAIL'}")
    if "passed" in bf:
        lines.append(f"- bf16 vs float32: first step {bf['first_step_relative']:.2%}, last five "
                     f"{bf['last_five_relative']:.2%} -> {'pass' if bf['passed'] else 'FAIL'}")
    step = checks.get("train_step", {}).get("report")
    if step and "ratio_ebt_cached_to_tpp" in step:
        lines.append(f"- train step: EBT / Transformer++ {step['ratio_ebt_cached_to_tpp']:.2f}x")
    think_ = checks.get("thinking", {})
    if "ms_per_step" in think_:
        lines.append(f"- thinking: eager {think_['ms_per_step']['eager']:.2f} ms/step, compiled "
                     f"{think_['ms_per_step']['compiled']:.2f} ms/step ({think_['compiled_speedup']:.2f}x; "
                     f"{think_['compile']})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU smoke run of the tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run on the GPU machine, or --device cpu --tiny")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": device_info(device), "checks": {}}
    for name, check in (("second_order", lambda: second_order(device, args.tiny)),
                        ("bf16", lambda: bf16(device, args.tiny)),
                        ("train_step", lambda: train_step(device, args.tiny, args.out)),
                        ("thinking", lambda: thinking(device, args.tiny))):
        started = time.perf_counter()
        try:
            result["checks"][name] = check()
        except Exception as error:  # noqa: BLE001 - one failed check must not lose the others' numbers
            result["checks"][name] = {"error": f"{type(error).__name__}: {error}"}
        result["checks"][name]["wall_seconds"] = time.perf_counter() - started
        (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=2, default=str))
    from energyflow import bench

    bench.write(args.out, "gpu_suite", result, markdown(result), device=device)
    print(markdown(result))
    return 0 if all("error" not in c and c.get("passed", True) for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
