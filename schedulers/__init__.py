"""Schedulers: diffusers-native samplers over one σ-space core (``process.py``), and their registry.

Importing the package registers every sampler; ``SAMPLERS`` maps names to ``SamplerSpec`` entries.
"""

from .consistency import ConsistencyScheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .mean_flow import MeanFlowScheduler
from .ode import AdaptiveODEScheduler, ProbabilityFlowScheduler
from .pfgm import PFGMppScheduler
from .process import PREDICTION_TYPES, VPSchedule, convert, to_x0_and_epsilon
from .registry import SAMPLERS, SamplerSpec, get_sampler, register, samplers_for
from .sde import ReverseSDEScheduler
from .udm import UDMScheduler

__all__ = [
    "AdaptiveODEScheduler",
    "ConsistencyScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "MeanFlowScheduler",
    "PFGMppScheduler",
    "PREDICTION_TYPES",
    "ProbabilityFlowScheduler",
    "ReverseSDEScheduler",
    "SAMPLERS",
    "SamplerSpec",
    "UDMScheduler",
    "VPSchedule",
    "convert",
    "get_sampler",
    "register",
    "samplers_for",
    "to_x0_and_epsilon",
]
