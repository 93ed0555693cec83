"""Poisson flow generative models: PFGM (Xu et al. 2022; Su part 13) and PFGM++ (Xu et al. 2023).

**PFGM++.** Data x0 ∈ R^N gets D extra dimensions. The perturbation kernel is the field of a point charge in
N + D dimensions seen on the data plane,

    p_r(x | x0) ∝ (‖x − x0‖² + r²)^{−(N+D)/2},     x = x0 + R u,  R = r sqrt(B/(1 − B)),  B ~ Beta(N/2, D/2),

u uniform on the unit sphere (PFGM++ eq. 4 and App. B; ``training/loss.py`` of Newbeeer/pfgmpp). With r = σ√D
this is a multivariate Student t with D degrees of freedom and scale σ, so D → ∞ recovers EDM's Gaussian
x0 + σ ε and D = 1 is PFGM's kernel. Drawing R as σ√D ‖g_N‖/‖g_D‖ with independent standard normal vectors
(B = ‖g_N‖²/(‖g_N‖² + ‖g_D‖²) is Beta(N/2, D/2)) gives x − x0 = σ√D g_N/‖g_D‖ exactly, the direction g_N/‖g_N‖
for free, and every draw from a seedable ``torch.Generator`` (Su part 14 notes the same ratio trick for PFGM).

The backward ODE in r, dx/dr = (x − E[x0 | x])/r (PFGM++ eq. 6), is in σ = r/√D the probability-flow ODE
dx/dσ = (x − D(x; σ))/σ of EDM. So the σ-space solvers of ``ode.py`` sample PFGM++ unchanged once they draw
their start from the heavy-tailed prior, R = σ_max √D sqrt(B/(1 − B)) (``generate.py: rand_beta_prime``):
``PFGMppScheduler`` does that in ``sample_prior``, entries ``pfgmpp-heun`` and ``pfgmpp-euler``. The network
is an EDM-preconditioned denoiser; the kernel (``pfgmpp_noise``) and the network's preconditioning are the forward
process's, ``processes.edm.PFGMppProcess``.

**PFGM (D = 1).** The charges sit at (y_i, 0) in N + 1 dimensions; the empirical Poisson field of a batch,
the paper's normalized training target, its prior on the plane z = z_max and the backward ODE in log z are
here as exact-field tools (``poisson_field``, ``normalized_field_target``, ``pfgm_prior``, ``pfgm_sample``).
Along that ODE dx/dz = E_x/E_z = (x − E[y | x])/z with the D = 1 kernel at r = z: it is PFGM++'s σ-ODE with
D = 1, which tests/test_pfgm.py checks trajectory by trajectory.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401 (from_pretrained looks it up here)

from .ode import SOLVERS, ProbabilityFlowScheduler
from .processes import EDMProcess, PFGMppProcess, takes_process_config
from .processes.edm import check_extra_dims, per_sample, pfgmpp_noise
from .registry import register
from .sigma_base import SIGMA_SPACE_DEFAULTS


def pfgmpp_log_kernel(distance_sq: torch.Tensor, sigma, N: int, D: int | None) -> torch.Tensor:
    """log p_r(x | x0), normalized, as a function of ‖x − x0‖² (r = σ√D): the multivariate Student t

        Γ((N+D)/2) / (Γ(D/2) (π D σ²)^{N/2}) · (1 + ‖x − x0‖²/(D σ²))^{−(N+D)/2},

    and N(0, σ² I) for D = None (its D → ∞ limit)."""
    D = check_extra_dims(D)
    distance_sq = torch.as_tensor(distance_sq, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if D is None:
        return -N / 2 * torch.log(2 * math.pi * sigma**2) - distance_sq / (2 * sigma**2)
    return (math.lgamma((N + D) / 2) - math.lgamma(D / 2) - N / 2 * torch.log(math.pi * D * sigma**2)
            - (N + D) / 2 * torch.log1p(distance_sq / (D * sigma**2)))


def point_set_posterior_mean(points: torch.Tensor, x: torch.Tensor, sigma, D: int | None) -> torch.Tensor:
    """E[x0 | x] when x0 is uniform on the rows of ``points`` (K, …) and x = x0 + PFGM++ noise at σ: the weights
    are the kernel's values, softmax_k log p_r(x | y_k). ``x`` is (B, …) like the points; ``sigma`` scalar or (B,)."""
    flat_points = points.reshape(len(points), -1).double()
    flat_x = x.reshape(len(x), -1).double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=flat_x.device).expand(len(x))[:, None]
    distance_sq = torch.cdist(flat_x, flat_points.to(flat_x.device)) ** 2
    log_weights = pfgmpp_log_kernel(distance_sq, sigma, flat_x.shape[1], D)
    return (torch.softmax(log_weights, dim=1) @ flat_points.to(flat_x.device)).reshape(x.shape).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# PFGM++ sampling: the EDM ODE from the heavy-tailed prior
