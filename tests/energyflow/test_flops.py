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
    assert flops.ebt_train_per_token(shape, 2) == 3 * c + 12 * (c + v)
    assert flops.ebt_thinking_per_token(shape, 4, candidates=2) == c + 2 * 4 * 2 * (c + v)
    # without the vocabulary matrices an EBT step with 2 descent steps is exactly 5 Transformer++ steps
    small = flops.Shape(10_000, 2, 128, 0, 64)
    assert flops.ebt_train_per_token(small, 2) == pytest.approx(5 * flops.transformer_train_per_token(small))


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


def test_the_counts_agree_with_torchs_flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` counts every matrix multiply as it runs; the analytic count
    matches it within 10% (the counter counts the attention's full square, the model its causal half: +6% on the
    Transformer++ here), on the forward, the Transformer++'s step and the EBT's whole step, second order
    included. The counter's module tracker cannot follow ``autograd.grad`` inside a step, so it is left out."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from architectures import EBT, TransformerConfig, TransformerPP
    from energyflow.models import TextEBM
    from energyflow.objectives import EBTObjective, RandomNoise
    from energyflow.tasks import EBTLanguageModelTask, LanguageModelTask
    from samplers import GradientDescent

    class Global:  # stands in for FlopCounterMode's module tracker: everything counts under "Global"
        parents = {"Global"}

        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    def count(run) -> int:
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = Global()
        with counter:
            run()
        return counter.get_total_flops()

    torch.manual_seed(0)
    batch_size, context, vocab = 2, 32, 64
    config = TransformerConfig(dim=64, num_layers=2, num_heads=4, max_seq_len=context)
    windows = torch.randint(0, vocab, (batch_size, context + 1), generator=torch.Generator().manual_seed(0))
    batch = {"tokens": windows[:, :-1], "targets": windows[:, 1:]}
    tokens = batch_size * context
    baseline = LanguageModelTask(TransformerPP(config, vocab))
    shape = flops.shape_of(baseline.model, context)

    def train(task):
        loss, _ = task.loss(batch, step=0, generator=torch.Generator().manual_seed(0))
        loss.backward()

    forward = count(lambda: baseline.model(batch["tokens"]))
    assert forward == pytest.approx((flops.forward_per_token(shape) + flops.vocab_per_token(shape)) * tokens, rel=0.1)
    assert count(lambda: train(baseline)) == pytest.approx(flops.transformer_train_per_token(shape) * tokens, rel=0.1)
    for steps in (1, 2):
        ebt = EBTLanguageModelTask(TextEBM(EBT(config), vocab), EBTObjective(
            GradientDescent(50.0, learnable=True), num_steps=steps, initial_state=RandomNoise(1.0)))
        assert count(lambda: train(ebt)) == pytest.approx(ebt.train_flops_per_token(context) * tokens, rel=0.1)
