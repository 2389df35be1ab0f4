"""bf16 autocast on CPU (``Trainer.autocast = 'bf16'``): the EBT's loss tracks float32 and its second-order outer
gradients survive reduced precision (compared with float32 on one batch); float64 + bf16 is refused by name."""
from __future__ import annotations

import json

import gin
import pytest
import torch

from energyflow.configurables import parse_recipe


def _losses(tmp_path, extra=()):
    gin.clear_config()
    parse_recipe("experiments/ebt_system1_bf16_debug.gin", ["Trainer.progress = False", f"OUT_DIR = '{tmp_path}'",
                                                            *extra])
    gin.get_configurable("launch")()
    gin.clear_config()
    return [json.loads(line) for line in (tmp_path / "ebt" / "history.jsonl").read_text().splitlines()]


def test_twenty_bf16_steps_track_float32(tmp_path):
    bf16 = _losses(tmp_path / "bf16")
    float32 = _losses(tmp_path / "float32", ["Trainer.autocast = 'off'"])
    assert len(bf16) == len(float32) == 20
    assert all(torch.isfinite(torch.tensor([e["loss"], e["grad_norm"]])).all() for e in bf16)
    # Tolerances: the first step, before the descent's large learned step size amplifies rounding, within 1%
    # (bf16 carries 8 bits of mantissa: ~0.4% per operation); after that the trajectories separate (the same
    # amplification moves float32 runs 0.3% apart across CPUs by step 4), so the end is compared as the mean
    # of the last five losses, within 10% (measured: 1.8%).
    assert bf16[0]["loss"] == pytest.approx(float32[0]["loss"], rel=0.01)
    tail = lambda run: sum(e["loss"] for e in run[-5:]) / 5  # noqa: E731
    assert tail(bf16) == pytest.approx(tail(float32), rel=0.10)
    assert tail(bf16) < bf16[0]["loss"] / 10  # it learns: the debug recipe starts far above its end


def test_second_order_outer_gradients_survive_bf16():
    from architectures import EBT, TransformerConfig
    from energyflow.models import TextEBM
    from energyflow.objectives import EBTObjective, RandomNoise
    from energyflow.tasks import EBTLanguageModelTask
    from samplers import GradientDescent

    torch.manual_seed(0)
    config = TransformerConfig.from_preset("4xs", max_seq_len=32)
    task = EBTLanguageModelTask(TextEBM(EBT(config), 256), EBTObjective(GradientDescent(500.0, learnable=True),
                                                                        num_steps=2, initial_state=RandomNoise(1.0)))
    windows = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": windows[:, :-1], "targets": windows[:, 1:]}

    def gradient(bf16: bool) -> torch.Tensor:
        task.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task.loss(batch, step=0, generator=torch.Generator().manual_seed(0))
        loss.backward()
        return torch.cat([p.grad.flatten() for p in task.parameters() if p.grad is not None])

    full, reduced = gradient(False), gradient(True)
    assert torch.isfinite(reduced).all()
    # The step size learns only through the descent's gradient (a second-order path): it must survive too.
    assert task.objective.sampler.step_size.grad is not None and torch.isfinite(task.objective.sampler.step_size.grad)
    # Measured on this batch: 0.973 with the context stream on the fused kernel (the default), 0.986 with it on
    # the math path: the direction of the whole outer gradient, second-order terms included, survives bf16's
    # rounding; the bound leaves room for other CPUs' bf16 kernels.
    assert torch.nn.functional.cosine_similarity(full, reduced, dim=0) > 0.95


def test_bf16_of_a_float64_run_is_refused_by_name():
    from energyflow.trainer import Trainer

    with pytest.raises(ValueError, match="autocast = 'bf16' with dtype = 'float64'"):
        Trainer(num_steps=1, batch_size=1, learning_rate=1e-3, dtype="float64", autocast="bf16")
    with pytest.raises(ValueError, match="Trainer.autocast must be one of"):
        Trainer(num_steps=1, batch_size=1, learning_rate=1e-3, autocast="fp8")
