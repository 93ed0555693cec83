"""The sampler registry: name → scheduler class plus the contract the pipeline, the app and the tests read.

Modules register their classes with ``@register(...)`` (one class may carry several entries with different
config defaults, e.g. ``ddpm`` and ``ddpm-large``). ``schedulers/__init__.py`` imports every module, so
importing the package fills the registry; the app and the exact-score tests iterate over it.

An entry declares its knobs (the settings a request may change, each with its one range in ``KNOBS``), the forward
processes it drives and the values it requires from the model. Its NFE is not declared: ``SamplerSpec.nfe`` builds
the scheduler and counts the evaluation points ``set_timesteps`` lays out.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .processes import CONFIG_KEYS

SAMPLERS: dict[str, SamplerSpec] = {}

# Keys that describe the trained model's forward process (its ``Process``'s); a sampler built for it inherits them.
TRAINING_KEYS = CONFIG_KEYS


# How a model gets a value a sampler requires.
REQUIREMENT_HINTS = {
    "eps_second_moment": "run `python -m evaluation.analytic_table MODEL_DIR` (Analytic-DPM's E‖ε_θ‖²/d table)",
    "consistency_objective": "distil one (`python -m train.diffusion --objective consistency-distillation --teacher "
                             "MODEL_DIR`) or train one (`--objective consistency-training`; docs/consistency.md)",
    "mean_flow_objective": "train one (`python -m train.diffusion --objective mean-flow`; docs/consistency.md)",
    "mean_value_points": "fit them for your grid and step count with `schedulers.ode.fit_mean_value_points`",
}

# Config values that make a model a different kind of network, which only the samplers requiring them can drive:
# a consistency model's D is no posterior mean, so an ODE or SDE solver would integrate the wrong field.
EXCLUSIVE_REQUIREMENTS = {
    "consistency_objective": "it is a consistency model (its D is the ODE's end point, not a posterior mean): "
                             "sample it with the consistency sampler",
}

MAX_STEPS = 10_000  # num_inference_steps of one request, for every sampler: the pipeline enforces it, the UI reads it


def check_range(name: str, value, low: float, high: float, integer: bool = False,
                exclusive: bool = False) -> float | int:
    """``value`` as a finite number in [low, high], or (low, high) when ``exclusive`` (an int when ``integer``);
    ValueError naming ``name`` else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if integer and value != int(value):
        raise ValueError(f"{name} must be a whole number, got {value}")
    if not (low < value < high if exclusive else low <= value <= high):
        interval = f"({low:g}, {high:g})" if exclusive else f"[{low:g}, {high:g}]"
        raise ValueError(f"{name} must be in {interval}, got {value:g}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class Knob:
    """A setting a request may change: its range, its default, and where it goes — ``"config"``: a constructor
    override of the scheduler; ``"step"``: an argument of every ``step`` call (DDIM's η, Song et al. 2021 eq. 16).

    A ``boolean`` knob is a switch (range [0, 1], value True or False); an ``exclusive`` one excludes its ends."""

    name: str
    low: float
    high: float
    default: float | bool
    target: Literal["config", "step"]
    integer: bool = False
    label: str = ""
    boolean: bool = False
    exclusive: bool = False

    def check(self, value, name: str | None = None) -> float | int | bool:
        """``value`` if it is in range; the ValueError names ``name`` (default: the knob's own name)."""
        if self.boolean:
            if not isinstance(value, bool):
                raise ValueError(f"{name or self.name} must be True or False, got {value!r}")
            return value
        return check_range(name or self.name, value, self.low, self.high, self.integer, self.exclusive)


# Every knob a sampler can declare, with its one range. An entry names its knobs and their defaults.
KNOBS = {knob.name: knob for knob in (
    Knob("eta", 0.0, 1.0, 0.0, "step", label="η (0: deterministic DDIM, 1: DDPM-like)"),
    Knob("noise_level", 0.0, 1.0, 1.0, "config", label="noise level λ (0: probability-flow ODE, 1: reverse SDE)"),
    Knob("corrector_steps", 0, 10, 1, "config", integer=True, label="Langevin corrector steps per step"),
    Knob("rtol", 1e-6, 1e-1, 1e-3, "config", label="relative tolerance of the adaptive solver"),
    Knob("atol", 1e-6, 1e-1, 1e-3, "config", label="absolute tolerance of the adaptive solver"),
    # x̂0 clipping and Imagen's dynamic thresholding (Saharia et al. 2022, §2.3; ``clipping.py``), diffusers' keys
    Knob("clip_sample", 0, 1, False, "config", boolean=True, label="clip x̂0 to ±clip_sample_range"),
    Knob("clip_sample_range", 0.0, math.inf, 1.0, "config", exclusive=True, label="x̂0 clipping range"),
    Knob("thresholding", 0, 1, False, "config", boolean=True,
         label="dynamic thresholding of x̂0 (Imagen; takes precedence over clip_sample)"),
    Knob("dynamic_thresholding_ratio", 0.0, 1.0, 0.995, "config", exclusive=True,
         label="dynamic thresholding: the quantile of |x̂0| per sample"),
    Knob("sample_max_value", 1.0, math.inf, 1.0, "config",
         label="dynamic thresholding: the largest threshold s (1: a static clip to ±1)"),
)}
# The x̂0 clipping knobs: ``register`` declares them on every entry (default: off), as every sampler clips x̂0 or D.
CLIPPING_KNOBS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
                  "sample_max_value")
