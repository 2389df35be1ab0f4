"""The EBT objective: unroll energy descent through a differentiable sampler and supervise every state.

One batch: draw the initial state y_0 (noise or zeros; part of the batch from the replay buffer), encode
the context once, run K steps of a differentiable sampler on ``E(context, .)`` (``create_graph=True`` so
the loss reaches the weights and the learnable step size through each gradient step), and average the task
loss of y_1..y_K (or take only y_K). The step-level tricks (randomized step size, gradient and state
clamps, Langevin noise) are the sampler's own schedule and transforms; the chain-level ones (step count,
detach, truncation, initial state, replay, label smoothing, contrastive term) live here.

Step conditioning: for a model whose energy depends on the optimization step (``model.step_conditioning``,
see ``energyflow.models``), the state y_k is scored on conditioning index k (``step_index_mode="per_step"``)
or on index 0 at every step (``"single"``, the paper's System 2), clamped to the model's last step
embedding. y_0..y_{K-1} are the descent's steps, y_K the final state (its energy is only a metric, and the
contrastive term re-scores on its index). An adaLN model shares one context across steps; a time-token
model gets one context per distinct index, each encoded once per batch.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor, nn

from energyflow.models import StepEnergy, check_descent_space, check_step_index_mode, model_parametrization
from energyflow.objectives.components import CrossEntropy, RandomNoise, RandomNumSteps, resolve_num_steps
from energyflow.objectives.replay import ReplayBuffer
from samplers.trajectory import Trajectory
from samplers.transforms import LangevinNoise, WarmupLangevinNoise


@dataclass
class ObjectiveOutput:
    loss: Tensor  # [] what the optimizer minimizes
    metrics: dict[str, Tensor]  # name -> [] detached scalars (no host sync: the trainer reads them)
    final_state: Tensor  # [B, *event] y_K, detached
    trajectory: Optional[Trajectory] = None  # the sampler's run (states y_1..y_K, with their graph in training)


class ContrastiveTerm:
    """``weight * (E(ground truth) - E(sg(y_K))) + regularization * (E_pos^2 + E_neg^2)`` (energies per position).

    Pushes the ground truth's energy down and the final prediction's up; the square keeps both bounded,
    since an energy difference alone can fall without limit.
    """

    def __init__(self, weight: float = 0.1, regularization: float = 0.01):
        if weight <= 0 or regularization < 0:
            raise ValueError(f"ContrastiveTerm needs weight > 0 and regularization >= 0, got {weight}, "
                             f"{regularization}")
        self.weight, self.regularization = float(weight), float(regularization)

    def __call__(self, positive: Tensor, negative: Tensor) -> Tensor:
        """``positive``, ``negative``: per-position energies ``[B, S]`` -> []."""
        gap = positive.mean() - negative.mean()
        return self.weight * gap + self.regularization * (positive.pow(2).mean() + negative.pow(2).mean())


class _RecordingEnergy(StepEnergy):
    """``StepEnergy`` (call k scores y_k, on its step index if the model is conditioned) that keeps each
    call's per-position energy, detached.

    The sampler already evaluates E at y_0 (its first call) and at every y_k; recording them gives the
    initial energy for the energy-gap metric without a redundant forward pass.
    """

    def __init__(self, model: nn.Module, encode, *, mode: str = "per_step", parametrization=None):
        super().__init__(model, encode, mode=mode, parametrization=parametrization)
        self.calls = []

    def __call__(self, y: Tensor) -> Tensor:
        energy = super().__call__(y)
        self.calls.append(energy.detach())
        return energy


class EBTObjective(nn.Module):
    """Unrolled-optimization loss of the Energy-Based Transformer (see the module docstring).

    ``sampler``: a differentiable sampler (``GradientDescent`` or ``Langevin``) carrying the step size
    (learnable or not), its schedule (e.g. ``RandomizedStepSize``) and transforms (clamps, noise).
    ``eval_sampler``: used by evaluation instead (e.g. without the randomized step size and noise). When the
    training sampler's step size is learnable, the evaluation sampler shares that very parameter, so
    validation always uses the learned value.
    ``step_index_mode``: for a step-conditioned model (``model.step_conditioning`` not ``None``), ``"per_step"``
    scores y_k on index k, ``"single"`` on index 0 at every step (ignored for unconditioned models). Indices
    past the model's last step embedding (e.g. more steps at evaluation than in training) reuse the last one.
    ``score_final_state``: also evaluate E(y_K) in training, for the ``final_energy`` / ``final_energy_gap``
    metrics (one more prediction-stream forward per step, without a graph). Off by default: no loss uses it,
    and the paper's energy gap is between the first and the last step, E(y_0) - E(y_{K-1}). Evaluation
    always scores y_K.
    ``descent_space``: how the descent reads a text EBT's logits (``energyflow.models.TextEBM.parametrization``):
    ``"probabilities"`` (the paper's reference code: E of p = softmax(y_k), the gradient w.r.t. p, the next state
    p - a * dE/dp, read as logits by the loss and the next step) or ``"logits"`` (the gradient through the
    softmax, y_k - a * dE/dy). ``None`` (the default, and the only choice for continuous candidates): the energy
    reads the state as it is -- for a text EBT the same logit-space rule through the model's own softmax.
    Evaluation and every inference path built from this objective use the same rule.
    """

    def __init__(
        self,
        sampler: nn.Module,
        *,
        eval_sampler: Optional[nn.Module] = None,
        num_steps: Union[int, RandomNumSteps] = 2,
        initial_state=None,
        loss=None,
        detach_between_steps: bool = True,
        truncate: Optional[int] = None,
        loss_on_last_step_only: bool = False,
        label_smoothing=None,
        replay_buffer: Optional[ReplayBuffer] = None,
        contrastive: Optional[ContrastiveTerm] = None,
        step_index_mode: str = "per_step",
        score_final_state: bool = False,
        descent_space: Optional[str] = None,
    ):
        super().__init__()
        if isinstance(num_steps, int) and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if truncate is not None and truncate < 1:
            raise ValueError(f"truncate must be None or >= 1 (steps that keep a graph), got {truncate}")
        self.loss_fn = loss if loss is not None else CrossEntropy()
        if label_smoothing is not None and not self.loss_fn.supports_label_smoothing:
            raise ValueError(f"label smoothing was set but the loss {type(self.loss_fn).__name__} is a regression "
                             "loss; drop label_smoothing or use CrossEntropy")
        self.sampler = sampler
        if eval_sampler is not None and isinstance(getattr(sampler, "step_size", None), nn.Parameter):
            eval_sampler.tie_step_size(sampler)  # shared Parameter: one value, trained once (and its floor)
        self.eval_sampler = eval_sampler
        self.num_steps = num_steps
        self.initial_state = initial_state if initial_state is not None else RandomNoise(1.0)
        self.detach_between_steps, self.truncate = detach_between_steps, truncate
        self.loss_on_last_step_only = loss_on_last_step_only
        self.label_smoothing, self.contrastive = label_smoothing, contrastive
        self.replay_buffer = replay_buffer
        self.step_index_mode = check_step_index_mode(step_index_mode)
        self.score_final_state = bool(score_final_state)
        self.descent_space = None if descent_space is None else check_descent_space(descent_space)

    def parametrization(self, model: nn.Module):
        """The ``samplers`` parametrization of this objective's descent over ``model``'s candidates (or None)."""
        return model_parametrization(model, self.descent_space)

    def forward(self, model: nn.Module, inputs: Tensor, targets: Tensor, *, generator: Optional[torch.Generator] = None,
                step: int = 0, num_steps: Optional[int] = None) -> ObjectiveOutput:
        """``inputs``: the context (e.g. tokens ``[B, S]``); ``targets``: what y_K should match (``[B, S]``).

        In ``train()`` mode the chain is differentiable; in ``eval()`` mode it is not (validation) and the
        replay buffer is neither read nor written. ``num_steps`` overrides the configured count.
        """
        training = self.training
        for transform in self.sampler.modules():
            if isinstance(transform, WarmupLangevinNoise):
                transform.set_training_step(step)
        count = int(num_steps) if num_steps is not None else resolve_num_steps(self.num_steps, step, training)
        inputs, targets, state, replayed = self._start(model, inputs, targets, generator, training)
        parametrization = self.parametrization(model)
        energy_fn = self._energy(model, inputs, count, training, parametrization)
        sampler = self.sampler if (training or self.eval_sampler is None) else self.eval_sampler
        trajectory = sampler.run(
            energy_fn, state, num_steps=count, generator=generator, differentiable=training,
            truncate=self.truncate if training else None,
            detach_between_steps=self.detach_between_steps and training,
            # The loss reads the states only (the contrastive term re-scores sg(y_K) itself), so in training
            # E(y_K) is a metric alone: skipped unless asked for (one prediction-stream forward, ~7% of a
            # System 1 step); evaluation always scores it.
            final_energy="value" if (self.score_final_state or not training) else "skip",
            parametrization=parametrization,
        )
        step_losses = [self.loss_fn(trajectory.states[k], targets, self._smoothing(k, count)) for k in range(count)]
        loss = step_losses[-1] if self.loss_on_last_step_only else torch.stack(step_losses).mean()
        metrics = self._metrics(step_losses, energy_fn.calls, trajectory, sampler, replayed / targets.shape[0], count)
        if training and self.contrastive is not None:  # both scored as the final state y_K (its step index)
            positive = energy_fn.energy_at(self.loss_fn.target_state(targets, state), count)
            term = self.contrastive(positive, energy_fn.energy_at(trajectory.final_state.detach(), count))
            loss, metrics["contrastive"] = loss + term, term.detach()
        if training and self.replay_buffer is not None:
            self.replay_buffer.push(inputs, targets, trajectory.final_state)
        return ObjectiveOutput(loss, metrics, trajectory.final_state.detach(), trajectory)

    def _energy(self, model: nn.Module, inputs: Tensor, count: int, training: bool,
                parametrization=None) -> _RecordingEnergy:
        """The sampler's energy function, with the contexts it needs encoded once per batch.

        Unconditioned and adaLN models: one context. Time-token models: one per distinct index, built here
        for y_0..y_{K-1} (in training inside the graph, so its weights learn; with truncation only the
        indices of the steps that keep a graph) and, for y_K alone, without a graph when first used (its
        energy is a metric), unless the contrastive term needs it in the graph.
        """
        def encode(index: Optional[int], graph: bool = False) -> object:
            with contextlib.nullcontext() if graph else torch.no_grad():  # validation, or a context no loss reaches
                return model.encode(inputs) if index is None else model.encode(inputs, step_index=index)

        energy_fn = _RecordingEnergy(model, encode, mode=self.step_index_mode, parametrization=parametrization)
        if training:
            first_graph_state = count - self.truncate if self.truncate is not None else 0
            with_graph = list(range(max(first_graph_state, 0), count))
            if self.contrastive is not None:
                with_graph.append(count)
            energy_fn.prepare(with_graph, lambda index: encode(index, graph=True))
        energy_fn.prepare(range(count))
        return energy_fn

    def _start(self, model: nn.Module, inputs: Tensor, targets: Tensor, generator: Optional[torch.Generator],
               training: bool) -> tuple[Tensor, Tensor, Tensor, int]:
        """y_0 for every row; in training part of the batch comes from the replay buffer (with its contexts)."""
        dtype = next(model.parameters()).dtype  # the state in the weights' precision (fp32 under bf16 autocast)
        inputs_keyword = {"inputs": inputs} if getattr(self.initial_state, "takes_inputs", False) else {}
        state = self.initial_state(model.candidate_shape(targets), device=targets.device, dtype=dtype,
                                   generator=generator, **inputs_keyword)
        if training and self.replay_buffer is not None:
            return self.replay_buffer.mix(inputs, targets, state, generator)
        return inputs, targets, state, 0

    def _smoothing(self, step_index: int, num_steps: int) -> float:
        return 0.0 if self.label_smoothing is None else self.label_smoothing(step_index, num_steps)

    @staticmethod
    def _metrics(step_losses: list[Tensor], energies: list[Tensor], trajectory, sampler: nn.Module,
                 replayed_fraction: float, count: int) -> dict[str, Tensor]:
        """Per-step and summary scalars, all detached tensors (reading them is the trainer's business).

        ``energies``: per-position energies at y_0 .. y_{K-1} (the states the K steps were taken from) and, when
        the final state was scored, y_K (each ``[B, S]``); reported as means per position. ``energy_gap`` is the
        paper's "between first and last step", E(y_0) - E(y_{K-1}) (0 for K = 1); ``final_energy`` and
        ``final_energy_gap`` = E(y_0) - E(y_K) come with a scored final state.
        """
        losses = [value.detach() for value in step_losses]
        metrics = {f"loss_step_{k + 1}": value for k, value in enumerate(losses)}
        means = [energy.float().mean() for energy in energies]
        metrics.update(
            initial_loss=losses[0], final_loss=losses[-1], initial_energy=means[0],
            last_step_energy=means[count - 1], energy_gap=means[0] - means[count - 1],
        )
        if len(means) > count:
            metrics.update(final_energy=means[count], final_energy_gap=means[0] - means[count])
        metrics.update(
            step_size=_base_step_size(sampler, trajectory), num_steps=torch.tensor(float(len(losses))),
            replayed_fraction=torch.tensor(replayed_fraction),
        )
        noise = [module.scale.detach() for module in sampler.modules() if isinstance(module, LangevinNoise)]
        if noise:
            metrics["langevin_noise"] = noise[0]
        return metrics


def _base_step_size(sampler: nn.Module, trajectory) -> Tensor:
    """The sampler's base (possibly learned) step size, as a step takes it (``operative_step_size``: raised to the
    sampler's floor); the mean step actually used if it has none."""
    operative = getattr(sampler, "operative_step_size", None)
    value = operative() if callable(operative) else getattr(sampler, "step_size", None)
    return value.detach().float().mean() if isinstance(value, Tensor) else trajectory.info["step_size"].mean()
