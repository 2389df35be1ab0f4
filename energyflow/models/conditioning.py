"""Step conditioning and the energy a descent calls: which step index (and context) each state is scored on,
and how a descent over a model's candidates reads them (``descent_space``). See ``energyflow.models``."""
from __future__ import annotations

from typing import Callable, Literal, Optional, Union

import torch
from torch import Tensor, nn

from architectures.ebt import EBT, ContextCache
from samplers.parametrization import Parametrization

DescentSpace = Literal["logits", "probabilities"]
DESCENT_SPACES = ("logits", "probabilities")
StepIndexMode = Literal["per_step", "single"]
STEP_INDEX_MODES = ("per_step", "single")


def check_step_index_mode(mode: str) -> str:
    if mode not in STEP_INDEX_MODES:
        raise ValueError(f"step_index_mode must be 'per_step' (state y_k on index k) or 'single' (index 0 at every "
                         f"step), got {mode!r}")
    return mode


def check_descent_space(descent_space: str) -> str:
    if descent_space not in DESCENT_SPACES:
        raise ValueError(f"descent_space must be 'probabilities' (the paper's rule: gradient w.r.t. p = softmax(y), "
                         f"next state p - a * dE/dp) or 'logits' (gradient through the softmax, next state "
                         f"y - a * dE/dy), got {descent_space!r}")
    return descent_space


def model_parametrization(model: nn.Module, descent_space: Optional[str]) -> Optional[Parametrization]:
    """The parametrization a descent over ``model``'s candidates uses for ``descent_space``; ``None`` when
    ``descent_space`` is ``None`` (the energy reads the state as it is: for a text EBT, the logit rule through
    its own softmax). A model without ``parametrization`` (continuous candidates) refuses a descent space."""
    if descent_space is None:
        return None
    if not callable(getattr(model, "parametrization", None)):
        raise ValueError(f"descent_space={descent_space!r} applies to a model whose candidate is read through a map "
                         f"(a text EBT's softmax); {type(model).__name__} reads its candidate as it is: leave "
                         "descent_space unset (None)")
    return model.parametrization(descent_space)


def conditioning_ebt(backbone: nn.Module) -> Optional[EBT]:
    """The step-conditioned ``EBT`` of ``backbone``: itself, or the EBT a wrapper holds as ``.ebt`` (e.g.
    ``HNetContextEBT``); ``None`` when the backbone is not step-conditioned."""
    ebt = backbone if isinstance(backbone, EBT) else getattr(backbone, "ebt", None)
    return ebt if isinstance(ebt, EBT) and ebt.step_conditioning is not None else None


def conditioning_index(model: nn.Module, state_index: int, mode: str = "per_step") -> Optional[int]:
    """The conditioning index of state ``y_{state_index}`` for any model: ``None`` if the model has no
    ``step_conditioning`` (or it is ``None``), else ``model.step_index(state_index, mode)``."""
    if getattr(model, "step_conditioning", None) is None:
        return None
    return model.step_index(state_index, mode)


class _StepConditioned(nn.Module):
    """What the step-conditioning protocol reads from a model with a ``backbone`` (see the module docstring)."""

    backbone: nn.Module

    @property
    def step_conditioning(self) -> Optional[str]:
        """``None``, ``"adaln"`` (index passed to ``energy``) or ``"time_token"`` (index in the context)."""
        ebt = conditioning_ebt(self.backbone)
        return ebt.step_conditioning if ebt is not None else None

    @property
    def num_step_embeddings(self) -> int:
        """Rows of the step-embedding table (0 without step conditioning)."""
        ebt = conditioning_ebt(self.backbone)
        return ebt.step_embed.num_embeddings if ebt is not None else 0

    def step_index(self, state_index: int, mode: str = "per_step") -> Optional[int]:
        """The index state ``y_k`` (``k = state_index``) is conditioned on: ``min(k, num_step_embeddings - 1)``
        (so more steps than the table has, e.g. at evaluation, reuse the last trained index), or 0 in
        ``"single"`` mode; ``None`` without step conditioning."""
        check_step_index_mode(mode)
        if state_index < 0:
            raise ValueError(f"state_index must be >= 0, got {state_index}")
        if self.step_conditioning is None:
            return None
        return 0 if mode == "single" else min(int(state_index), self.num_step_embeddings - 1)

    def _encode_real(self, real: Tensor, step_index: Optional[int]) -> ContextCache:
        if step_index is None:
            return self.backbone.encode_context(real)
        if self.step_conditioning != "time_token":
            raise ValueError(f"step_index conditions the context of a time-token EBT only; this model's step "
                             f"conditioning is {self.step_conditioning!r} (adaln: pass step_index to energy(); "
                             "unconditioned: drop it)")
        return self.backbone.encode_context(real, step_index=step_index)

    def _energies(self, context: Union[Tensor, ContextCache], embedded: Tensor,
                  step_index: Optional[int]) -> Tensor:
        if self.step_conditioning == "time_token" and step_index is not None:
            # The index lives in the context: encode tokens on it, or check that the cache was encoded on it.
            if isinstance(context, ContextCache):
                _check_same_index(context.step_index, step_index)
            else:
                context = self.encode(context, step_index=step_index)
            step_index = None
        cache = context if isinstance(context, ContextCache) else self.encode(context)
        return self.backbone.energies(cache, embedded, step_index=step_index)


