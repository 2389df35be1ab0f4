"""The checks and measurements to run on the first CUDA device, in one script that finishes within 8 minutes.

1. ``device``: name, capability, memory, torch and CUDA versions, the peak the MFU is taken against.
2. ``second_order``: the EBT's training loss and outer gradients (second-order terms included) on the device
   against the CPU, float64, one batch of the System 1 setup: equal to rounding (relative 1e-9), so no CUDA
   kernel on the training path drops a second-order term (a fused kernel without a double backward would
   raise instead).
3. ``bf16``: the quickstart EBT (debug size) 20 steps with the trainer's bf16 autocast against float32 on the
   device: the first loss within 1%, the mean of the last five within 10% (the CPU test's tolerances).
4. ``train_matrix``: the optimizer step (loss, backward, clipping, AdamW: ``benchmarks/train_step.py``'s step) of
   the EBT (System 1, 2 descent steps, the fused context stream) and the Transformer++ (fused attention), for
   every size (xxs, small) x sequence (256, 1024) x precision (float32, bf16 autocast) at batch 8, the two
   models' steps interleaved round by round: seconds per step, tokens/s, model FLOPs per step
   (``energyflow.flops``), MFU against the device's bf16 dense peak (``energyflow.flops.CUDA_PEAKS``; float32
   rows against the same peak) and peak memory (``max_memory_allocated``).
5. ``largest_batch``: per model x size x sequence (bf16 autocast, the trainer's CUDA default), the largest
   power-of-two batch whose optimizer step fits in device memory (doubling from 8 until out-of-memory, capped at
   ``2^20`` tokens a batch), with that batch's step time, tokens/s, MFU and peak memory.
6. ``train_step``: ``benchmarks/train_step.py``'s trainer report (the real ``Trainer``, bf16 autocast on CUDA; xxs,
   sequence 256, batch 8, 30 steps): step time, tokens/s, MFU and peak memory of both models.
7. ``thinking``: seconds per thinking step, eager and compiled (``ThinkingConfig(compile=True)``).
8. ``generation``: tokens/s of the EBT (2 thinking steps per token; eager and compiled) and the Transformer++,
   with their KV caches, batch 1.
9. ``hmc``: ``samplers.HMC`` (its default ChEES warmup, pooled mass, shared step size) with 65,536 chains on the
   100-d ill-conditioned Gaussian of ``benchmarks/sampler_speed.py``, eager and with ``samplers.compile_energy``:
   ESS and ESS of the squared draws per second (minimum over coordinates) and per gradient.

Every check is timed; a check that fails records its error and the others still run. Once the suite has used its
time budget (``--budget-seconds``, default 420) the largest-batch search stops where it is and says so.
``--smoke`` runs every check at toy sizes on the CPU in under a minute (``tests/benchmarks/test_gpu_suite.py``),
so that the script cannot rot while no GPU is lent; its compiled paths go through torch.compile's ``aot_eager``
backend (the same graph capture, no code generation: ``samplers.energy.compile_backend``), since generating CPU
kernels from cold caches alone takes over a minute here. Writes ``gpu_suite.json`` and ``gpu_suite.md`` (``--out``,
default ``benchmarks/results``).

    python benchmarks/gpu_suite.py                   # on the GPU machine
    python benchmarks/gpu_suite.py --smoke --out /tmp/smoke
    bash benchmarks/gpu_device.sh run                # on the workplace's GPU machine (see that script)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from energyflow import bench, flops
from samplers.energy import compile_backend

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent

FULL = {"sizes": ("xxs", "small"), "seqs": (256, 1024), "batch": 8, "rounds": 5, "warmup": 2,
        "search_start": 8, "max_tokens": 2**20,
        "think": ("xxs", 256, 8, 8), "generate": ("xxs", 64, 32), "hmc": (65536, 200, 200)}
SMOKE = {"sizes": ("4xs",), "seqs": (16,), "batch": 2, "rounds": 1, "warmup": 1,
         "search_start": 2, "max_tokens": 64,
         "think": ("4xs", 16, 2, 2), "generate": ("4xs", 8, 4), "hmc": (64, 30, 30)}
MODELS = {"transformer_pp": "transformer_pp_fused", "ebt": "ebt_cached"}  # suite name -> train_step.py variant


def _train_step_module():
    """``benchmarks/train_step.py`` as a module (its task builders and optimizer step), without ``sys.path``."""
    spec = importlib.util.spec_from_file_location("energyflow_bench_train_step", HERE / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda)
    else:
        info.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    info["peak_flops"] = flops.device_peak(device)
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


class _Step:
    """One model's optimizer step on the device, its loss under bf16 autocast or not (as the trainer does)."""

    def __init__(self, train_step, model: str, size: str, seq: int, device: torch.device, precision: str) -> None:
        self.task = train_step.build_task(MODELS[model], size, seq).to(device)
        groups = train_step.param_groups(self.task.named_parameters(), weight_decay=0.01,
                                         lr_multipliers=self.task.lr_multipliers(),
                                         no_weight_decay=self.task.no_weight_decay())
        self.optimizer = train_step.build_optimizer(groups, learning_rate=1e-3, betas=(0.9, 0.999))
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.device, self.autocast = device, precision == "bf16"
        self.flops_per_token = self.task.train_flops_per_token(seq)  # energyflow.flops, as the trainer logs it

    def __call__(self, batch, index: int) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss, _ = self.task.loss(batch, step=index, generator=self.generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.task.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _random_batches(seq: int, batch: int, count: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, 256, (batch, seq + 1), generator=generator) for _ in range(count)]
    return [{"tokens": w[:, :-1].to(device), "targets": w[:, 1:].to(device)} for w in windows]


