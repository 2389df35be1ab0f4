"""Image denoising: the bidirectional EBT (``ImageDenoisingTask``), the DiT baseline (``DiffusionDenoisingTask``),
their noise schedule and DDIM (``energyflow.objectives.diffusion``), and the debug recipes end to end."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch.func import functional_call

from architectures import BidirectionalConfig, BidirectionalTransformer
from energyflow.cli import main
from energyflow.data import digits_images
from energyflow.objectives.diffusion import LinearDiffusion
from energyflow.models import ImageEBM
from energyflow.objectives import CrossEntropy, EBTObjective, InputState, RandomNoise, SmoothL1
from energyflow.tasks import DiffusionDenoisingTask, ImageDenoisingTask
from energyflow.tasks.image import unit_range_errors
from samplers import GradientDescent
from test_vector_task import _train  # a recipe trained with bindings, gin cleared around it

DEBUG = "experiments/image_denoising_debug.gin"
pytest.importorskip("sklearn", reason="the images extra: pip install 'energyflow[images]'")


def tiny_config(**overrides) -> BidirectionalConfig:
    fields = dict(image_size=8, patch_size=2, in_channels=1, dim=16, num_layers=2, num_heads=2, mlp_ratio=1.0,
                  attention_backend="math")
    return BidirectionalConfig(**{**fields, **overrides})


def tiny_ebt(num_steps: int = 1, detach: bool = True, step_size: float = 5.0) -> ImageDenoisingTask:
    torch.manual_seed(0)
    model = ImageEBM(BidirectionalTransformer(tiny_config()))
    objective = EBTObjective(GradientDescent(step_size, learnable=True), num_steps=num_steps,
                             initial_state=InputState(), loss=SmoothL1(), detach_between_steps=detach)
    return ImageDenoisingTask(model, objective)


def perturb(module: torch.nn.Module, scale: float = 0.2, seed: int = 1) -> None:
    """Move every weight off its (adaLN-Zero) initialization, so that every block and the head act."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def images(count: int = 6, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 - 1)


# ------------------------------------------------------------------------------------------------- the EBT
def test_at_initialization_the_energy_is_constant_and_a_step_leaves_the_image_unchanged():
    """adaLN-Zero: every block starts as the identity and the per-patch read-out at zero, so E is the same for
    every image and its gradient is zero. A wrong init (a non-zero gate or head) breaks all three asserts."""
    task = tiny_ebt()
    x = images()
    energies = task.model.energy(None, x)
    assert torch.equal(energies, torch.zeros_like(energies))
    noisy = task.diffusion.noise(x, 0.1, torch.Generator().manual_seed(0))
    task.eval()
    out = task.objective(task.model, noisy, x, generator=torch.Generator().manual_seed(0), num_steps=1)
    assert torch.equal(out.final_state, noisy)
    metrics = task.evaluate({"images": x}, num_steps=1)
    noisy_input = task.evaluate({"images": x}, num_steps=0)
    assert metrics["mse@0.1"] == noisy_input["mse@0.1"] and metrics["psnr@0.2"] == noisy_input["psnr@0.2"]


def test_the_energy_is_invariant_to_batch_order():
    task = tiny_ebt()
    perturb(task.model)
    x = images(7)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(task.model.energy(None, x)[order], task.model.energy(None, x[order]),
                               rtol=1e-6, atol=1e-6)


def test_outer_gradient_through_two_unrolled_steps_matches_finite_differences_in_float64():
    """The loss after two descent steps kept in one graph (no detach) depends on the weights through both
    gradients dE/dx (second order): its gradient w.r.t. a block's weights and the step size, by gradcheck."""
    task = tiny_ebt(num_steps=2, detach=False, step_size=0.5).double()
    perturb(task.model)
    clean = images(3, dtype=torch.float64)
    generator_seed = 5
    names = ["model.backbone.blocks.0.qkv.bias", "model.backbone.blocks.1.modulation.bias",
             "objective.sampler.step_size"]
    params = dict(task.named_parameters())

    def loss(*values):
        swapped = {**params, **dict(zip(names, values))}
        return functional_call(task, swapped, args=({"images": clean},),
                               kwargs={"step": 0, "generator": torch.Generator().manual_seed(generator_seed)})[0]

    inputs = tuple(params[name].detach().clone().requires_grad_() for name in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-4)


