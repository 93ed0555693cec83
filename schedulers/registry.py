"""The sampler registry: name → scheduler class plus what the app and the tests need to know about it.

Modules register their classes with ``@register(...)`` (one class may carry several entries with different
config defaults, e.g. ``ddpm`` and ``ddpm-large``). ``schedulers/__init__.py`` imports every module, so
importing the package fills the registry; the app and the exact-score tests iterate over it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from .processes import CONFIG_KEYS

SAMPLERS: dict[str, SamplerSpec] = {}

# Keys that describe the trained model's forward process (its ``Process``'s); a sampler built for it inherits them.
TRAINING_KEYS = CONFIG_KEYS


# How a model gets a value a sampler requires.
REQUIREMENT_HINTS = {
    "eps_second_moment": "run `python -m schedulers.analytic MODEL_DIR` (Analytic-DPM's E‖ε_θ‖²/d table)",
    "mean_value_points": "fit them for your grid and step count with `schedulers.ode.fit_mean_value_points`",
}


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler: a scheduler class and the defaults that make it this sampler."""

    name: str
    scheduler_class: type
    family: str  # "ancestral", "ddim", "sde", "ode", …: what kind of reverse process it walks
    stochastic: bool  # whether it draws fresh noise while sampling (η or its equivalent at default)
    processes: tuple[str, ...] = ("vp",)  # forward processes whose models it can drive
    nfe_per_step: int = 1  # network evaluations per step of num_inference_steps (0: adaptive)
    adaptive: bool = False  # chooses its own steps (``solve``), ignoring num_inference_steps
    defaults: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()  # config values only the model can supply (e.g. Analytic-DPM's table)
    description: str = ""

    def create(self, model_scheduler_config: dict | None = None, **overrides):
        """A scheduler for a model: the model's training process, then this entry's defaults, then overrides.

        ``model_scheduler_config`` is the config of the scheduler shipped with the model (any diffusers or
        project scheduler); only the keys that describe the training process are taken from it.
        """
        accepted = inspect.signature(self.scheduler_class.__init__).parameters
        wanted = (*TRAINING_KEYS, *self.requires)  # a tuned table reaches only the samplers that use it
        config = {k: v for k, v in (model_scheduler_config or {}).items() if k in wanted and k in accepted}
        config.update(self.defaults)
        config.update(overrides)
        missing = [key for key in self.requires if config.get(key) is None]
        if missing:
            hints = "; ".join(REQUIREMENT_HINTS[key] for key in missing if key in REQUIREMENT_HINTS)
            raise ValueError(f"sampler {self.name!r} needs {', '.join(missing)} from the model"
                             + (f": {hints}" if hints else ""))
        return self.scheduler_class(**config)

    def drives(self, process: str) -> bool:
        return process in self.processes

    def available_for(self, process: str, model_scheduler_config: dict | None = None) -> bool:
        """Whether it drives ``process`` and the model supplies everything it requires."""
        config = model_scheduler_config or {}
        return self.drives(process) and all(config.get(key) is not None for key in self.requires)


def register(name: str, **metadata):
    """Class decorator adding a registry entry ``name`` for the decorated scheduler class."""

    def decorate(cls):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        # Without ``processes``, the class says which forward processes' models it drives (default: VP).
        entry = {"processes": getattr(cls, "supported_processes", ("vp",)), **metadata}
        SAMPLERS[name] = SamplerSpec(name=name, scheduler_class=cls, **entry)
        return cls

    return decorate


def get_sampler(name: str) -> SamplerSpec:
    """The registry entry ``name``, with a message listing the known names when it is unknown."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; registered: {', '.join(sorted(SAMPLERS))}") from None


def samplers_for(process: str = "vp", model_scheduler_config: dict | None = None) -> list[str]:
    """Names of the samplers that can drive a model trained on ``process``, in registration order; with the
    model's scheduler config, only those whose requirements it meets."""
    if model_scheduler_config is None:
        return [name for name, spec in SAMPLERS.items() if spec.drives(process)]
    return [name for name, spec in SAMPLERS.items() if spec.available_for(process, model_scheduler_config)]