def _rates(seconds: float, tokens: int, flops_per_token: float, peak) -> dict:
    model_flops = flops_per_token * tokens
    return {"step_seconds": seconds, "tokens_per_second": tokens / seconds, "model_flops_per_step": model_flops,
            "mfu": model_flops / seconds / peak if peak else None}


def train_matrix(device: torch.device, settings: dict) -> dict:
    train_step, peak, rows = _train_step_module(), flops.device_peak(device), []
    batch = settings["batch"]
    for size in settings["sizes"]:
        for seq in settings["seqs"]:
            for precision in ("float32", "bf16"):
                steps = {m: _Step(train_step, m, size, seq, device, precision) for m in MODELS}
                data = _random_batches(seq, batch, settings["warmup"] + settings["rounds"], device)
                memory = {m: bench.peak_memory(lambda m=m: steps[m](data[0], 0), device) for m in MODELS}
                seconds = bench.medians(bench.interleaved_steps(steps, data, warmup=settings["warmup"], device=device))
                for model in MODELS:
                    rows.append({"model": model, "size": size, "seq": seq, "precision": precision, "batch": batch,
                                 **_rates(seconds[model], batch * seq, steps[model].flops_per_token, peak),
                                 "peak_memory_bytes": memory[model]})
                rows[-1]["ebt_over_transformer_pp"] = seconds["ebt"] / seconds["transformer_pp"]
                steps = data = None  # free this configuration's tensors before the next
                _free(device)
    return {"rows": rows, "peak_flops": peak}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def search_largest(fits, start: int, limit: int, deadline: float) -> dict:
    """The largest power-of-two batch from ``start`` (doubling, at most ``limit``) for which ``fits(batch)``
    returns a result instead of raising out-of-memory; stops early, and says so, after ``deadline``
    (``time.perf_counter()``). Returns {"largest": batch or None, "result": fits' result there, "stopped": why}."""
    largest, result, batch = None, None, start
    while batch <= limit:
        if time.perf_counter() > deadline:
            return {"largest": largest, "result": result, "stopped": "time budget"}
        try:
            out = fits(batch)
        except Exception as error:  # noqa: BLE001 - only out-of-memory ends the search quietly
            if not _out_of_memory(error):
                raise
            return {"largest": largest, "result": result, "stopped": f"out of memory at batch {batch}"}
        largest, result, batch = batch, out, batch * 2
    return {"largest": largest, "result": result, "stopped": f"cap of {limit} sequences reached"}


