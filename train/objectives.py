"""Training objectives: what a denoiser learns, one class per forward process, and their registry.

An objective turns a clean batch ``(x0, labels)`` and a ``torch.Generator`` into a ``TrainingBatch``

    (noisy, model_kwargs, target, loss_weight)

— the network input x_t, the keyword arguments of the model call (``timestep``, ``class_labels``), the
regression target and a per-sample loss weight — and scores the model's output with a weighted MSE (mean
over pixels, then over the batch). It also says how to sample from the trained model: ``scheduler_config()``
is the config of the matching scheduler and ``model_info()`` the fields a pipeline records about the process.

The forward-process math (noising, the target and weight of each parameterization, the network's time input)
lives in each process's ``schedulers.processes`` class; the objectives only draw the random quantities (times,
noise, label dropout) and call its ``training_example``.

``OBJECTIVES`` maps names to factories: ``vp-eps``, ``vp-x0``, ``vp-v``, ``flow`` (rectified flow /
conditional flow matching), ``pfgmpp`` (PFGM++ with D extra dimensions) and ``edm`` (its D = ∞ limit), and
``udm-blur``, ``udm-mask``, ``udm-noise`` (the unified diffusion model's operators), and the one-step
generators ``consistency-distillation`` (from a teacher), ``consistency-training`` (from scratch) and
``mean-flow`` (MeanFlow's average velocity, from scratch). Later processes register their own.
"""

from __future__ import annotations

import functools
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DModel
from torch.nn.attention import SDPBackend, sdpa_kernel

from models.mean_flow_unet import MeanFlowUNet2DModel
from pipelines.loading import load_pipeline
from schedulers import (
    ConsistencyScheduler,
    DDIMScheduler,
    MeanFlowScheduler,
    PFGMppScheduler,
    ProbabilityFlowScheduler,
    UDMScheduler,
)
from schedulers.process import BETA_SCHEDULES, VPSchedule, expand_to, make_betas
from schedulers.processes import (
    CONFIG_KEYS,
    GAUSSIAN_SIGMA_PROCESSES,
    PROCESSES,
    FlowProcess,
    PFGMppProcess,
    TrainingExample,
    UDMProcess,
    VPProcess,
)
from schedulers.sigmas import make_sigmas

# The VP objectives' registry names, by what the network predicts, and how the app names that.
VP_OBJECTIVE_NAMES = {"epsilon": "vp-eps", "sample": "vp-x0", "v_prediction": "vp-v"}
VP_PREDICTS = {"epsilon": "ε", "sample": "x0", "v_prediction": "v"}
VP_TIMESTEP_SAMPLINGS = ("uniform", "importance")
TIMESTEP_SAMPLINGS = (*VP_TIMESTEP_SAMPLINGS, "logit_normal")  # logit-normal: the flow objective's


class TrainingBatch(NamedTuple):
    """One noised batch: the model input, the model call's keyword arguments, the target, per-sample weights, and
    any per-sample tensors an objective's own ``training_loss`` needs besides (``aux``)."""

    noisy: torch.Tensor
    model_kwargs: dict[str, torch.Tensor | None]
    target: torch.Tensor
    loss_weight: torch.Tensor
    aux: dict[str, torch.Tensor] | None = None

    def select(self, index: slice | torch.Tensor) -> TrainingBatch:
        """The samples at ``index`` (a data-parallel rank's shard of a global batch)."""
        return TrainingBatch(
            self.noisy[index],
            {key: None if value is None else value[index] for key, value in self.model_kwargs.items()},
            self.target[index],
            self.loss_weight[index],
            None if self.aux is None else {key: value[index] for key, value in self.aux.items()},
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
    raise ValueError(f"a VP objective's timestep_sampling is {' or '.join(VP_TIMESTEP_SAMPLINGS)}, "
                     f"got {timestep_sampling!r}")


# --------------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------------


class Objective(ABC):
    """What every objective shares: label dropout for classifier-free guidance and the weighted MSE."""

    name: str
    process: str
    network_class = UNet2DModel  # the network it trains (``models.unet.build_unet``'s ``model_class``)

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
    def make_scheduler(self):
        """The scheduler an exported pipeline ships with (its config is ``scheduler_config()``)."""

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

    def initial_weights(self) -> str | None:
        """An exported pipeline whose UNet the student starts from (a distillation's teacher); None: random."""
        return None

    def training_loss(self, model, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch loss, unweighted per-sample losses) of ``model`` on ``batch``: one call, scored by ``loss``."""
        return self.loss(model(batch.noisy, **batch.model_kwargs).sample, batch)

    def loss(self, model_output: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch loss mean_i w_i · mean_pixels (f_i − y_i)², the unweighted per-sample losses)."""
        if model_output.shape != batch.target.shape:
            raise ValueError(f"model output of shape {tuple(model_output.shape)} does not match the target's "
                             f"{tuple(batch.target.shape)}")
        per_sample = (model_output.float() - batch.target.float()).pow(2).flatten(1).mean(dim=1)
        return (batch.loss_weight.to(per_sample.device) * per_sample).mean(), per_sample.detach()

    def batch(self, example: TrainingExample, labels: torch.Tensor | None, generator: torch.Generator,
              sampling_weight: torch.Tensor | None = None) -> TrainingBatch:
        """A process's ``TrainingExample`` with the labels dropped out, its loss weight times ``sampling_weight``
        (the importance weight of the drawn times, if any)."""
        weight = example.loss_weight if sampling_weight is None else example.loss_weight * sampling_weight
        return TrainingBatch(example.network_input,
                             {"timestep": example.time_input, "class_labels": self.drop_labels(labels, generator)},
                             example.target, weight)

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
    Salimans & Ho 2022 §4) at a timestep drawn uniformly or by importance (``ImportanceTimesteps``), with each
    sample's loss weighted by min-SNR-γ (``snr_gamma``, ``schedulers.processes.vp.min_snr_weight``) or by 1.
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
        snr_gamma: float | None = None,
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
        self.forward_process = VPProcess(prediction_type, self.schedule, snr_gamma)
        self.snr_gamma = snr_gamma
        self.timestep_sampling = timestep_sampling
        self.timesteps = make_timestep_sampler(timestep_sampling, num_train_timesteps)

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        timesteps, weights = self.timesteps.sample(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.batch(self.forward_process.training_example(x0, noise, timesteps), labels, generator,
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
            # No x̂0 clipping, as the registry's samplers default to. Classifier-free guidance pushes x̂0 past
            # [-1, 1]; DDIM once paired the clipped x̂0 with the unclipped ε̂ and lost the class (mnist-vp at w = 3:
            # judge accuracy 53% clipped, 90% not). It now re-derives ε̂ (schedulers/clipping.py), not yet measured.
            "clip_sample": False,
        }

    def make_scheduler(self):
        return DDIMScheduler(**self.scheduler_config())

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "timestep_sampling": self.timestep_sampling, "snr_gamma": self.snr_gamma}


