"""EDM's preconditioned denoiser (Karras et al. 2022) under PFGM++'s kernel with D extra dimensions (Xu et al. 2023).

**Kernel.** x = x0 + R u, u uniform on the unit sphere, R = r sqrt(B/(1 − B)), B ~ Beta(N/2, D/2), r = σ√D
(PFGM++ eq. 4 and App. B): a multivariate Student t with D degrees of freedom and scale σ. D → ∞ (``pfgm_D=None``)
is EDM's Gaussian x0 + σ ε, D = 1 PFGM's kernel. Drawing R as σ√D ‖g_N‖/‖g_D‖ with independent standard normal
vectors gives x − x0 = σ√D g_N/‖g_D‖ exactly, the direction g_N/‖g_N‖ for free (``pfgmpp_noise``).

**Network.** F_θ with EDM's preconditioning (Table 1, "ours"), σ_data = 0.5:

    D(x; σ) = c_skip x + c_out F_θ(c_in x; c_noise),   c_skip = σ_d²/(σ² + σ_d²),
    c_out = σ σ_d/sqrt(σ² + σ_d²),   c_in = 1/sqrt(σ² + σ_d²),   c_noise = ¼ ln σ,

trained on the target (x0 − c_skip x)/c_out, on which EDM's weight λ(σ) = 1/c_out² becomes 1 (EDM eq. 8). A
UNet2DModel's sinusoidal embedding has its fastest frequency at 1 rad per unit of time, so it would barely tell
c_noise ∈ [−1.55, 1.10] (σ ∈ [0.002, 80]) apart; the time input is the affine image of c_noise that spans a
DDPM's range, t = 1000 (c_noise − ¼ ln σ_min)/(¼ ln σ_max − ¼ ln σ_min), 0 at σ = 0.002 and 1000 at σ = 80 (σ
outside the range extrapolates linearly). The output is F_θ (``prediction_type="edm"``).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..process import expand_to
from .base import SCHEDULE_DEFAULTS, SigmaProcess, TrainingExample


def per_sample(values: torch.Tensor, like_ndim: int) -> torch.Tensor:
    """(B,) values shaped to broadcast over a (B, …) batch of ``like_ndim`` dimensions."""
    return values.reshape(-1, *[1] * (like_ndim - 1))


def check_extra_dims(D) -> int | None:
    """D as an int, or None for D = ∞ (the Gaussian kernel); ValueError for anything else."""
    if D is None:
        return None
    if isinstance(D, float) and D.is_integer():
        D = int(D)
    if isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ValueError(f"pfgm_D (the number of extra dimensions) must be a positive integer or None (D = ∞), "
                         f"got {D!r}")
    return D


def pfgmpp_noise(shape, sigma, D: int | None, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """x − x0 under the PFGM++ kernel at r = σ√D: σ√D g_N/‖g_D‖ per sample (the module docstring), or σ g_N for
    D = None. ``sigma`` is a scalar or one value per sample; ``generator`` one or a list (one per sample)."""
    D = check_extra_dims(D)
    device = torch.device("cpu") if device is None else device
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).expand(shape[0])
    g = randn_tensor(tuple(shape), generator=generator, device=device, dtype=torch.float64)
    if D is None:
        return (per_sample(sigma, len(shape)) * g).to(dtype)
    extra = randn_tensor((shape[0], D), generator=generator, device=device, dtype=torch.float64)
    radius_scale = sigma * math.sqrt(D) / extra.norm(dim=1)
    return (per_sample(radius_scale, len(shape)) * g).to(dtype)


class PFGMppProcess(SigmaProcess):
    """PFGM++ with ``pfgm_D`` extra dimensions and an EDM-preconditioned network; ``pfgm_D=None`` is ``EDMProcess``."""

    name = "pfgmpp"
    label = "PFGM++ (D: --pfgm-D)"
    model_process = "edm"
    gaussian = False  # heavy-tailed: samplers that draw Gaussian noise do not fit it
    config_defaults = {**SCHEDULE_DEFAULTS, "prediction_type": "edm", "model_process": "edm", "pfgm_D": 128}
    SIGMA_DATA = 0.5
    SIGMA_MIN, SIGMA_MAX = 0.002, 80.0  # EDM's sampling range; the time map's ends
    TIME_SCALE = 1000.0

    def __init__(self, prediction_type: str = "edm", pfgm_D: int | None = 128):
        if prediction_type != "edm":
            raise ValueError(f"an EDM-preconditioned model outputs F_θ (prediction_type 'edm'), "
                             f"got {prediction_type!r}")
        super().__init__(prediction_type)
        self.pfgm_D = check_extra_dims(pfgm_D)

    @classmethod
    def from_config(cls, config) -> PFGMppProcess:
        return cls(config["prediction_type"], config.get("pfgm_D"))

    def noise(self, shape, sigma, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """x − x0 drawn from the kernel at σ (``pfgmpp_noise``)."""
        return pfgmpp_noise(shape, sigma, self.pfgm_D, generator, device, dtype)

    def training_example(self, x0, noise, time) -> TrainingExample:
        """``time``: noise levels σ, (B,) float64; ``noise``: x − x0 drawn from the kernel (``self.noise``)."""
        noisy = x0 + noise
        skip, out = self.skip_and_out(time)
        target = (x0 - expand_to(skip.to(x0.device), x0) * noisy) / expand_to(out.to(x0.device), x0)
        network_input = expand_to(self.input_scale(time).to(x0.device), x0) * noisy
        return TrainingExample(network_input, self.timestep(time).float().to(x0.device), target,
                               torch.ones(len(x0), device=x0.device))

    def input_scale(self, sigma):
        return 1 / (torch.as_tensor(sigma, dtype=torch.float64) ** 2 + self.SIGMA_DATA**2).sqrt()

    def skip_and_out(self, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_skip, c_out) at σ."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        total = sigma**2 + self.SIGMA_DATA**2
        return self.SIGMA_DATA**2 / total, sigma * self.SIGMA_DATA / total.sqrt()

    def timestep(self, sigma):
        log_sigma = torch.log(torch.as_tensor(sigma, dtype=torch.float64))
        low, high = math.log(self.SIGMA_MIN), math.log(self.SIGMA_MAX)
        return self.TIME_SCALE * (log_sigma - low) / (high - low)

    def sigma_of_timestep(self, timestep) -> torch.Tensor:
        low, high = math.log(self.SIGMA_MIN), math.log(self.SIGMA_MAX)
        return torch.exp(low + torch.as_tensor(timestep, dtype=torch.float64) / self.TIME_SCALE * (high - low))

    def sigma_range(self):
        return self.SIGMA_MIN, self.SIGMA_MAX

    def denoised(self, output, x_ve, sigma):
        skip, out = self.skip_and_out(sigma)
        return skip.to(x_ve.dtype) * x_ve + out.to(x_ve.dtype) * output.to(x_ve.dtype)


class EDMProcess(PFGMppProcess):
    """EDM (Karras et al. 2022): PFGM++'s D → ∞ limit, x = x0 + σ ε. Every σ-space sampler drives it."""

    name = "edm"
    label = "EDM (PFGM++ with D → ∞)"
    gaussian = True
    config_defaults = {**SCHEDULE_DEFAULTS, "prediction_type": "edm", "model_process": "edm"}

    def __init__(self, prediction_type: str = "edm"):
        super().__init__(prediction_type, None)

    @classmethod
    def from_config(cls, config) -> EDMProcess:
        return cls(config["prediction_type"])