def largest_batch(device: torch.device, settings: dict, deadline: float) -> dict:
    train_step, peak, rows = _train_step_module(), flops.device_peak(device), []
    for size in settings["sizes"]:
        for seq in settings["seqs"]:
            for model in MODELS:
                step = _Step(train_step, model, size, seq, device, "bf16")

                def fits(batch: int, step=step, seq=seq) -> dict:
                    data = _random_batches(seq, batch, 2, device)
                    try:
                        step(data[0], 0)  # warm-up: the allocator's first pass at this size
                        memory = bench.peak_memory(lambda: step(data[1], 1), device)
                        seconds = bench.timed(lambda: step(data[1], 2), device)
                    finally:
                        step.optimizer.zero_grad(set_to_none=True)
                        data.clear()
                        _free(device)
                    return {**_rates(seconds, batch * seq, step.flops_per_token, peak), "peak_memory_bytes": memory}

                found = search_largest(fits, settings["search_start"], max(settings["max_tokens"] // seq, 1), deadline)
                rows.append({"model": model, "size": size, "seq": seq, "precision": "bf16", **found})
                del step
                _free(device)
    return {"rows": rows}


def train_step(device: torch.device, tiny: bool) -> dict:
    """``benchmarks/train_step.py``'s trainer report (the real ``Trainer``, bf16 autocast on CUDA) on the device."""
    sizes = {"size": "4xs", "seq_len": 16, "batch_size": 2, "rounds": 1} if tiny else \
        {"size": "xxs", "seq_len": 256, "batch_size": 8, "rounds": 30}
    return {"report": _train_step_module().trainer_report(argparse.Namespace(warmup=1, **sizes), device), **sizes}


def _text_models(size: str, seq: int, device: torch.device):
    from architectures import EBT, TransformerConfig, TransformerPP
    from energyflow.models import TextEBM

    torch.manual_seed(0)
    config = TransformerConfig.from_preset(size, max_seq_len=seq)
    return TextEBM(EBT(config), 256).eval().to(device), TransformerPP(config, 256).eval().to(device)


def thinking(device: torch.device, settings: dict) -> dict:
    from energyflow.inference import ThinkingConfig, think
    from energyflow.inference.compiled import compile_status

    size, seq, batch, steps = settings["think"]
    model, _ = _text_models(size, seq, device)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (batch, seq), generator=generator).to(device)
    y0 = torch.randn(batch, seq, 256, generator=generator).to(device)
    with torch.no_grad():
        cache = model.encode(tokens)
    runs = {name: (lambda compiled=compiled: think(lambda y: model.energy(cache, y), y0, ThinkingConfig(
        num_steps=steps, step_size=100.0, compile=compiled))) for name, compiled in (("eager", False), ("compiled", True))}
    seconds = bench.medians(bench.interleaved(runs, rounds=3 if size == "4xs" else 10, warmup=1, device=device))
    return {"size": size, "seq": seq, "batch": batch, "steps": steps,
            "ms_per_step": {k: 1000 * v / steps for k, v in seconds.items()},
            "compiled_speedup": seconds["eager"] / seconds["compiled"], "compile": compile_status()}


def generation(device: torch.device, settings: dict) -> dict:
    from energyflow.inference import Decoding, ThinkingConfig, generate_baseline, generate_ebt

    size, prompt_length, new = settings["generate"]
    ebt, baseline = _text_models(size, prompt_length + new, device)
    prompt = torch.randint(0, 256, (1, prompt_length), generator=torch.Generator().manual_seed(1)).to(device)
    config = ThinkingConfig(num_steps=2, step_size=100.0)

    def ebt_run(compiled: bool):
        return generate_ebt(ebt, prompt, new, replace(config, compile=compiled), Decoding(),
                            generator=torch.Generator(device=device).manual_seed(0))

    runs = {"transformer_pp": lambda: generate_baseline(baseline, prompt, new, Decoding()),
            "ebt_eager": lambda: ebt_run(False), "ebt_compiled": lambda: ebt_run(True)}
    seconds = bench.medians(bench.interleaved(runs, rounds=3, warmup=1, device=device))
    rates = {name: new / value for name, value in seconds.items()}
    return {"size": size, "prompt": prompt_length, "new_tokens": new, "thinking_steps": 2,
            "tokens_per_second": rates,
            "transformer_pp_over_ebt": {k: rates["transformer_pp"] / rates[k] for k in ("ebt_eager", "ebt_compiled")}}


def hmc(device: torch.device, settings: dict) -> dict:
    import samplers
    from samplers.diagnostics import effective_sample_size
    from samplers.zoo import Gaussian

    num_chains, warmup, draws = settings["hmc"]
    target = Gaussian.ill_conditioned(dim=100, condition_number=100.0).to(device)
    rows = {}
    for name in ("eager", "compiled energy"):
        energy = samplers.compile_energy(target) if name == "compiled energy" else target
        generator = torch.Generator(device=device).manual_seed(0)
        y0 = target.initial_state(num_chains, generator)
        sampler = samplers.HMC(pooled_mass=True, shared_step_size=True)
        trajectory = None

        def run():
            nonlocal trajectory
            trajectory = sampler.run(energy, y0, num_steps=draws, warmup=warmup, generator=generator)

        seconds = bench.timed(run, device)  # warmup and draws (and, compiled, the one-off compile)
        gradients = sum(float(info["num_leapfrog_steps"].sum()) for info in (trajectory.warmup_info, trajectory.info)
                        if info)
        states = trajectory.states.detach()  # [T, C, 100]
        # ESS a few coordinates at a time (bounded FFT memory at 65,536 chains), of the draws and of the squares.
        ess = torch.cat([effective_sample_size(states[..., i:i + 10]) for i in range(0, 100, 10)])
        squares = (states - target.mean.to(states)).square()
        ess_squares = torch.cat([effective_sample_size(squares[..., i:i + 10]) for i in range(0, 100, 10)])
        rows[name] = {"seconds": seconds, "gradient_evaluations": gradients,
                      "ess_min": float(ess.min()), "ess_squares_min": float(ess_squares.min()),
                      "ess_per_second": float(ess.min()) / seconds,
                      "ess_squares_per_second": float(ess_squares.min()) / seconds,
                      "ess_squares_per_1k_gradients": 1e3 * float(ess_squares.min()) / gradients,
                      "acceptance": float(trajectory.acceptance_rate().mean())}
        del trajectory, states, squares
        _free(device)
    return {"chains": num_chains, "warmup": warmup, "draws": draws, "dim": 100, "rows": rows}


def _mib(value) -> str:
    return f"{value / 2**20:.0f}" if value is not None else "-"


def _mfu(value) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def _table(title: str, columns: tuple, rows: list) -> list[str]:
    """A titled markdown table, as lines (a blank line before the title and before the table)."""
    return ["", title, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)]