class FlowObjective(Objective):
    """Rectified flow / conditional flow matching (Liu et al. 2022; Lipman et al. 2023; Su parts 15–17).

    On the straight path x_t = (1 − t) x0 + t ε the network regresses the velocity u = dx_t/dt = ε − x0
    (prediction type ``velocity``) at t ∈ (0, 1), fed to it as ``t · time_scale`` so a UNet2DModel's sinusoidal
    time embedding sees the same range as a 1000-step DDPM. t is uniform, or logit-normal (Esser et al. 2024,
    SD3 §3.1: t = sigmoid(n), n ~ N(0, 1), which spends the steps mid-path). In σ-space the path is
    x0 + σ ε with σ = t/(1 − t), so every σ-space sampler drives the model (``schedulers.processes.FlowProcess``).
    """

    name = "flow"
    process = "flow"
    prediction_type = "velocity"

    def __init__(self, timestep_sampling: str = "uniform", label_dropout: float = 0.1,
                 null_class_id: int | None = None, time_scale: int = 1000):
        super().__init__(label_dropout, null_class_id)
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"the flow objective samples t 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        self.timestep_sampling = timestep_sampling
        self.time_scale = time_scale
        self.forward_process = FlowProcess(self.prediction_type, time_scale)

    def _times(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.timestep_sampling == "logit_normal":
            return torch.sigmoid(torch.randn(n, generator=generator))
        return torch.rand(n, generator=generator)

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        t = self._times(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.batch(self.forward_process.training_example(x0, noise, t.to(x0.device)), labels, generator)

    def scheduler_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.time_scale, "prediction_type": self.prediction_type,
                "model_process": self.process, "solver": "heun", "sigma_schedule": "flow"}

    def make_scheduler(self):
        return ProbabilityFlowScheduler(**self.scheduler_config())

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "timestep_sampling": self.timestep_sampling}


class PFGMppObjective(Objective):
    """PFGM++ with ``pfgm_D`` extra dimensions (Xu et al. 2023, ``training/loss.py`` of Newbeeer/pfgmpp).

    σ is drawn as EDM's, ln σ ~ N(P_mean, P_std²) = N(−1.2, 1.2²); r = σ√D and x = x0 + R u with
    R = r sqrt(B/(1 − B)), B ~ Beta(N/2, D/2). The kernel, EDM's preconditioned network and its target and
    weight are ``schedulers.processes.PFGMppProcess``'s.
    """

    name = process = "pfgmpp"
    prediction_type = "edm"
    P_MEAN, P_STD = -1.2, 1.2

    def __init__(self, pfgm_D: int | None = 128, timestep_sampling: str = "uniform", label_dropout: float = 0.1,
                 null_class_id: int | None = None):
        super().__init__(label_dropout, null_class_id)
        if timestep_sampling != "uniform":
            raise ValueError(f"{self.name} draws σ log-normally (EDM); --timestep-sampling must stay 'uniform', "
                             f"got {timestep_sampling!r}")
        self.forward_process = PFGMppProcess(self.prediction_type, pfgm_D)
        self.pfgm_D = self.forward_process.pfgm_D

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        sigma = torch.exp(self.P_MEAN + self.P_STD * torch.randn(len(x0), generator=generator, dtype=torch.float64))
        noise = self.forward_process.noise(x0.shape, sigma, generator).to(x0)
        return self.batch(self.forward_process.training_example(x0, noise, sigma), labels, generator)

    def scheduler_config(self) -> dict[str, Any]:
        return {"prediction_type": self.prediction_type, "model_process": self.forward_process.model_process,
                "pfgm_D": self.pfgm_D, "solver": "heun", "sigma_schedule": "karras",
                "sigma_min": self.forward_process.SIGMA_MIN, "sigma_max": self.forward_process.SIGMA_MAX}

    def make_scheduler(self):
        return PFGMppScheduler(**self.scheduler_config())

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "pfgm_D": self.pfgm_D, "sigma_data": self.forward_process.SIGMA_DATA}