def _check_same_index(cached, requested) -> None:
    same = (torch.equal(torch.as_tensor(cached), torch.as_tensor(requested).to(torch.as_tensor(cached).device))
            if isinstance(cached, Tensor) or isinstance(requested, Tensor) else cached == requested)
    if not same:
        raise ValueError(f"this time-token cache was encoded on step index {cached!r} but the energy was asked on "
                         f"{requested!r}; encode the context once per index with encode(context, step_index=k)")


Encoder = Callable[[Optional[int]], ContextCache]


class StepEnergy:
    """``energy_fn(y)`` for a descent whose ``k``-th call (``k = 0, 1, ...``) scores the state ``y_k``.

    State ``y_k`` is scored on ``conditioning_index(model, k, mode)``: nothing for an unconditioned model
    (the call is exactly ``model.energy(context, y)``), the index passed to ``energy`` for adaLN (one shared
    context), or the context of that index for a time-token EBT. ``encode(index)`` builds a context (``index``
    is ``None`` unless the model is a time-token EBT); each distinct context is built once, on first use,
    and kept in ``contexts`` (``prepare`` builds some ahead, e.g. inside a graph). Works with any model that
    has ``encode``/``energy``; without a ``step_conditioning`` attribute it counts as unconditioned.
    ``parametrization``: the one the descent runs with (``model_parametrization``); its calls then hand the image
    point ``u = map(y)`` (a text EBT's probabilities), scored with ``model.energy(..., mapped=True)``.
    """

    def __init__(self, model: nn.Module, encode: Encoder, *, mode: str = "per_step",
                 parametrization: Optional[Parametrization] = None) -> None:
        self.model, self._encode, self.mode = model, encode, check_step_index_mode(mode)
        self.mapped = parametrization is not None
        self.time_token = getattr(model, "step_conditioning", None) == "time_token"
        self.contexts: dict[Optional[int], ContextCache] = {}
        self.num_calls = 0

    def index(self, state_index: int) -> Optional[int]:
        return conditioning_index(self.model, state_index, self.mode)

    def context_key(self, state_index: int) -> Optional[int]:
        """Which context ``y_k`` is scored against: its index for a time-token EBT, else the one shared context."""
        return self.index(state_index) if self.time_token else None

    def context(self, state_index: int) -> ContextCache:
        key = self.context_key(state_index)
        if key not in self.contexts:
            self.contexts[key] = self._encode(key)
        return self.contexts[key]

    def prepare(self, state_indices, encode: Optional[Encoder] = None) -> None:
        """Build the contexts of ``state_indices`` now (with ``encode`` instead of the default, if given)."""
        for k in state_indices:
            key = self.context_key(k)
            if key not in self.contexts:
                self.contexts[key] = (encode or self._encode)(key)

    def energy_at(self, y: Tensor, state_index: int, *, mapped: bool = False) -> Tensor:
        """The energy of the state ``y`` scored as ``y_{state_index}`` (does not advance the call count);
        ``mapped=True``: ``y`` is already the image point ``map(state)`` of the model's parametrization."""
        context, index = self.context(state_index), self.index(state_index)
        keywords = {"mapped": True} if mapped else {}
        if index is None or self.time_token:
            return self.model.energy(context, y, **keywords)
        return self.model.energy(context, y, step_index=index, **keywords)

    def __call__(self, y: Tensor) -> Tensor:
        """What a descent calls: with a ``parametrization``, on the image point it hands (see the class)."""
        energy = self.energy_at(y, self.num_calls, mapped=self.mapped)
        self.num_calls += 1
        return energy
