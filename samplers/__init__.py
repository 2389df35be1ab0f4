"""Batched, adaptive, differentiable samplers for any energy function (torch + pyro-ppl; no gin).

    from samplers import HMC
    trajectory = HMC(step_size=0.1, num_leapfrog_steps=10).run(energy_fn, y0, num_steps=2000, warmup=500)

``energy_fn(y: [C, *event]) -> [C]`` or ``[C, S]``; lower is better; chains lead. See docs/samplers.md.
"""
from samplers.ais import AISResult, annealed_importance_sampling, geometric_schedule
from samplers.base import SamplerWarning
from samplers.buffer import BufferDraw, ChainBuffer
from samplers.diagnostics import bulk_ess, effective_sample_size, rank_rhat, split_rhat, summary_table, tail_ess
from samplers.energy import CompiledEnergy, EnergyAndGrad, compile_energy, energy_and_grad, log_density, vectorize
from samplers.gradient_descent import GradientDescent
from samplers.hmc import HMC
from samplers.langevin import Langevin
from samplers.mala import MALA
from samplers.mass import DenseMass, LowRankMass
from samplers.meads import MEADS
from samplers.nuts import NUTS
from samplers.parametrization import Parametrization, SoftmaxParametrization
from samplers.pyro_nuts import PyroNUTS
from samplers.sgmcmc import SGHMC, SGLD, MinibatchEnergy
from samplers.schedules import Constant, CosineAnneal, GeometricAnneal, LinearAnneal, RandomizedStepSize, Schedule
from samplers.trajectory import INFO_FIELDS, Trajectory
from samplers.transforms import ClampGradient, ClampState, Detach, LangevinNoise, Transform, WarmupLangevinNoise
from samplers.zoo import Banana, DoubleWell, Funnel, Gaussian, GaussianMixture, Target

__all__ = [
    "Banana",
    "ClampGradient",
    "ClampState",
    "Constant",
    "CosineAnneal",
    "Detach",
    "DoubleWell",
    "EnergyAndGrad",
    "Funnel",
    "Gaussian",
    "GaussianMixture",
    "GeometricAnneal",
    "GradientDescent",
    "HMC",
    "INFO_FIELDS",
    "LangevinNoise",
    "Langevin",
    "LinearAnneal",
    "MALA",
    "DenseMass",
    "LowRankMass",
    "MEADS",
    "NUTS",
    "Parametrization",
    "PyroNUTS",
    "RandomizedStepSize",
    "SamplerWarning",
    "Schedule",
    "SoftmaxParametrization",
    "Target",
    "Trajectory",
    "Transform",
    "WarmupLangevinNoise",
    "effective_sample_size",
    "energy_and_grad",
    "log_density",
    "split_rhat", "rank_rhat", "bulk_ess", "tail_ess", "vectorize", "compile_energy", "CompiledEnergy", "AISResult",
    "annealed_importance_sampling", "geometric_schedule", "SGLD", "MinibatchEnergy",
    "SGHMC", "ChainBuffer", "BufferDraw",
    "summary_table",
]