def test_training_lowers_the_loss_and_learns_a_descent_that_denoises():
    """A few dozen steps on the digits: the one-step EBT's validation MSE falls below the noisy input's."""
    data = digits_images()
    task = tiny_ebt(step_size=20.0)
    optimizer = torch.optim.Adam([{"params": [p for n, p in task.named_parameters() if "step_size" not in n]},
                                  {"params": [task.objective.sampler.step_size], "lr": 0.5}], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for step in range(60):
        batch = {"images": data.train[(step * 32) % 1600:(step * 32) % 1600 + 32]}
        loss, _ = task.loss(batch, step=step, generator=generator)
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    task.eval()
    held_out = {"images": data.validation[:64]}
    denoised, noisy = task.evaluate(held_out, num_steps=1), task.evaluate(held_out, num_steps=0)
    assert float(loss.detach()) < 0.8 * first
    assert denoised["mse@0.1"] < 0.9 * noisy["mse@0.1"]
    assert denoised["psnr@0.1"] > noisy["psnr@0.1"] + 0.3


def test_the_task_refuses_what_would_not_denoise():
    model = ImageEBM(BidirectionalTransformer(tiny_config()))
    with pytest.raises(ValueError, match="InputState"):
        ImageDenoisingTask(model, EBTObjective(GradientDescent(1.0), initial_state=RandomNoise(), loss=SmoothL1()))
    with pytest.raises(ValueError, match="SmoothL1"):
        ImageDenoisingTask(model, EBTObjective(GradientDescent(1.0), initial_state=InputState(), loss=CrossEntropy()))
    with pytest.raises(ValueError, match="mode='energy'"):
        ImageEBM(BidirectionalTransformer(tiny_config(), mode="denoise"))
    task = tiny_ebt()
    with pytest.raises(ValueError, match=r"the images are \(3, 8, 8\).*model takes \(1, 8, 8\)"):
        task.evaluate({"images": torch.zeros(2, 3, 8, 8)}, num_steps=1)
    with pytest.raises(ValueError, match="needs 'images'"):
        task.loss({"tokens": torch.zeros(2, 3)}, step=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="noise level must be in"):
        ImageDenoisingTask(model, task.objective, eval_levels=[0.1, 1.5])


def test_metrics_on_unit_range_images():
    clean = torch.zeros(2, 1, 4, 4)  # 0.5 grey on [0, 1]
    prediction = torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.2)])  # the second off by 0.1
    mse, psnr = unit_range_errors(prediction, clean)
    torch.testing.assert_close(mse, torch.tensor([0.0, 0.01], dtype=torch.float64))
    assert psnr[0] == 100.0 and psnr[1] == pytest.approx(20.0)
    clipped, _ = unit_range_errors(torch.full((1, 1, 2, 2), 5.0), torch.ones(1, 1, 2, 2))
    assert float(clipped) == 0.0  # a prediction past white is read as white


