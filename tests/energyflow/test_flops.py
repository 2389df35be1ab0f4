"""energyflow.flops: the analytic counts (checked against their definition and against each other), and the
trainer's throughput and MFU in TensorBoard (not in the history: timings do not resume bit for bit)."""
from __future__ import annotations

import json

import pytest

from energyflow import flops


def test_the_counts_follow_their_definition():
    shape = flops.Shape(parameters=10_000, layers=2, width=128, vocab=256, context=64)
    c = 2 * 10_000 + 2 * 2 * 64 * 128
    v = 2 * 128 * 256
    assert flops.forward_per_token(shape) == c
    assert flops.transformer_train_per_token(shape) == 3 * (c + v)
    assert flops.ebt_train_per_token(shape, 2) == 3 * (c + 6 * (c + v))
    assert flops.ebt_thinking_per_token(shape, 4, candidates=2) == c + 2 * 4 * 2 * (c + v)
    # without the vocabulary matrices an EBT step with 2 descent steps is exactly 7 Transformer++ steps
    small = flops.Shape(10_000, 2, 128, 0, 64)
    assert flops.ebt_train_per_token(small, 2) == pytest.approx(7 * flops.transformer_train_per_token(small))


def test_shapes_come_from_the_models():
    from architectures import EBT, TransformerConfig, TransformerPP
    from energyflow.models import TextEBM

    config = TransformerConfig(dim=32, num_layers=2, num_heads=2, max_seq_len=16)
    baseline, ebt = TransformerPP(config, 300), TextEBM(EBT(config), 300)
    for model, network in ((baseline, baseline), (ebt, ebt.backbone)):
        shape = flops.shape_of(model, 16)
        assert shape == flops.Shape(sum(p.numel() for p in network.blocks.parameters()), 2, 32, 300, 16)
    assert flops.shape_of(object(), 16) is None
    assert flops.measured_cpu_peak() > 1e8  # any CPU does more than 0.1 GFLOP/s in a float32 matmul


def test_the_trainer_logs_throughput_and_mfu(tmp_path):
    import gin
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from energyflow.configurables import parse_recipe

    gin.clear_config()
    parse_recipe("experiments/transformer_pp_debug.gin", ["Trainer.progress = False", f"OUT_DIR = '{tmp_path}'",
                                                           "NUM_STEPS = 3", "Trainer.eval_every = 0"])
    result = gin.get_configurable("launch")()
    gin.clear_config()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"throughput/tokens_per_second", "throughput/model_flops_per_step", "throughput/mfu"} <= tags
    per_step = [e.value for e in accumulator.Scalars("throughput/model_flops_per_step")]
    shape = flops.shape_of(result.task.model, 64)
    assert per_step == pytest.approx([flops.transformer_train_per_token(shape) * 8 * 64] * 3)  # batch 8 x 64
    assert all(0 < e.value < 1 for e in accumulator.Scalars("throughput/mfu"))
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert not any(key.startswith(("tokens_per_second", "mfu")) for entry in history for key in entry)