# The knobs that say how much fresh noise a sampler draws (0: deterministic); a sampler has at most one.
NOISE_KNOBS = ("eta", "noise_level")


@dataclass(frozen=True)
class SamplerSpec:
    """One registered sampler: a scheduler class, the defaults that make it this sampler, and its knobs."""

    name: str
    scheduler_class: type
    family: str  # "ancestral", "ddim", "sde", "ode", …: what kind of reverse process it walks
    stochastic: bool  # whether it draws fresh noise while sampling (η or its equivalent at default)
    processes: tuple[str, ...] = ("vp",)  # forward processes whose models it can drive
    adaptive: bool = False  # chooses its own steps (``solve``), ignoring num_inference_steps
    defaults: dict[str, Any] = field(default_factory=dict)
    knobs: tuple[Knob, ...] = ()  # what a request may set, with this entry's defaults
    requires: tuple[str, ...] = ()  # config values only the model can supply (e.g. Analytic-DPM's table)
    # The fewest network evaluations it is offered at: below them it cannot place the modes of the exact-score
    # benchmark mixture (sliced-W2 gap > 0.3; docs/samplers.md). The pipeline refuses shorter runs of the entry.
    min_nfe: int = 1
    # The steps the app's slider moves to when the sampler is chosen: a one- or few-step sampler's own count
    # (None: the slider keeps its value)
    opening_steps: int | None = None
    description: str = ""
    # Checks of diffusers' common scheduler tests (tests/test_scheduler_common.py, by test name without "test_")
    # where this sampler differs from diffusers on purpose, each with why; docs/architecture.md lists them.
    deliberate: dict[str, str] = field(default_factory=dict)

    def create(self, model_scheduler_config: dict | None = None, **overrides):
        """A scheduler for a model: the model's training process, then this entry's defaults and knob defaults
        (a step knob's default too, where the constructor takes it: DDIM's η is ``step``'s default), then
        ``overrides``.

        ``model_scheduler_config`` is the config of the scheduler shipped with the model (any diffusers or
        project scheduler); only the keys that describe the training process are taken from it.
        """
        accepted = inspect.signature(self.scheduler_class.__init__).parameters
        wanted = (*TRAINING_KEYS, *self.requires)  # a tuned table reaches only the samplers that use it
        config = {k: v for k, v in (model_scheduler_config or {}).items() if k in wanted and k in accepted}
        config.update(self.defaults)
        config.update({knob.name: knob.default for knob in self.knobs if knob.name in accepted})
        config.update(overrides)
        missing = self._missing(config)
        if missing is not None:
            raise ValueError(f"sampler {self.name!r} {missing}")
        return self.scheduler_class(**config)

    # ---------------------------------------------------------------- what fits

    def drives(self, process: str) -> bool:
        return process in self.processes

    def _missing(self, model_scheduler_config: dict | None) -> str | None:
        """"needs … from the model" with the hints to get it, or None when the config has all it requires."""
        config = model_scheduler_config or {}
        missing = [key for key in self.requires if config.get(key) is None]
        if not missing:
            return None
        hints = "; ".join(REQUIREMENT_HINTS[key] for key in missing if key in REQUIREMENT_HINTS)
        return f"needs {', '.join(missing)} from the model" + (f": {hints}" if hints else "")

    def unfit_reason(self, process: str, model_scheduler_config: dict | None) -> str | None:
        """Why it cannot sample a model trained on ``process`` with this scheduler config; None if it can."""
        if not self.drives(process):
            return f"it cannot drive a model trained on the {process!r} process"
        for key, why in EXCLUSIVE_REQUIREMENTS.items():
            if (model_scheduler_config or {}).get(key) is not None and key not in self.requires:
                return why
        missing = self._missing(model_scheduler_config)
        return None if missing is None else f"it {missing}"

    def check_fits(self, process: str, model_scheduler_config: dict | None, model: str = "this model") -> None:
        """ValueError, naming ``model`` and the reason, unless it can sample that model."""
        reason = self.unfit_reason(process, model_scheduler_config)
        if reason is not None:
            raise ValueError(f"sampler {self.name} does not fit {model}: {reason}")

    def available_for(self, process: str, model_scheduler_config: dict | None = None) -> bool:
        """Whether it drives ``process`` and the model supplies everything it requires."""
        return self.unfit_reason(process, model_scheduler_config) is None

    # ---------------------------------------------------------------- knobs

    def knob(self, name: str) -> Knob:
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise ValueError(f"sampler {self.name!r} has no knob {name!r}; its knobs: "
                         f"{', '.join(k.name for k in self.knobs) or 'none'}")

    @property
    def noise_knob(self) -> Knob | None:
        """The knob that sets how much fresh noise it draws (η or the noise level λ), if it has one."""
        return next((knob for knob in self.knobs if knob.name in NOISE_KNOBS), None)

    def settings(self, values: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(constructor overrides, ``step`` arguments) for a request's knob ``values`` (None: the default),
        each checked against its range; the ValueError names the knob."""
        config, step = {}, {}
        for name, value in (values or {}).items():
            knob = self.knob(name)
            if value is not None:
                (config if knob.target == "config" else step)[name] = knob.check(value)
        return config, step

    # ---------------------------------------------------------------- cost

    def nfe(self, num_inference_steps: int, model_scheduler_config: dict | None = None) -> int | None:
        """Network evaluations per image (no guidance) of a run of ``num_inference_steps``, traced, not declared:
        a diffusers-protocol run calls the model once per entry of ``timesteps`` (Heun's 2n − 1, DPM-Solver++ 3M's
        first step of 2). None for an adaptive solver: its controller decides while solving (it reports
        ``nfe_spent`` after)."""
        if self.adaptive:
            return None
        return traced_nfe(self.create(model_scheduler_config), num_inference_steps)

    def steps_within(self, nfe_budget: int, model_scheduler_config: dict | None = None) -> tuple[int, int]:
        """(steps, NFE): the most steps whose run costs at most ``nfe_budget`` evaluations, and that cost; a
        ValueError for a budget below ``min_nfe``."""
        if nfe_budget < self.min_nfe:
            raise ValueError(f"sampler {self.name!r} needs at least {self.min_nfe} evaluations, not {nfe_budget}")
        return steps_within(self.create(model_scheduler_config), nfe_budget)

    def min_steps(self, model_scheduler_config: dict | None = None) -> int | None:
        """The fewest ``num_inference_steps`` whose run costs at least ``min_nfe`` evaluations (None: adaptive)."""
        if self.adaptive:
            return None
        if self.min_nfe <= 1:
            return 1
        scheduler, steps = self.create(model_scheduler_config), 1
        while traced_nfe(scheduler, steps) < self.min_nfe:
            steps += 1
        return steps


def traced_nfe(scheduler, num_inference_steps: int) -> int:
    """Network evaluations of ``scheduler``'s run of ``num_inference_steps``: one per entry of ``timesteps``."""
    scheduler.set_timesteps(num_inference_steps)
    return len(scheduler.timesteps)


def steps_within(scheduler, nfe_budget: int) -> tuple[int, int]:
    """(steps, NFE): the most steps whose run of ``scheduler`` (any diffusers-protocol one) costs at most
    ``nfe_budget`` evaluations, and that cost; the cost grows with the steps, by at least one per step."""
    steps = max(1, nfe_budget)
    while steps > 1 and traced_nfe(scheduler, steps) > nfe_budget:
        steps -= 1
    nfe = traced_nfe(scheduler, steps)
    if nfe > nfe_budget:
        raise ValueError(f"{type(scheduler).__name__} spends {nfe} evaluations on its shortest run, "
                         f"more than the budget {nfe_budget}")
    return steps, nfe


def step_knobs(scheduler) -> dict[str, Knob]:
    """The ``step`` knobs declared for ``scheduler``'s class (every entry of a class declares the same ones);
    none for a scheduler from outside the registry."""
    for spec in SAMPLERS.values():
        if spec.scheduler_class is type(scheduler):
            return {knob.name: knob for knob in spec.knobs if knob.target == "step"}
    return {}


def register(name: str, knobs: dict[str, float] | None = None, **metadata):
    """Class decorator adding a registry entry ``name`` for the decorated scheduler class; ``knobs`` maps the
    names of its ``KNOBS`` to this entry's defaults. Every entry also declares the ``CLIPPING_KNOBS`` (at their
    ``KNOBS`` defaults unless ``knobs`` names them)."""

    def decorate(cls):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        defaults = dict(knobs or {})
        defaults.update({knob: KNOBS[knob].default for knob in CLIPPING_KNOBS if knob not in defaults})
        declared = tuple(dataclasses.replace(KNOBS[knob], default=default) for knob, default in defaults.items())
        # Without ``processes``, the class says which forward processes' models it drives (default: VP).
        entry = {"processes": getattr(cls, "supported_processes", ("vp",)), **metadata}
        spec = SamplerSpec(name=name, scheduler_class=cls, knobs=declared, **entry)
        for knob in declared:
            knob.check(knob.default, f"{name}'s default {knob.name}")
        siblings = [other for other in SAMPLERS.values() if other.scheduler_class is cls]
        if siblings and {k.name for k in siblings[0].knobs if k.target == "step"} != \
                {k.name for k in declared if k.target == "step"}:
            raise ValueError(f"sampler {name!r} declares other step knobs than {siblings[0].name!r}, same class")
        SAMPLERS[name] = spec
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
