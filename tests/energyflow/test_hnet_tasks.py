"""The H-Net tasks: the ratio loss is added with its weight, routing metrics per stage reach TensorBoard, the
EBT's H-Net context runs once per batch, and both recipes train through `energyflow train`."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from architectures import EBT, TransformerConfig, TransformerPP
from architectures.hnet import HNet, HNetConfig, HNetLM
from architectures.hnet_ebt import HNetContextEBT
from energyflow.cli import main
from energyflow.models import TextEBM
from energyflow.objectives import EBTObjective
from energyflow.tasks import HNetEBTLanguageModelTask, HNetLanguageModelTask
from samplers import GradientDescent

TWO_STAGES = dict(dims=(16, 16, 24), num_heads=(2, 2, 2), encoder_layers=(1, 1), decoder_layers=(1, 1),
                  compression=(3.0, 2.0), main_layers=1, max_seq_len=16)


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 256, (4, 9), generator=torch.Generator().manual_seed(seed))
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}


def tiny_ebt_task(weight: float = 0.03) -> HNetEBTLanguageModelTask:
    torch.manual_seed(0)
    hnet = HNet(HNetConfig(**{**TWO_STAGES, "dims": (32, 32, 32)}))
    backbone = HNetContextEBT(hnet, EBT(TransformerConfig(dim=32, num_layers=1, num_heads=2, max_seq_len=16)))
    objective = EBTObjective(GradientDescent(20.0, learnable=True), num_steps=2)
    return HNetEBTLanguageModelTask(TextEBM(backbone, 256), objective, ratio_loss_weight=weight)


@pytest.mark.parametrize("weight", [0.0, 0.5])
def test_language_model_task_adds_the_weighted_ratio_loss_per_stage(weight):
    torch.manual_seed(0)
    task = HNetLanguageModelTask(HNetLM(HNetConfig(**TWO_STAGES)), ratio_loss_weight=weight)
    batch = tiny_batch()
    loss, metrics = task.loss(batch, step=0, generator=torch.Generator().manual_seed(0))
    logits, routing = task.model.forward_with_routing(batch["tokens"])
    cross_entropy = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    torch.testing.assert_close(metrics["loss"], cross_entropy.detach())  # "loss" stays the cross-entropy
    torch.testing.assert_close(loss, cross_entropy + weight * (routing[0].ratio_loss + routing[1].ratio_loss))
    for stage in (0, 1):
        assert metrics[f"boundary_fraction_stage{stage}"] == routing[stage].boundary_fraction
        assert metrics[f"compression_stage{stage}"] == 1 / routing[stage].boundary_fraction
        assert {f"mean_probability_stage{stage}", f"ratio_loss_stage{stage}"} <= set(metrics)
    task.eval()
    assert {"loss", "boundary_fraction_stage1", "ratio_loss_stage0"} <= set(task.evaluate(batch))


def test_ebt_task_encodes_the_hnet_context_once_per_batch_and_adds_its_ratio_loss():
    task, without = tiny_ebt_task(0.5), tiny_ebt_task(0.0)
    calls = []
    task.model.backbone.hnet.register_forward_hook(lambda *args: calls.append(1))
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loss, metrics = task.loss(tiny_batch(), step=0, generator=generator())
    assert len(calls) == 1  # two descent steps, one context
    base, _ = without.loss(tiny_batch(), step=0, generator=generator())
    expected = base + 0.5 * (metrics["ratio_loss_stage0"] + metrics["ratio_loss_stage1"])
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert task.model.backbone.hnet.stage.router.query.weight.grad.abs().sum() > 0
    task.eval()
    evaluated = task.evaluate(tiny_batch(), num_steps=3)
    assert len(calls) == 2 and {"loss_step_3", "boundary_fraction_stage0", "compression_stage1"} <= set(evaluated)


def test_a_second_hnet_pass_per_batch_is_an_error():
    task = tiny_ebt_task()
    with pytest.raises(RuntimeError, match="encoded exactly once per batch"):
        with task.recorder:
            task.model.encode(tiny_batch()["tokens"])
            task.model.encode(tiny_batch()["tokens"])
        task.recorder.routing()


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="exactly one H-Net"):
        HNetLanguageModelTask(TransformerPP(TransformerConfig(dim=16, num_layers=1, num_heads=2), 256))
    with pytest.raises(ValueError, match="ratio_loss_weight must be >= 0"):
        HNetLanguageModelTask(HNetLM(HNetConfig(**TWO_STAGES)), ratio_loss_weight=-1.0)


@pytest.mark.parametrize("recipe", ["experiments/hnet_lm_debug.gin", "experiments/hnet_ebt_debug.gin"])
def test_energyflow_train_logs_routing_per_stage_to_tensorboard(recipe, tmp_path):
    status = main(["train", recipe, "--out", str(tmp_path), "--bind", "Trainer.num_steps = 2",
                   "--bind", "Trainer.progress = False"])
    assert status == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("boundary_fraction_stage0", "ratio_loss_stage0", "mean_probability_stage0", "compression_stage0"):
        assert f"train/{name}" in tags and f"validation/{name}" in tags
    assert [event.step for event in events.Scalars("train/boundary_fraction_stage0")] == [1, 2]