# ------------------------------------------------------------------------------------ the schedule and DDIM
def test_noise_levels_follow_the_reference_schedule():
    """diffusion_steps / level timesteps, linear betas 1e-4..0.02 (T = 1000): level 0.1 is t = 99, 0.2 t = 199."""
    diffusion = LinearDiffusion(100, 0.1)
    assert diffusion.num_timesteps == 1000 and diffusion.timestep(0.1) == 99 and diffusion.timestep(0.2) == 199
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    expected = torch.prod(1 - betas[:100])
    assert float(diffusion.alpha_bar[99]) == pytest.approx(float(expected), rel=1e-12)
    x0, eps = images(4, dtype=torch.float64), images(4, seed=1, dtype=torch.float64)
    t = torch.tensor([0, 99, 199, 999])
    x_t = diffusion.q_sample(x0, t, eps)
    for i, step in enumerate(t.tolist()):
        a = float(diffusion.alpha_bar[step])
        torch.testing.assert_close(x_t[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * eps[i])
    assert math.sqrt(1 - float(diffusion.alpha_bar[99])) == pytest.approx(0.3209, abs=1e-4)
    assert LinearDiffusion(100, 0.2).timestep(0.2) == 99  # the schedule scales with the training level
    with pytest.raises(ValueError, match="noise level must be in"):
        diffusion.timestep(0.0)


def test_the_forward_noising_has_its_closed_form_moments():
    """x_t of a fixed image, over 20,000 noise draws: mean sqrt(abar) x0 and sd sqrt(1 - abar) per pixel (the
    standard errors are sd / sqrt(n) ~ 0.004 and ~0.003; 5 of them)."""
    diffusion = LinearDiffusion(100, 0.1)
    x0 = images(1, dtype=torch.float64).expand(20000, -1, -1, -1)
    x_t = diffusion.noise(x0, 0.2, torch.Generator().manual_seed(0))
    a = float(diffusion.alpha_bar[199])
    torch.testing.assert_close(x_t.mean(0), math.sqrt(a) * x0[0], atol=5 * math.sqrt(1 - a) / math.sqrt(20000),
                               rtol=0)
    torch.testing.assert_close(x_t.std(0), torch.full_like(x0[0], math.sqrt(1 - a)), atol=0.015, rtol=0)


@pytest.mark.parametrize("passes", [1, 2, 7, 100])
def test_ddim_from_t_recovers_the_image_exactly_given_the_true_noise(passes):
    """An oracle denoiser that returns the noise actually in x_t: deterministic DDIM keeps x_t on the line from
    x0 along that noise, so every pass count lands on x0 (float64 rounding only)."""
    diffusion = LinearDiffusion(100, 0.1)
    x0, eps = images(3, dtype=torch.float64) * 0.9, images(3, seed=1, dtype=torch.float64)
    t = diffusion.timestep(0.1)
    x_t = diffusion.q_sample(x0, torch.full((3,), t), eps)

    def oracle(x, timesteps):
        signal, sigma = diffusion.coefficients(timesteps, x)
        return (x - signal * x0) / sigma

    torch.testing.assert_close(diffusion.ddim(oracle, x_t, t, passes), x0, atol=1e-12, rtol=0)
    assert diffusion.ddim_timesteps(t, passes)[0] == t and diffusion.ddim_timesteps(t, passes)[-1] == (
        0 if passes > 1 else t)
    assert len(set(diffusion.ddim_timesteps(t, passes))) == passes


def test_ddim_refuses_more_passes_than_timesteps():
    with pytest.raises(ValueError, match="at most 100"):
        LinearDiffusion(100, 0.1).ddim_timesteps(99, 101)


def test_the_dit_loss_falls_on_the_digits():
    """eps-prediction MSE starts near 1 (the zero-initialised output predicts no noise) and falls (to ~0.65 after
    80 steps here: below the training level the noise is small next to the image, so hard to read off)."""
    torch.manual_seed(0)
    data = digits_images()
    task = DiffusionDenoisingTask(BidirectionalTransformer(tiny_config(dim=32), mode="denoise"),
                                  sampling_steps=(1, 5))
    optimizer = torch.optim.Adam(task.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(80):
        loss, _ = task.loss({"images": data.train[(step * 32) % 1600:(step * 32) % 1600 + 32]}, step=step,
                            generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[0] == pytest.approx(1.0, abs=0.1)
    assert sum(losses[-10:]) / 10 < 0.75 * losses[0]
    task.eval()
    held_out = {"images": data.validation[:64]}
    assert task.evaluate(held_out, num_steps=5)["mse@0.1"] < task.evaluate(held_out, num_steps=0)["mse@0.1"]
    assert task.evaluation_counts([1, 2, 4]) == [1, 5]
    with pytest.raises(ValueError, match="at most 100"):
        task.evaluate(held_out, num_steps=101)
    with pytest.raises(ValueError, match="mode='denoise'"):
        DiffusionDenoisingTask(BidirectionalTransformer(tiny_config()))


def test_both_tasks_validate_on_the_same_noise():
    """The noisy input (0 steps) is the same image for image in both tasks: their rows compare."""
    ebt = tiny_ebt()
    dit = DiffusionDenoisingTask(BidirectionalTransformer(tiny_config(), mode="denoise"))
    batch = {"images": images(5)}
    assert ebt.evaluate(batch, num_steps=0) == dit.evaluate(batch, num_steps=0)


# ------------------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("task", ["ImageDenoisingTask", "DiffusionDenoisingTask"])
def test_each_image_task_trains_and_resumes_bit_exactly(tmp_path, task):
    bindings = ["launch.program = @train", f"train.task = @{task}", "NUM_STEPS = 6", "Trainer.checkpoint_every = 3",
                "Trainer.eval_every = 3"]
    result = _train(DEBUG, tmp_path / "run", bindings)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "checkpoints" / "step_00000003.pt", resumed_dir / "checkpoints")
    resumed = _train(DEBUG, resumed_dir, bindings)
    assert [entry["step"] for entry in resumed.history] == [4.0, 5.0, 6.0]
    assert [entry["loss"] for entry in resumed.history] == [entry["loss"] for entry in result.history[3:]]
    assert resumed.validation == result.validation
    assert {"mse@0.1", "psnr@0.1", "mse@0.2", "psnr@0.2", "forward_passes"} <= set(result.validation)


@pytest.mark.parametrize("recipe", ["experiments/image_denoising_debug.gin",
                                    "experiments/image_denoising_system2_debug.gin"])
def test_the_debug_experiments_end_with_the_table_and_eval_json_round_trips(tmp_path, recipe, capsys):
    out = tmp_path / "compare"
    assert main(["train", recipe, "--out", str(out), "--bind", "Trainer.progress = False"]) == 0
    table = capsys.readouterr().out
    for column in ("forward_passes", "backward_passes", "mse@0.1", "psnr@0.1", "mse@0.2", "psnr@0.2"):
        assert column in table
    compared = json.loads((out / "compare.json").read_text())["runs"]
    assert sorted(compared) == ["dit", "ebt"] and sorted(compared["ebt"]["steps"], key=int) == (
        ["0", "1", "2"] if "system2" not in recipe else ["0", "1", "3"])
    path = tmp_path / "ebt.json"
    assert main(["eval", str(out / "ebt"), "--max-steps", "2", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    runs = json.loads(path.read_text())["runs"]
    (name,) = runs
    steps = runs[name]["steps"]
    assert sorted(steps) == ["0", "1", "2"]
    assert steps["1"]["forward_passes"] == 1.0 and steps["1"]["backward_passes"] == 1.0
    assert f"{steps['2']['psnr@0.1']:.3f}" in printed  # the file holds what the table shows
    dit = tmp_path / "dit.json"
    assert main(["eval", str(out / "dit"), "--json", str(dit)]) == 0
    dit_steps = json.loads(dit.read_text())["runs"]
    assert sorted(next(iter(dit_steps.values()))["steps"], key=int) == ["1", "2", "5"]
    assert steps["0"]["mse@0.1"] == pytest.approx(steps["0"]["mse@0.1"])


def test_think_on_an_image_ebt_writes_the_grids_and_the_numbers(tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["train", DEBUG, "--out", str(out), "--bind", "Trainer.progress = False"]) == 0
    think_dir = tmp_path / "think"
    assert main(["think", str(out / "ebt"), "--baseline", str(out / "dit"), "--steps", "1,2", "--samples", "1,3",
                 "--images", "8", "--show", "3", "--out", str(think_dir)]) == 0
    printed = capsys.readouterr().out
    assert "Spearman correlation of final energy and MSE" in printed
    for name in ("think.json", "psnr_vs_steps_0.1.png", "psnr_vs_steps_0.2.png", "denoising_0.1.png",
                 "denoising_0.2.png"):
        assert (think_dir / name).stat().st_size > 0
    numbers = json.loads((think_dir / "think.json").read_text())
    assert numbers["steps"] == [1, 2] and numbers["samples"] == [1, 3] and numbers["num_images"] == 8
    one, three = numbers["psnr"]["0.1"]["1"], numbers["psnr"]["0.1"]["3"]
    assert len(one) == len(three) == 3  # 0 (the start), 1 and 2 steps
    assert sorted(numbers["baseline_psnr"]["0.1"], key=int) == ["1", "2", "5"]
    assert -1.0 <= numbers["uncertainty"]["0.1"] <= 1.0
    assert main(["think", str(out / "ebt"), "--baseline", str(out / "ebt")]) == 1
    assert "is not a DiT run" in " ".join(capsys.readouterr().out.split())  # one line (rich wraps it here)
    assert main(["think", str(out / "ebt"), "--samples", "1,4", "--jitter", "0"]) == 1
    assert "--jitter > 0" in " ".join(capsys.readouterr().out.split())


def test_thinking_with_one_sample_is_the_evaluated_descent():
    """``think`` on images descends exactly as validation does: the same PSNR after 2 steps, to float rounding."""
    from energyflow.inference.images import image_thinking

    task = tiny_ebt(step_size=5.0)
    perturb(task.model, scale=0.05)
    task.eval()
    clean = images(5)
    thinking, _ = image_thinking(task, clean, steps=[1, 2], samples=[1])
    evaluated = task.evaluate({"images": clean}, num_steps=2)
    assert thinking.psnr_at(0.1, 1, 2) == pytest.approx(float(evaluated["psnr@0.1"]), rel=1e-5)
    assert thinking.psnr_at(0.2, 1, 0) == pytest.approx(float(task.evaluate({"images": clean}, num_steps=0)["psnr@0.2"]),
                                                        rel=1e-6)


def test_every_stability_trick_of_the_text_objective_applies_to_images():
    """The same EBTObjective and samplers components, on image states: no detach with truncation, randomized
    step size and step count, Langevin noise, gradient and state clamps, the replay buffer; a learnable noise
    scale gets its own learning-rate group. One training step each way, finite, the buffer filled."""
    from energyflow.objectives import RandomNumSteps, ReplayBuffer
    from samplers import ClampGradient, ClampState, LangevinNoise, RandomizedStepSize

    torch.manual_seed(0)
    model = ImageEBM(BidirectionalTransformer(tiny_config()))
    perturb(model, scale=0.05)
    sampler = GradientDescent(5.0, learnable=True, min_step_size=1e-4, schedule=RandomizedStepSize(2.0),
                              transforms=[ClampGradient(1.0), LangevinNoise(0.01, learnable=True),
                                          ClampState(-1.5, 1.5)])
    objective = EBTObjective(sampler, eval_sampler=GradientDescent(5.0), num_steps=RandomNumSteps(2, 3),
                             initial_state=InputState(), loss=SmoothL1(), detach_between_steps=False, truncate=1,
                             loss_on_last_step_only=True, replay_buffer=ReplayBuffer(capacity=8, fraction=0.5))
    task = ImageDenoisingTask(model, objective, noise_lr_multiplier=3.0)
    assert task.lr_multipliers() == {"*step_size": 9000.0, "*transforms.*.scale": 3.0}
    for step in range(3):
        loss, metrics = task.loss({"images": images(4, seed=step)}, step=step, generator=torch.Generator().manual_seed(0))
        loss.backward()
        assert torch.isfinite(loss) and metrics["num_steps"] in (2.0, 3.0)
    assert len(objective.replay_buffer) == 8 and float(metrics["replayed_fraction"]) == 0.5
    assert objective.eval_sampler.step_size is sampler.step_size  # validation descends with the learned one
    task.eval()
    assert torch.isfinite(task.evaluate({"images": images(4)}, num_steps=3)["psnr@0.1"])
