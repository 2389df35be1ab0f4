"""Compiled inference: the energy-and-gradient of thinking through ``torch.compile``.

Inference needs first-order gradients only, and ``torch.func.grad`` composes with ``torch.compile``, so every
thinking step's ``E(y)`` and ``dE/dy`` can run as one compiled graph (forward and backward fused by inductor).
One switch: ``ThinkingConfig(compile=True)`` (``--compile`` on ``think`` and ``generate``). The first
evaluation of a run stays eager (it validates the energy's shape and finiteness); the compiled function is
built once per process and reused by every later call whose shapes match (a new shape compiles once more). Where
compilation is unavailable or fails (no C++ compiler, an unsupported operation) the call falls back to the eager
``samplers.energy.energy_and_grad`` with one warning, and stays eager for the rest of the process. Results equal
eager to float32 rounding (``tests/energyflow/test_compiled_inference.py``); ``benchmarks/inference.py``
measures the speed. Training never compiles: ``torch.compile`` has no double backward.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from samplers.energy import EnergyAndGrad, EnergyFn, compile_backend, energy_and_grad, functional_energy_and_grad

_compiled: Optional[object] = None
_disabled: Optional[str] = None  # why compilation was given up, once it was


def compiled_energy_and_grad(energy_fn: EnergyFn, y: Tensor, *, validate: bool = False) -> EnergyAndGrad:
    """``samplers.energy.energy_and_grad`` (first order, no graph kept) through ``torch.compile``; see the module
    docstring for when it falls back to eager."""
    global _compiled, _disabled
    if validate or _disabled is not None:
        return energy_and_grad(energy_fn, y, validate=validate)
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices while it compiles are not ours to show
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            if _compiled is None:
                _compiled = torch.compile(functional_energy_and_grad, dynamic=None, backend=compile_backend())
            with torch.no_grad():
                energy, per_position, grad = _compiled(energy_fn, y.detach())
    except Exception as error:  # noqa: BLE001 - any compile failure: eager from now on, said once
        _disabled = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(f"torch.compile is unavailable for thinking here ({_disabled}); thinking runs eagerly",
                      RuntimeWarning, stacklevel=2)
        return energy_and_grad(energy_fn, y)
    return EnergyAndGrad(energy, per_position, grad)


def compile_status() -> str:
    """``"ready"``, ``"unused"`` or why compiled thinking fell back to eager."""
    if _disabled is not None:
        return f"disabled ({_disabled})"
    return "ready" if _compiled is not None else "unused"
