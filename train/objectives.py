"""Training objectives: what a denoiser learns, one class per forward process, and their registry.

An objective turns a clean batch ``(x0, labels)`` and a ``torch.Generator`` into a ``TrainingBatch``

    (noisy, model_kwargs, target, loss_weight)

— the network input x_t, the keyword arguments of the model call (``timestep``, ``class_labels``), the
regression target and a per-sample loss weight — and scores the model's output with a weighted MSE (mean
over pixels, then over the batch). It also says how to sample from the trained model: ``scheduler_config()``
is the config of the matching scheduler and ``model_info()`` the fields a pipeline records about the process.

The forward-process math (ᾱ_t, β̄_t, the targets of each parameterization) lives in ``schedulers.process``;
the objectives only draw the random quantities and call it.

``OBJECTIVES`` maps names to factories: ``vp-eps``, ``vp-x0``, ``vp-v``. Later processes register their own.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from schedulers.process import BETA_SCHEDULES, VPSchedule, expand_to, make_betas, target_from_x0_and_epsilon

# The VP objectives' registry names, by what the network predicts.
VP_OBJECTIVE_NAMES = {"epsilon": "vp-eps", "sample": "vp-x0", "v_prediction": "vp-v"}
TIMESTEP_SAMPLINGS = ("uniform", "importance")


class TrainingBatch(NamedTuple):
    """One noised batch: the model input, the model call's keyword arguments, the target, per-sample weights."""

    noisy: torch.Tensor
    model_kwargs: dict[str, torch.Tensor | None]
    target: torch.Tensor
    loss_weight: torch.Tensor

    def select(self, index: slice | torch.Tensor) -> TrainingBatch:
        """The samples at ``index`` (a data-parallel rank's shard of a global batch)."""
        return TrainingBatch(
            self.noisy[index],
            {key: None if value is None else value[index] for key, value in self.model_kwargs.items()},
            self.target[index],
            self.loss_weight[index],
        )


# --------------------------------------------------------------------------------------------------
# Timestep samplers
# --------------------------------------------------------------------------------------------------


class UniformTimesteps:
    """t ~ U{0, …, T−1}, every weight 1: the plain DDPM objective (Ho et al. 2020, Algorithm 1)."""

    def __init__(self, num_train_timesteps: int):
        self.num_train_timesteps = num_train_timesteps

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        timesteps = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        return timesteps, torch.ones(n)

    def observe(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from the losses."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"uniform timestep sampling has no state, got keys {sorted(state)}")


class ImportanceTimesteps:
    """Importance-sampled t (Nichol & Dhariwal 2021, "Improved DDPM", §3.3).

    Keeps the last ``history`` losses seen at every t and samples p_t ∝ sqrt(E[L_t²]), mixed with a little
    uniform mass (``uniform_mix``, as the paper's code does) so no p_t reaches 0. The weight 1/(T p_t) makes
    E_{t~p}[w_t L_t] = (1/T) Σ_t L_t, the uniform-t loss: the estimate stays unbiased and E[w] = 1. Until every
    t has a full history the sampler is uniform (weights 1), as in the paper.
    """

    def __init__(self, num_train_timesteps: int, history: int = 10, uniform_mix: float = 1e-3):
        if history < 1:
            raise ValueError(f"importance sampling needs a history of at least 1 loss per timestep, got {history}")
        if not 0.0 < uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
        self.num_train_timesteps = num_train_timesteps
        self.uniform_mix = uniform_mix
        self.losses = torch.zeros(num_train_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_train_timesteps, dtype=torch.int64)  # losses seen per t, ever

    @property
    def warmed_up(self) -> bool:
        return bool(torch.all(self.counts >= self.losses.shape[1]))

    def probabilities(self) -> torch.Tensor:
        """p_t ∝ sqrt(E[L_t²]) over the history, mixed with uniform; uniform before the warm-up ends."""
        T = self.num_train_timesteps
        if not self.warmed_up:
            return torch.full((T,), 1.0 / T, dtype=torch.float64)
        root_mean_square = self.losses.pow(2).mean(dim=1).sqrt()
        p = root_mean_square / root_mean_square.sum()
        return p * (1 - self.uniform_mix) + self.uniform_mix / T

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities()
        timesteps = torch.multinomial(p, n, replacement=True, generator=generator)
        weights = 1.0 / (self.num_train_timesteps * p[timesteps])
        return timesteps, weights.float()

    def observe(self, timesteps: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each (t, L_t) to t's ring buffer, in batch order (later duplicates of a t overwrite older)."""
        history = self.losses.shape[1]
        for t, loss in zip(timesteps.tolist(), losses.detach().double().cpu().tolist()):
            self.losses[t, self.counts[t] % history] = loss
            self.counts[t] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"importance history of shape {tuple(state['losses'].shape)} does not fit "
                             f"{tuple(self.losses.shape)} (T × history)")
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


def make_timestep_sampler(timestep_sampling: str, num_train_timesteps: int):
    if timestep_sampling == "uniform":
        return UniformTimesteps(num_train_timesteps)
    if timestep_sampling == "importance":
        return ImportanceTimesteps(num_train_timesteps)
    raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; choose one of {TIMESTEP_SAMPLINGS}")


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


class Objective(ABC):
    """What every objective shares: label dropout for classifier-free guidance and the weighted MSE."""

    name: str
    process: str

    def __init__(self, label_dropout: float, null_class_id: int | None):
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.label_dropout = label_dropout
        self.null_class_id = null_class_id

    @abstractmethod
    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        """Noise a clean batch; every random draw comes from ``generator``."""

    @abstractmethod
    def scheduler_config(self) -> dict[str, Any]:
        """The config of a scheduler that samples from a model trained with this objective."""

    @abstractmethod
    def model_info(self) -> dict[str, Any]:
        """The fields a pipeline's ``model_info`` records about the process (``process``, ``objective``, …)."""

    def observe(self, model_kwargs: dict[str, torch.Tensor | None], losses: torch.Tensor) -> None:  # noqa: B027
        """Feed back the unweighted per-sample losses of a (global) batch; adaptive objectives learn from them."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep for training to resume exactly (accelerate's checkpointing protocol)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")

    def loss(self, model_output: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch loss mean_i w_i · mean_pixels (f_i − y_i)², the unweighted per-sample losses)."""
        if model_output.shape != batch.target.shape:
            raise ValueError(f"model output of shape {tuple(model_output.shape)} does not match the target's "
                             f"{tuple(batch.target.shape)}")
        per_sample = (model_output.float() - batch.target.float()).pow(2).flatten(1).mean(dim=1)
        return (batch.loss_weight.to(per_sample.device) * per_sample).mean(), per_sample.detach()

    def drop_labels(self, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor | None:
        """Replace each label by the null class with probability ``label_dropout`` (Ho & Salimans 2022, Alg. 1)."""
        if labels is None:
            return None
        if self.null_class_id is None:
            raise ValueError("class labels were given, but the objective has no null_class_id (an unconditional "
                             "model); pass null_class_id to train a class-conditional one")
        drop = torch.rand(labels.shape, generator=generator) < self.label_dropout
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.null_class_id), labels)