# --------------------------------------------------------------------------------------------------


@register("pfgmpp-euler", family="pfgm", stochastic=False, processes=("pfgmpp",), defaults={"solver": "euler"},
          description="PFGM++: Euler in σ from the heavy-tailed prior, Karras steps")
@register("pfgmpp-heun", family="pfgm", stochastic=False, processes=("pfgmpp",),
          defaults={"solver": "heun"},
          description="PFGM++: Heun in σ (EDM Alg. 1) from the heavy-tailed prior, Karras steps (Xu et al. 2023)")
class PFGMppScheduler(ProbabilityFlowScheduler):
    """The probability-flow ODE in σ for a PFGM++ model with ``pfgm_D`` extra dimensions, started from the
    PFGM++ prior x_T = σ_max√D g_N/‖g_D‖ (``sample_prior``, which ``DiffusionImagePipeline`` calls) instead of
    Gaussian noise. ``pfgm_D=None`` is D = ∞: EDM, a Gaussian start. Any σ-space solver of ``ode.py`` works."""

    @register_to_config
    @takes_process_config({**PFGMppProcess.config_defaults, **SIGMA_SPACE_DEFAULTS})
    def __init__(
        self,
        solver: str = "heun",
    ):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {tuple(SOLVERS)}")
        check_extra_dims(self.config.pfgm_D)
        self._init_sigma_space()

    def sample_prior(self, shape, generator=None, device=None, dtype=torch.float32, class_labels=None) -> torch.Tensor:
        """x_T on the heavy-tailed PFGM++ prior at σ_max, the first σ of the current grid; the same for every class
        (``class_labels``, part of the ``sample_prior`` protocol, plays no part)."""
        return pfgmpp_noise(shape, float(self.sigmas[0]), self.config.pfgm_D, generator, device, dtype)


class PointSetDenoiser(ModelMixin, ConfigMixin):
    """A ``UNet2DModel`` stand-in that is a perfectly trained EDM-preconditioned PFGM++ network for data
    uniform on a finite set of points: it answers F = (E[x0 | x] − c_skip x)/c_out with the exact posterior
    mean (``point_set_posterior_mean``) under the kernel with ``pfgm_D`` extra dimensions (None: Gaussian)."""

    @register_to_config
    @takes_process_config(PFGMppProcess.config_defaults)
    def __init__(self, sample_size: int | tuple[int, int] = 4, in_channels: int = 1, num_points: int = 1,
                 pfgm_D: int | None = 128):
        super().__init__()
        check_extra_dims(pfgm_D)
        h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        self.register_buffer("points", torch.zeros(num_points, in_channels, h, w, dtype=torch.float64))
        self.process = EDMProcess()

    @classmethod
    def from_points(cls, points: torch.Tensor, pfgm_D: int | None) -> PointSetDenoiser:
        """Wrap ``points`` of shape (K, C, H, W)."""
        model = cls(sample_size=tuple(points.shape[2:]), in_channels=points.shape[1], num_points=len(points),
                    pfgm_D=pfgm_D)
        model.points.copy_(points)
        return model

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True):
        sigma = self.process.sigma_of_timestep(torch.as_tensor(timestep).cpu()).reshape(-1).expand(len(sample))
        c_in = per_sample(self.process.input_scale(sigma), sample.ndim)
        x = sample.cpu().double() / c_in
        denoised = point_set_posterior_mean(self.points.cpu(), x, sigma, self.config.pfgm_D)
        skip, out = (per_sample(c, sample.ndim) for c in self.process.skip_and_out(sigma))
        output = ((denoised - skip * x) / out).to(device=sample.device, dtype=sample.dtype)
        return UNet2DOutput(sample=output) if return_dict else (output,)


# --------------------------------------------------------------------------------------------------
# PFGM (D = 1): the Poisson field in N + 1 dimensions
# --------------------------------------------------------------------------------------------------


def _field_terms(x: torch.Tensor, z: torch.Tensor, data: torch.Tensor):
    """log of each charge's coefficient (1/n) / (S_{N+1} ‖x̃ − ỹ_i‖^{N+1}) and the differences x̃ − ỹ_i, where
    x̃ = (x, z) and ỹ_i = (y_i, 0): shapes (B, n) and (B, n, N + 1)."""
    flat_x = x.reshape(len(x), -1).double()
    flat_data = data.reshape(len(data), -1).double()
    N = flat_x.shape[1]
    z = torch.as_tensor(z, dtype=torch.float64).expand(len(x))
    diff_x = flat_x[:, None, :] - flat_data[None, :, :]
    diff = torch.cat([diff_x, z[:, None, None].expand(-1, len(flat_data), 1)], dim=2)
    log_area = math.log(2) + (N + 1) / 2 * math.log(math.pi) - math.lgamma((N + 1) / 2)  # S_{N+1}(1)
    log_coefficients = -(N + 1) * diff.norm(dim=2).log() - log_area - math.log(len(flat_data))
    return log_coefficients, diff