class EDMObjective(PFGMppObjective):
    """EDM (Karras et al. 2022): PFGM++'s D → ∞ limit, x = x0 + σ ε. Every σ-space sampler drives it."""

    name = process = "edm"

    def __init__(self, timestep_sampling: str = "uniform", label_dropout: float = 0.1,
                 null_class_id: int | None = None):
        super().__init__(None, timestep_sampling, label_dropout, null_class_id)

    def scheduler_config(self) -> dict[str, Any]:
        config = super().scheduler_config()
        del config["pfgm_D"]
        return config

    def make_scheduler(self):
        return ProbabilityFlowScheduler(**self.scheduler_config())


class UDMObjective(Objective):
    """The unified diffusion model's x0-prediction (Su part 10): x_t = F_t(x0, ε) for a ``schedulers.udm``
    operator at t ~ U{1, …, T}, loss ‖x0 − G(x_t, t)‖ in L1 (cold diffusion's, Su part 11) or L2.

    The blur operator's prior needs the law of F_T(x0) = x0's mean colour; the objective keeps running sums of
    the per-channel means of the batches it sees (checkpointed), over all images and per class label, and ships
    their means and standard deviations (``UDMOperator.prior`` says why the class matters).
    """

    prediction_type = "sample"
    LOSSES = ("l1", "l2")

    def __init__(self, operator: str = "blur", num_train_timesteps: int | None = None, udm_loss: str = "l1",
                 udm_noise: float = 0.01, timestep_sampling: str = "uniform", label_dropout: float = 0.1,
                 null_class_id: int | None = None):
        super().__init__(label_dropout, null_class_id)
        if udm_loss not in self.LOSSES:
            raise ValueError(f"udm_loss must be one of {self.LOSSES}, got {udm_loss!r}")
        if timestep_sampling != "uniform":
            raise ValueError(f"UDM objectives draw t uniformly; --timestep-sampling must stay 'uniform', "
                             f"got {timestep_sampling!r}")
        self.name = self.process = f"udm-{operator}"
        self.num_train_timesteps = num_train_timesteps or (1000 if operator == "noise" else 200)
        self.udm_loss, self.udm_noise = udm_loss, udm_noise
        self.colour_sums = torch.zeros(3, 0, dtype=torch.float64)  # (count, Σ mean, Σ mean²) per channel
        self.class_colour_sums = torch.zeros(0, 3, 0, dtype=torch.float64)  # the same per class label
        self.forward_process = UDMProcess.from_config(self.make_scheduler().config)  # validated by the scheduler

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        t = torch.randint(1, self.num_train_timesteps + 1, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        example = self.forward_process.training_example(x0, noise, t)
        self._record_colours(x0.detach().double().mean(dim=(2, 3)).cpu(), labels)
        return self.batch(example, labels, generator)

    def _record_colours(self, colours: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Add a batch's (B, C) mean colours to the running sums, and to its labels' rows (labels before dropout)."""
        channels = colours.shape[1]
        if self.colour_sums.shape[1] == 0:
            self.colour_sums = torch.zeros(3, channels, dtype=torch.float64)
        terms = torch.stack([torch.ones_like(colours), colours, colours.pow(2)], dim=1)  # (B, 3, C)
        self.colour_sums += terms.sum(0)
        if labels is None or self.null_class_id is None:
            return
        if self.class_colour_sums.shape[0] == 0:
            self.class_colour_sums = torch.zeros(self.null_class_id, 3, channels, dtype=torch.float64)
        self.class_colour_sums.index_add_(0, labels.cpu().long(), terms)

    def loss(self, model_output: torch.Tensor, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """L2 as the base class's; L1: mean_i w_i · mean_pixels |f_i − y_i|."""
        if self.udm_loss == "l2":
            return super().loss(model_output, batch)
        if model_output.shape != batch.target.shape:
            raise ValueError(f"model output of shape {tuple(model_output.shape)} does not match the target's "
                             f"{tuple(batch.target.shape)}")
        per_sample = (model_output.float() - batch.target.float()).abs().flatten(1).mean(dim=1)
        return (batch.loss_weight.to(per_sample.device) * per_sample).mean(), per_sample.detach()

    def state_dict(self) -> dict[str, Any]:
        return {"colour_sums": self.colour_sums.clone(), "class_colour_sums": self.class_colour_sums.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.colour_sums = state["colour_sums"].clone()
        # a run checkpointed before the per-class sums existed restarts them (the global law is kept meanwhile)
        self.class_colour_sums = state.get("class_colour_sums", torch.zeros(0, 3, 0, dtype=torch.float64)).clone()

    @staticmethod
    def _law(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation from (…, 3, C) sums of (count, Σ x, Σ x²)."""
        count, total, squares = sums.unbind(-2)
        mean = total / count
        return mean, (squares / count - mean**2).clamp(min=0).sqrt()

    def prior_colour(self) -> tuple[list[float] | None, list[float] | None]:
        """Mean and standard deviation of the per-channel mean colour seen so far (None before any batch)."""
        if self.colour_sums.shape[1] == 0:
            return None, None
        mean, std = self._law(self.colour_sums)
        return mean.tolist(), std.tolist()

    def class_prior_colour(self) -> tuple[list[list[float]] | None, list[list[float]] | None]:
        """The same per class label, one row each; None unless every class has been seen."""
        if self.class_colour_sums.shape[0] == 0 or (self.class_colour_sums[:, 0] == 0).any():
            return None, None
        mean, std = self._law(self.class_colour_sums)
        return mean.tolist(), std.tolist()

    def scheduler_config(self) -> dict[str, Any]:
        operator = self.process.removeprefix("udm-")
        mean, std = self.prior_colour()
        class_mean, class_std = self.class_prior_colour()
        return {"num_train_timesteps": self.num_train_timesteps, "udm_operator": operator,
                "udm_noise": self.udm_noise, "udm_rule": "invertible" if operator == "noise" else "improved",
                "udm_prior_mean": mean, "udm_prior_std": std, "udm_prior_class_mean": class_mean,
                "udm_prior_class_std": class_std, "prediction_type": self.prediction_type}

    def make_scheduler(self):
        return UDMScheduler(**self.scheduler_config())

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "udm_loss": self.udm_loss, "udm_noise": self.udm_noise}


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(‖Δ‖² + c²) − c per sample (Song & Dhariwal 2023, "Improved techniques for training consistency models",
    §3.3): ‖Δ‖²/(2c) for small Δ, ‖Δ‖ for large, so outliers weigh less than under the squared distance."""
    return (difference.float().flatten(1).pow(2).sum(dim=1) + c**2).sqrt() - c


class ConsistencyObjective(Objective):
    """What consistency distillation and consistency training share (Song et al. 2023, "Consistency Models").

    The student is the consistency function f_θ(x, σ) = D_θ(x; σ), its process's denoiser (f_θ(x, 0) = x), and
    learns to answer the same at both ends of one step σ_n → σ_{n+1} < σ_n of a grid from σ_max to σ_min,

        L = E λ(σ_n) d(f_θ(x0 + σ_n ε, σ_n), f_{θ⁻}(x_{n+1}, σ_{n+1})),

    with θ⁻ = stopgrad(θ) (improved CT's choice, Song & Dhariwal 2023 §3.2: no EMA target) and d the pseudo-Huber
    distance with c = 0.00054 sqrt(dim) (§3.3). The subclasses say how x_{n+1} is reached (``target_state``): a
    teacher's ODE step (distillation) or the same noise at the lower level (training). Label dropout keeps
    classifier-free guidance available. ``forward_process`` and ``process_config`` are the subclass's.
    """

    HUBER_C = 0.00054  # × sqrt(dimension)

    def consistency_batch(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
                          sigmas: torch.Tensor, n: torch.Tensor, weight: torch.Tensor) -> TrainingBatch:
        """The student's input x0 + σ_n ε for grid steps ``n`` of ``sigmas``, with the step's ends and noise."""
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        sigma, sigma_next = sigmas[n].to(x0.device), sigmas[n + 1].to(x0.device)
        x = x0 + expand_to(sigma, x0) * noise  # the σ-space state
        kwargs = {"timestep": self.forward_process.timestep(sigma).float(),
                  "class_labels": self.drop_labels(labels, generator)}
        return TrainingBatch(expand_to(self.forward_process.input_scale(sigma), x0) * x, kwargs, x0,
                             weight.to(x0.device), {"state": x, "sigma": sigma, "sigma_next": sigma_next,
                                                    "noise": noise})

    def denoise(self, network, x: torch.Tensor, sigma: torch.Tensor, labels) -> torch.Tensor:
        """D(x; σ) of ``network`` at per-sample noise levels σ (the process's input scale, time input and decoding)."""
        output = network(expand_to(self.forward_process.input_scale(sigma), x) * x,
                         self.forward_process.timestep(sigma).float(), class_labels=labels).sample
        return self.forward_process.denoised(output, x, expand_to(sigma, x))

    @abstractmethod
    def target_state(self, batch: TrainingBatch) -> torch.Tensor:
        """x_{n+1}: the point at σ_{n+1} on the trajectory through the student's input (no gradient)."""

    def training_loss(self, model, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x, sigma, sigma_next = batch.aux["state"], batch.aux["sigma"], batch.aux["sigma_next"]
        labels = batch.model_kwargs["class_labels"]
        with torch.no_grad():
            target = self.denoise(model, self.target_state(batch), sigma_next, labels)
        output = model(batch.noisy, **batch.model_kwargs).sample
        student = self.forward_process.denoised(output, x, expand_to(sigma, x))
        per_sample = pseudo_huber(student - target, self.HUBER_C * x[0].numel() ** 0.5)
        return (batch.loss_weight * per_sample).mean(), per_sample.detach()

    def scheduler_config(self) -> dict[str, Any]:
        return {**self.process_config, "consistency_objective": self.name}

    def make_scheduler(self):
        return ConsistencyScheduler(**self.scheduler_config())


def check_consistency_steps(consistency_steps: int, what: str) -> int:
    if isinstance(consistency_steps, bool) or not isinstance(consistency_steps, int) or consistency_steps < 1:
        raise ValueError(f"consistency_steps ({what}) must be an integer ≥ 1, got {consistency_steps!r}")
    return consistency_steps


class ConsistencyDistillationObjective(ConsistencyObjective):
    """Consistency distillation (Song et al. 2023, §4 and Alg. 2; Su part 28).

    The teacher's probability-flow ODE on a grid σ_0 = σ_max > … > σ_N = σ_min of its process's natural schedule
    (N = ``consistency_steps``; ``ConsistencyScheduler``'s grid) links each pair of neighbours by one Heun step of
    the teacher's denoiser D_T (EDM Alg. 1): x_{n+1} = Φ(x0 + σ_n ε; σ_n → σ_{n+1}), n ~ U{0..N−1}, weight 1.
    The student, the teacher's architecture and parameterization, starts from the teacher's weights. The teacher
    runs unguided on the same labels; it is frozen and never checkpointed: resuming reloads it.
    """

    name = "consistency-distillation"
    label = "consistency distillation of a --teacher"
    DEFAULT_STEPS = 20

    def __init__(self, teacher: str | None = None, consistency_steps: int | None = None,
                 timestep_sampling: str = "uniform", label_dropout: float = 0.1, null_class_id: int | None = None):
        super().__init__(label_dropout, null_class_id)
        if teacher is None:
            raise ValueError(f"{self.name} needs --teacher PIPELINE_DIR, an exported vp, flow or edm model "
                             "(e.g. checkpoints/mnist-flow)")
        consistency_steps = check_consistency_steps(
            self.DEFAULT_STEPS if consistency_steps is None else consistency_steps,
            "the teacher ODE's steps from σ_max to σ_min")
        if timestep_sampling != "uniform":
            raise ValueError(f"{self.name} draws the grid step uniformly; --timestep-sampling must stay 'uniform', "
                             f"got {timestep_sampling!r}")
        pipeline = load_pipeline(teacher)
        info = dict(pipeline.config.get("model_info") or {})
        self.process = info.get("process", pipeline.scheduler.config.get("model_process"))
        if self.process not in GAUSSIAN_SIGMA_PROCESSES or getattr(pipeline, "unet", None) is None:
            raise ValueError(f"--teacher {teacher}: a {self.process!r} model has no Gaussian probability-flow ODE "
                             f"to distil; choose a model trained on one of {GAUSSIAN_SIGMA_PROCESSES}")
        if info.get("null_class_id") != null_class_id:
            raise ValueError(f"--teacher {teacher}: its null class is {info.get('null_class_id')}, the student's "
                             f"{null_class_id}: distil with the teacher's conditioning and number of classes "
                             "(--conditional for a class-conditional teacher)")
        self.teacher, self.consistency_steps = str(teacher), consistency_steps
        self.teacher_unet = pipeline.unet.float().eval().requires_grad_(False)
        self.process_config = {key: value for key, value in pipeline.scheduler.config.items() if key in CONFIG_KEYS}
        self.prediction_type = self.process_config["prediction_type"]
        scheduler = self.make_scheduler()
        self.forward_process = scheduler.process
        low, high = scheduler.sigma_range()
        self.sigmas = make_sigmas(scheduler.config.sigma_schedule, consistency_steps + 1, scheduler.schedule, low,
                                  high, scheduler.config.rho)

    def initial_weights(self) -> str:
        return self.teacher

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        n = torch.randint(0, self.consistency_steps, (len(x0),), generator=generator)
        return self.consistency_batch(x0, labels, generator, self.sigmas, n, torch.ones(len(x0)))

    def teacher_step(self, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, labels) -> torch.Tensor:
        """One Heun step of the teacher's probability-flow ODE dx/dσ = (x − D_T(x; σ))/σ (EDM Alg. 1), σ' > 0."""
        teacher = self.teacher_unet.to(x.device)
        h = expand_to(sigma_next - sigma, x)
        slope = (x - self.denoise(teacher, x, sigma, labels)) / expand_to(sigma, x)
        euler = x + h * slope
        slope_next = (euler - self.denoise(teacher, euler, sigma_next, labels)) / expand_to(sigma_next, x)
        return x + h * (slope + slope_next) / 2

    def target_state(self, batch: TrainingBatch) -> torch.Tensor:
        return self.teacher_step(batch.aux["state"], batch.aux["sigma"], batch.aux["sigma_next"],
                                 batch.model_kwargs["class_labels"])

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "teacher": self.teacher, "consistency_steps": self.consistency_steps}


class ConsistencyTrainingObjective(ConsistencyObjective):
    """Consistency training from scratch with the improved-CT recipe (Song & Dhariwal 2023, §3; CM §5, Alg. 3).

    No teacher: the point at the lower level is the same data and noise, x_{n+1} = x0 + σ_{n+1} ε, an unbiased
    one-sample estimate of the ODE step (CM Theorem 2). The EDM process and preconditioning (σ_data = 0.5,
    σ ∈ [0.002, 80]); the Karras ρ = 7 grid with N(k) steps on the discretization curriculum of iCT §3.4,

        N(k) = min(s0 · 2^⌊k/K'⌋, s1),   K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋,   s0 = 10, s1 = ``consistency_steps``,

    over the run's K = ``training_batches`` batches (k counts the batches seen, checkpointed); the step n drawn
    from iCT's discretised log-normal, p(n) ∝ erf((ln σ_n − P_mean)/(√2 P_std)) − erf((ln σ_{n+1} − P_mean)/(√2
    P_std)) with (P_mean, P_std) = (−1.1, 2.0) (§3.5), and weighted λ(σ_n) = 1/(σ_n − σ_{n+1}) (§3.1).
    """

    name = "consistency-training"
    label = "consistency training (improved CT) from scratch"
    process = prediction_type = "edm"
    DEFAULT_STEPS = 1280  # s1
    INITIAL_STEPS = 10  # s0
    P_MEAN, P_STD = -1.1, 2.0

    def __init__(self, consistency_steps: int | None = None, training_batches: int = 400_000,
                 timestep_sampling: str = "uniform", label_dropout: float = 0.1, null_class_id: int | None = None):
        super().__init__(label_dropout, null_class_id)
        self.consistency_steps = check_consistency_steps(
            self.DEFAULT_STEPS if consistency_steps is None else consistency_steps,
            "the curriculum's final number of grid steps, s1")
        if self.consistency_steps < self.INITIAL_STEPS:
            raise ValueError(f"consistency_steps (s1) must be at least the curriculum's first {self.INITIAL_STEPS} "
                             f"grid steps, got {self.consistency_steps}")
        if isinstance(training_batches, bool) or not isinstance(training_batches, int) or training_batches < 1:
            raise ValueError(f"training_batches must be an integer ≥ 1, got {training_batches!r}")
        if timestep_sampling != "uniform":
            raise ValueError(f"{self.name} draws σ from iCT's discretised log-normal; --timestep-sampling must stay "
                             f"'uniform', got {timestep_sampling!r}")
        edm = EDMObjective()
        self.process_config = {key: value for key, value in edm.scheduler_config().items() if key in CONFIG_KEYS}
        scheduler = self.make_scheduler()
        self.forward_process, self.schedule, self.rho = scheduler.process, scheduler.schedule, scheduler.config.rho
        self.sigma_range = scheduler.sigma_range()
        self.training_batches = training_batches
        self.batches_seen = 0

    def curriculum_steps(self, batch_index: int) -> int:
        """N(k): the grid's number of steps at batch k (iCT §3.4's doubling schedule)."""
        doublings = math.floor(math.log2(self.consistency_steps // self.INITIAL_STEPS))
        stage_length = max(self.training_batches // (doublings + 1), 1)
        return min(self.INITIAL_STEPS * 2 ** (batch_index // stage_length), self.consistency_steps)

    def grid(self, num_steps: int) -> torch.Tensor:
        """The N + 1 Karras levels from σ_max down to σ_min."""
        low, high = self.sigma_range
        return make_sigmas("karras", num_steps + 1, self.schedule, low, high, self.rho)

    def step_probabilities(self, sigmas: torch.Tensor) -> torch.Tensor:
        """iCT's discretised log-normal over the grid's steps σ_n → σ_{n+1}."""
        cdf = torch.erf((sigmas.double().log() - self.P_MEAN) / (math.sqrt(2) * self.P_STD))
        mass = cdf[:-1] - cdf[1:]
        return mass / mass.sum()

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        sigmas = self.grid(self.curriculum_steps(self.batches_seen)).double()
        self.batches_seen += 1
        n = torch.multinomial(self.step_probabilities(sigmas), len(x0), replacement=True, generator=generator)
        weight = 1.0 / (sigmas[n] - sigmas[n + 1])
        return self.consistency_batch(x0, labels, generator, sigmas.float(), n, weight.float())

    def target_state(self, batch: TrainingBatch) -> torch.Tensor:
        return batch.target + expand_to(batch.aux["sigma_next"], batch.target) * batch.aux["noise"]

    def state_dict(self) -> dict[str, Any]:
        return {"batches_seen": torch.tensor(self.batches_seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches_seen = int(state["batches_seen"])

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "consistency_steps": self.consistency_steps, "sigma_data": self.forward_process.SIGMA_DATA}


class MeanFlowObjective(Objective):
    """MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"; Su part 30): the average velocity

        u(z_t, r, t) = 1/(t − r) ∫_r^t v(z_τ, τ) dτ   on the flow path z_t = (1 − t) x0 + t ε, v = ε − x0,

    so that one evaluation jumps z_r = z_t − (t − r) u(z_t, r, t) (eq. 1, 5). Differentiating (t − r) u in t gives
    the MeanFlow identity u = v − (t − r) d/dt u, with the total derivative d/dt u = v ∂_z u + ∂_t u, the
    Jacobian–vector product of u_θ along (v, 0, 1) in (z, r, t) (eq. 6, 8), here ``torch.func.jvp``. The loss
    regresses u_θ on the stop-gradient target (eq. 9–10)

        L = w ‖u_θ(z_t, r, t) − sg(v − (t − r) d/dt u_θ)‖²,   w = sg(1 / (‖Δ‖² + c)^p), p = 1, c = 10⁻³ (§4.3).

    (t, r): two draws of the logit-normal lognorm(−0.4, 1.0) (``timestep_sampling="logit_normal"``, the paper's
    best) or uniform, sorted so that t ≥ r; a share 1 − ``mean_flow_ratio`` of them gets r = t, where the target is
    plain flow matching's v (Table 1a: 25% of r ≠ t is best). Only the r ≠ t samples need the JVP; it runs without
    a graph (the target is stop-gradient anyway) on the unwrapped network and with PyTorch's math attention,
    which has a forward-mode rule; the trained output comes from an ordinary call of the (data-parallel) model.
    ``mean_flow_guidance`` ω > 1 trains classifier-free guidance into the one-step map (§4.2, eq. 13–16): the
    labelled samples' velocity becomes ṽ = ω v + (1 − ω) u_θ(z_t, t, t | ∅). The network is
    ``MeanFlowUNet2DModel`` fed (t, t − r); at r = t it is a flow model, so every flow sampler drives it too.

    The times reach the network unscaled (``time_scale`` 1, as in the paper's code), not as flow matching's
    t · 1000: the JVP differentiates the sinusoidal time embedding, whose fastest features at scale 1000 turn
    ∂_t u into noise. On mnist28 after 250 steps at scale 1000, the time part of (t − r) d/dt u had a mean square
    of 6.5 against v's 1.9, and the loss grew (docs/consistency.md).
    """

    name = "mean-flow"
    process = "flow"
    prediction_type = "velocity"
    label = "MeanFlow average velocity u(z, r, t) (one-step flow)"
    network_class = MeanFlowUNet2DModel
    TIME_MEAN, TIME_STD = -0.4, 1.0  # the logit-normal of t and r (Geng et al. 2025, Table 1d)
    WEIGHT_POWER, WEIGHT_EPS = 1.0, 1e-3  # the adaptive loss weight's p and c (§4.3)

    def __init__(self, timestep_sampling: str = "logit_normal", label_dropout: float = 0.1,
                 null_class_id: int | None = None, time_scale: int = 1, mean_flow_ratio: float = 0.25,
                 mean_flow_guidance: float = 1.0):
        super().__init__(label_dropout, null_class_id)
        if timestep_sampling not in ("uniform", "logit_normal"):
            raise ValueError(f"mean-flow samples (t, r) 'uniform' or 'logit_normal', got {timestep_sampling!r}")
        if not 0.0 < mean_flow_ratio <= 1.0:
            raise ValueError(f"mean_flow_ratio (the share of samples with r ≠ t) must be in (0, 1], "
                             f"got {mean_flow_ratio}")
        if not mean_flow_guidance >= 1.0:
            raise ValueError(f"mean_flow_guidance ω must be ≥ 1 (1: no guidance trained in), got {mean_flow_guidance}")
        if mean_flow_guidance != 1.0 and (null_class_id is None or label_dropout == 0.0):
            raise ValueError("mean_flow_guidance > 1 needs a class-conditional model trained with label dropout > 0 "
                             "(the unconditional velocity u_θ(z, t, t | ∅) is part of its target)")
        self.timestep_sampling = timestep_sampling
        self.time_scale = time_scale
        self.mean_flow_ratio = mean_flow_ratio
        self.mean_flow_guidance = mean_flow_guidance
        self.forward_process = FlowProcess(self.prediction_type, time_scale)

    def times(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r) for n samples: t ≥ r, and r = t for a share 1 − ``mean_flow_ratio``."""
        if self.timestep_sampling == "logit_normal":
            draws = torch.sigmoid(self.TIME_MEAN + self.TIME_STD * torch.randn(2, n, generator=generator))
        else:
            draws = torch.rand(2, n, generator=generator)
        t, r = draws.max(dim=0).values, draws.min(dim=0).values
        same = torch.rand(n, generator=generator) >= self.mean_flow_ratio
        return t, torch.where(same, t, r)

    def sample(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> TrainingBatch:
        t, r = self.times(len(x0), generator)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        batch = self.batch(self.forward_process.training_example(x0, noise, t.to(x0.device)), labels, generator)
        interval = ((t - r) * self.time_scale).to(x0.device)
        return batch._replace(model_kwargs={**batch.model_kwargs, "interval": interval},
                              aux={"t": t.to(x0.device), "r": r.to(x0.device)})

    def guided_velocity(self, network, z: torch.Tensor, kwargs: dict, velocity: torch.Tensor) -> torch.Tensor:
        """ṽ = ω v + (1 − ω) u_θ(z, t, t | ∅) for the labelled samples, v for the null-class ones (eq. 16)."""
        labels = kwargs["class_labels"]
        if self.mean_flow_guidance == 1.0 or labels is None:
            return velocity
        null = torch.full_like(labels, self.null_class_id)
        with torch.no_grad():
            unconditional = network(z, kwargs["timestep"], class_labels=null).sample
        guided = self.mean_flow_guidance * velocity + (1 - self.mean_flow_guidance) * unconditional
        labelled = (labels != self.null_class_id).reshape(-1, *[1] * (velocity.dim() - 1))
        return torch.where(labelled, guided, velocity)

    def target(self, network, batch: TrainingBatch) -> torch.Tensor:
        """sg(ṽ − (t − r) d/dt u_θ): the JVP of u_θ along (ṽ, 0, 1), for the samples with r ≠ t only."""
        kwargs, t, r = batch.model_kwargs, batch.aux["t"], batch.aux["r"]
        velocity = self.guided_velocity(network, batch.noisy, kwargs, batch.target)
        moving = (t != r).nonzero().flatten()
        if len(moving) == 0:
            return velocity
        labels = None if kwargs["class_labels"] is None else kwargs["class_labels"][moving]
        time, interval = kwargs["timestep"][moving], kwargs["interval"][moving]
        # d/dt on the network's time scale: the timestep and the interval t − r both grow by time_scale per unit t
        scale = float(self.time_scale)
        tangents = (velocity[moving], torch.full_like(time, scale), torch.full_like(interval, scale))

        def average_velocity(z, time, interval):
            return network(z, time, class_labels=labels, interval=interval).sample

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            _, total_derivative = torch.func.jvp(average_velocity, (batch.noisy[moving], time, interval), tangents)
        target = velocity.clone()
        target[moving] = velocity[moving] - expand_to(t - r, velocity)[moving] * total_derivative
        return target

    def training_loss(self, model, batch: TrainingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        network = getattr(model, "module", model)  # the JVP and the guidance run outside data parallelism
        target = self.target(network, batch)
        output = model(batch.noisy, **batch.model_kwargs).sample
        squared = (output.float() - target.float()).pow(2).flatten(1).sum(dim=1)
        weight = 1 / (squared.detach() + self.WEIGHT_EPS) ** self.WEIGHT_POWER
        per_pixel = squared.detach() / batch.noisy[0].numel()
        return (batch.loss_weight * weight * squared).mean(), per_pixel

    def scheduler_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.time_scale, "prediction_type": self.prediction_type,
                "model_process": self.process, "sigma_schedule": "flow", "mean_flow_objective": self.name}

    def make_scheduler(self):
        return MeanFlowScheduler(**self.scheduler_config())

    def model_info(self) -> dict[str, Any]:
        return {"process": self.process, "prediction_type": self.prediction_type, "objective": self.name,
                "timestep_sampling": self.timestep_sampling, "mean_flow_ratio": self.mean_flow_ratio,
                "mean_flow_guidance": self.mean_flow_guidance}


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

OBJECTIVES: dict[str, Callable[..., Objective]] = {
    **{name: functools.partial(VPObjective, prediction_type=prediction_type)
       for prediction_type, name in VP_OBJECTIVE_NAMES.items()},
    "flow": FlowObjective,
    "pfgmpp": PFGMppObjective,
    "edm": EDMObjective,
    **{f"udm-{operator}": functools.partial(UDMObjective, operator=operator) for operator in ("blur", "mask", "noise")},
    "consistency-distillation": ConsistencyDistillationObjective,
    "consistency-training": ConsistencyTrainingObjective,
    "mean-flow": MeanFlowObjective,
}


def objective_label(name: str) -> str:
    """How the app names objective ``name``: its process's label (and, for VP, what the network predicts)."""
    for prediction_type, vp_name in VP_OBJECTIVE_NAMES.items():
        if name == vp_name:
            return f"{VPProcess.label}, predicts {VP_PREDICTS[prediction_type]}"
    if name in PROCESSES:
        return PROCESSES[name].label
    return getattr(OBJECTIVES.get(name), "label", name)


def accepted_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that objective ``name``'s factory takes (a process's own settings, such as
    ``pfgm_D``, reach only the objectives that have them)."""
    factory = OBJECTIVES[name]
    cls = factory.func if isinstance(factory, functools.partial) else factory
    return {key: value for key, value in options.items() if key in inspect.signature(cls.__init__).parameters}


def make_objective(name: str, **options) -> Objective:
    """The objective registered as ``name``, built with ``options`` (label_dropout, null_class_id, …)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](**options)