class VPObjective(Objective):
    """The discrete variance-preserving (DDPM) objective: x_t = ᾱ_t x0 + β̄_t ε (Ho et al. 2020, eq. 4).

    The network regresses ε (``epsilon``, DDPM eq. 14), x0 (``sample``) or v = ᾱ ε − β̄ x0 (``v_prediction``,
    Salimans & Ho 2022 §4) at a timestep drawn uniformly or by importance (``ImportanceTimesteps``).
    """

    process = "vp"

    def __init__(
        self,
        prediction_type: str = "epsilon",
        beta_schedule: str = "linear",
        num_train_timesteps: int = 1000,
        timestep_sampling: str = "uniform",
        label_dropout: float = 0.1,
        null_class_id: int | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        super().__init__(label_dropout, null_class_id)
        if prediction_type not in VP_OBJECTIVE_NAMES:
            raise ValueError(f"a VP objective predicts one of {tuple(VP_OBJECTIVE_NAMES)}, got {prediction_type!r}")
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
        self.name = VP_OBJECTIVE_NAMES[prediction_type]
        self.prediction_type = prediction_type
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.schedule = VPSchedule(make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end))
        self.timestep_sampling = timestep_sampling
        self.timesteps = make_timestep_sampler(timestep_sampling, num_train_timesteps)

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        n = len(x0)
        timesteps, weights = self.timesteps.sample(n, generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        alpha, beta = self.schedule.coefficients(timesteps)
        timesteps, alpha, beta = timesteps.to(x0.device), alpha.to(x0.device), beta.to(x0.device)
        noisy = expand_to(alpha, x0) * x0 + expand_to(beta, x0) * noise
        target = target_from_x0_and_epsilon(self.prediction_type, x0, noise, alpha, beta)
        class_labels = self.drop_labels(labels, generator)
        return TrainingBatch(noisy, {"timestep": timesteps, "class_labels": class_labels}, target,
                             weights.to(x0.device))

    def observe(self, model_kwargs: dict[str, torch.Tensor | None], losses: torch.Tensor) -> None:
        self.timesteps.observe(model_kwargs["timestep"].cpu(), losses)

    def state_dict(self) -> dict[str, Any]:
        return self.timesteps.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.timesteps.load_state_dict(state)

    def scheduler_config(self) -> dict[str, Any]:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": self.beta_schedule,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": self.prediction_type,
            # No x̂0 clipping: classifier-free guidance pushes x̂0 past [-1, 1], and DDIM with a clipped x̂0 but
            # the unclipped ε̂ then loses the class (mnist-vp at w = 3: judge accuracy 53% clipped, 90% not).
            "clip_sample": False,
        }

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, Callable[..., Objective]] = {
    name: functools.partial(VPObjective, prediction_type=prediction_type)
    for prediction_type, name in VP_OBJECTIVE_NAMES.items()
}


def make_objective(name: str, **options) -> Objective:
    """The objective registered as ``name``, built with ``options`` (label_dropout, null_class_id, …)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](**options)