def poisson_field(x: torch.Tensor, z, data: torch.Tensor) -> torch.Tensor:
    """The empirical Poisson field of unit charges at (y_i, 0), evaluated at (x, z) (PFGM eq. 3; Su part 13):

        E(x̃) = (1/n) Σ_i (x̃ − ỹ_i) / (S_{N+1}(1) ‖x̃ − ỹ_i‖^{N+1}),

    float64, shape (B, N + 1) (the last column is E_z). Its magnitude under- or overflows for large N; the ODE
    and the training target use only its direction (``normalized_field_target``, ``pfgm_ode``)."""
    log_coefficients, diff = _field_terms(x, z, data)
    return (log_coefficients.exp()[:, :, None] * diff).sum(dim=1)


def normalized_field_target(x: torch.Tensor, z, data: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """PFGM's training target (Alg. 1; ``losses.py`` of Newbeeer/Poisson_flow): the field direction over a
    batch of data, E = Σ_i c_i (ỹ_i − x̃) with c_i ∝ ‖x̃ − ỹ_i‖^{−(N+1)} summing to 1, scaled as
    E/(‖E‖ + γ)·sqrt(N). It points towards the data, against the field; shape (B, N + 1)."""
    log_coefficients, diff = _field_terms(x, z, data)
    field = -(torch.softmax(log_coefficients, dim=1)[:, :, None] * diff).sum(dim=1)
    N = field.shape[1] - 1
    return field / (field.norm(dim=1, keepdim=True) + gamma) * math.sqrt(N)


def pfgm_prior(num_samples: int, sample_shape, z_max: float, generator=None) -> torch.Tensor:
    """x on the plane z = z_max: R = z_max sqrt(B/(1 − B)), B ~ Beta(N/2, 1/2), uniform direction (PFGM's
    ``prior_sampling``), drawn as z_max g_N/|g_1|: ``pfgmpp_noise`` with D = 1 and σ = z_max."""
    return pfgmpp_noise((num_samples, *sample_shape), z_max, 1, generator, dtype=torch.float64)


def pfgm_ode(data: torch.Tensor, x: torch.Tensor, z_max: float, z_min: float, steps: int) -> torch.Tensor:
    """The PFGM backward ODE in t = log z (``sampling.py: get_rk45_sampler_pfgm``), dx/dt = z E_x/E_z with the
    exact empirical field of ``data``, from z_max down to z_min by ``steps`` classical Runge–Kutta steps."""
    if not 0 < z_min < z_max or steps < 1:
        raise ValueError(f"need 0 < z_min < z_max and steps ≥ 1, got z_min={z_min}, z_max={z_max}, steps={steps}")

    def drift(x, log_z):
        z = math.exp(log_z)
        log_coefficients, diff = _field_terms(x, z, data)
        field = (torch.softmax(log_coefficients, dim=1)[:, :, None] * diff).sum(dim=1)  # ∝ E, same direction
        return (z * field[:, :-1] / field[:, -1:]).reshape(x.shape)

    x = x.double()
    h = (math.log(z_min) - math.log(z_max)) / steps
    for i in range(steps):
        t = math.log(z_max) + i * h
        k1 = drift(x, t)
        k2 = drift(x + h / 2 * k1, t + h / 2)
        k3 = drift(x + h / 2 * k2, t + h / 2)
        k4 = drift(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def pfgm_sample(data: torch.Tensor, num_samples: int, z_max: float = 40.0, z_min: float = 1e-5, steps: int = 200,
                seed: int = 0) -> torch.Tensor:
    """A demo of PFGM with the exact field of ``data`` (n, …): prior samples carried by the log-z ODE onto the
    data points (the notebook's picture; z_max = 40 as the paper's CIFAR-10 setting). Near the end x − y
    shrinks ∝ z, from a start at radius R to about R z_min/z_max; the prior's tail reaches R ~ 10⁴ (the paper
    clips R at 3,000 and stops at z_min = 10⁻³), hence the smaller z_min."""
    x = pfgm_prior(num_samples, data.shape[1:], z_max, torch.Generator().manual_seed(seed))
    return pfgm_ode(data, x, z_max, z_min, steps)