def markdown(result: dict) -> str:
    info = result["device"]
    lines = [f"# GPU suite on {info.get('name')} ({info['device']}, torch {info['torch']})", ""]
    if result.get("smoke"):
        lines += [f"Smoke run (toy sizes on the CPU, compiled paths through the {result.get('compile_backend')} "
                  "backend): it checks that the script runs; its numbers mean nothing.", ""]
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
        each = "; ".join(f"{name} {row['tokens_per_second']:.0f} tokens/s, MFU {_mfu(row['mfu'])}, "
                         f"{_mib(row['peak_memory_bytes'])} MiB" for name, row in step.items() if isinstance(row, dict))
        lines.append(f"- the trainer (`benchmarks/train_step.py`, {step.get('autocast')} autocast): EBT / "
                     f"Transformer++ {step['ratio_ebt_cached_to_tpp']:.2f}x per step ({each})")
    think_ = checks.get("thinking", {})
    if "ms_per_step" in think_:
        lines.append(f"- thinking ({think_['size']}, batch {think_['batch']} x {think_['seq']}): eager "
                     f"{think_['ms_per_step']['eager']:.2f} ms/step, compiled {think_['ms_per_step']['compiled']:.2f} "
                     f"ms/step ({think_['compiled_speedup']:.2f}x; {think_['compile']})")
    gen = checks.get("generation", {})
    if "tokens_per_second" in gen:
        rates = gen["tokens_per_second"]
        lines.append(f"- generation ({gen['size']}, {gen['prompt']}-token prompt, {gen['new_tokens']} new, batch 1): "
                     f"Transformer++ {rates['transformer_pp']:.1f} tokens/s, EBT {rates['ebt_eager']:.1f} eager / "
                     f"{rates['ebt_compiled']:.1f} compiled ({gen['transformer_pp_over_ebt']['ebt_eager']:.1f}x / "
                     f"{gen['transformer_pp_over_ebt']['ebt_compiled']:.1f}x)")
    matrix = checks.get("train_matrix", {})
    if matrix.get("rows"):
        lines += _table(f"Training steps at batch {matrix['rows'][0]['batch']} (MFU against "
                        f"{(matrix['peak_flops'] or 0) / 1e12:.1f} TFLOP/s):",
                        ("model", "size", "seq", "precision", "s/step", "tokens/s", "MFU", "peak MiB", "EBT / T++"),
                        [(r["model"], r["size"], r["seq"], r["precision"], f"{r['step_seconds']:.4f}",
                          f"{r['tokens_per_second']:.0f}", _mfu(r["mfu"]), _mib(r["peak_memory_bytes"]),
                          f"{r['ebt_over_transformer_pp']:.2f}x" if "ebt_over_transformer_pp" in r else "")
                         for r in matrix["rows"]])
    largest = checks.get("largest_batch", {})
    if largest.get("rows"):
        lines += _table("Largest power-of-two batch per optimizer step (bf16 autocast):",
                        ("model", "size", "seq", "largest batch", "stopped", "s/step", "tokens/s", "MFU", "peak MiB"),
                        [(r["model"], r["size"], r["seq"], r["largest"], r["stopped"],
                          f"{(r['result'] or {}).get('step_seconds', float('nan')):.4f}",
                          f"{(r['result'] or {}).get('tokens_per_second', 0):.0f}",
                          _mfu((r["result"] or {}).get("mfu")), _mib((r["result"] or {}).get("peak_memory_bytes")))
                         for r in largest["rows"]])
    sampler = checks.get("hmc", {})
    if sampler.get("rows"):
        lines += _table(f"HMC (ChEES warmup), {sampler['chains']} chains, 100-d ill-conditioned Gaussian, "
                        f"{sampler['warmup']} warmup + {sampler['draws']} draws:",
                        ("energy", "seconds", "ESS/s", "ESS/s (squares)", "ESS (squares) per 1k grad", "acceptance"),
                        [(name, f"{r['seconds']:.1f}", f"{r['ess_per_second']:.0f}", f"{r['ess_squares_per_second']:.0f}",
                          f"{r['ess_squares_per_1k_gradients']:.3f}", f"{r['acceptance']:.2f}")
                         for name, r in sampler["rows"].items()])
    lines += ["", "Check wall seconds: " + ", ".join(f"{name} {value.get('wall_seconds', 0):.0f}"
                                                    for name, value in checks.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda (the CPU with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="every check at toy sizes (on the CPU, under a minute)")
    parser.add_argument("--budget-seconds", type=float, default=420.0,
                        help="after this many seconds the largest-batch search stops where it is")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.budget_seconds <= 0:
        parser.error(f"--budget-seconds must be positive, got {args.budget_seconds}")
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run on the GPU machine, or --smoke for the CPU smoke run")
    settings = SMOKE if args.smoke else FULL
    if args.smoke:  # compiled paths traced as on the GPU, without generating code (samplers.energy.compile_backend)
        os.environ.setdefault("ENERGYFLOW_COMPILE_BACKEND", "aot_eager")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + args.budget_seconds
    result = {"device": device_info(device), "smoke": args.smoke, "settings": settings,
              "compile_backend": compile_backend(), "checks": {}}
    for name, check in (("second_order", lambda: second_order(device, args.smoke)),
                        ("bf16", lambda: bf16(device, args.smoke)),
                        ("train_matrix", lambda: train_matrix(device, settings)),
                        ("thinking", lambda: thinking(device, settings)),
                        ("generation", lambda: generation(device, settings)),
                        ("hmc", lambda: hmc(device, settings)),
                        ("train_step", lambda: train_step(device, args.smoke)),
                        ("largest_batch", lambda: largest_batch(device, settings, deadline))):
        check_started = time.perf_counter()
        try:
            result["checks"][name] = check()
        except Exception as error:  # noqa: BLE001 - one failed check must not lose the others' numbers
            # The first line for the table; the whole traceback in the JSON and on stderr, since a device run is
            # scarce and its failure has to be diagnosed from what it wrote.
            result["checks"][name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
                                      "traceback": traceback.format_exc()}
            print(result["checks"][name]["traceback"], file=sys.stderr, flush=True)
        result["checks"][name]["wall_seconds"] = time.perf_counter() - check_started
        print(f"{name}: {result['checks'][name]['wall_seconds']:.0f} s", flush=True)
        (args.out / "gpu_suite.json").write_text(json.dumps(result, indent=2, default=str))
    result["wall_seconds"] = time.perf_counter() - started
    bench.write(args.out, "gpu_suite", result, markdown(result), device=device)
    print(markdown(result))
    return 0 if all("error" not in c and c.get("passed", True) for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
