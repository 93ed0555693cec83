"""Variational autoencoders for small images: a convolutional VAE and a small hierarchical NVAE-style VAE.

Both decode to a per-pixel discretized logistic distribution over the 256 levels of 8-bit data scaled to [-1, 1]
(Salimans et al. 2017, PixelCNN++, eq. 2; the bins are those of DDPM's discrete decoder, Ho et al. 2020 eq. 13:
width 2/255 around each level, the end bins stretched to ±∞). The ELBO is then a bound on the *discrete*
log-likelihood of the 8-bit image, and bits/dim = −ELBO / (D ln 2) needs no dequantization correction.

``ConvVAE``: Kingma & Welling 2014 with a convolutional encoder/decoder and one flat Gaussian latent.

``HierarchicalVAE`` (Vahdat & Kautz 2020, NVAE; seed_methods.md §4.2), scaled for a CPU: latent groups
z_1 … z_L on a top-down path at 4×4, 8×8 and 16×16, prior p(z_l | z_<l) = N(μ_l, σ_l²) from the top-down state,
and the residual posterior q(z_l | z_<l, x) = N(μ_l + Δμ_l, σ_l² · Δσ_l²) (NVAE eq. 2), whose KL against the prior
is ½ Σ (Δμ²/σ² + Δσ² − log Δσ² − 1) (NVAE eq. 3). Residual cells use swish; no BatchNorm, no flows, no
depthwise convolutions (a small model does not need them).

Both support class conditioning (a learned embedding added to the encoder's and decoder's features) and carry
one power-iteration vector per convolution for NVAE's spectral regularization (``spectral_norm_sum``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from data import check_image_size

LEVELS = 256
HALF_BIN = 1.0 / (LEVELS - 1)  # half the width 2/255 of one 8-bit level on [-1, 1]
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor on the logistic's log-scale
SOFT_CLAMP = 5.0  # NVAE's soft clamp of log σ: 5·tanh(x/5)


class VAEOutput(NamedTuple):
    """Decoder distribution (per-pixel logistic location and log-scale) and the KL per image, in nats."""

    mean: torch.Tensor
    log_scale: torch.Tensor
    kl: torch.Tensor


def discretized_logistic_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit images x ∈ [-1, 1] under per-pixel discretized logistics, summed per image (nats).

    P(x) = σ((x + 1/255 − μ)/s) − σ((x − 1/255 − μ)/s), with the CDF taken as 0 below the first bin and 1 above
    the last (PixelCNN++ eq. 2). Computed with log-sigmoids, and with the density at the bin centre times the
    bin width where the CDF difference underflows, as PixelCNN++'s code does.
    """
    centred = x - mean
    inv_scale = torch.exp(-log_scale)
    plus = inv_scale * (centred + HALF_BIN)
    minus = inv_scale * (centred - HALF_BIN)
    log_cdf_plus = plus - F.softplus(plus)  # log σ(plus): the lowest bin
    log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 − σ(minus)): the highest bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    middle = inv_scale * centred
    log_pdf_middle = middle - log_scale - 2.0 * F.softplus(middle) + math.log(2 * HALF_BIN)
    log_middle = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_middle)
    edge = 1.0 - HALF_BIN  # halfway between the last two levels, 253/255 … 1
    log_prob = torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_minus, log_middle))
    return log_prob.flatten(1).sum(dim=1)


def gaussian_kl(delta_mean: torch.Tensor, delta_log_sigma: torch.Tensor,
                prior_log_sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """KL(N(μ + Δμ, σ²Δσ²) ‖ N(μ, σ²)) = ½ Σ (Δμ²/σ² + Δσ² − log Δσ² − 1), summed per image (NVAE eq. 3).

    With μ = 0, σ = 1 it is the plain VAE's KL(N(m, s²) ‖ N(0, I)) (Kingma & Welling 2014, appendix B).
    """
    prior_log_sigma = torch.as_tensor(prior_log_sigma, dtype=delta_mean.dtype, device=delta_mean.device)
    kl = 0.5 * (delta_mean**2 * torch.exp(-2 * prior_log_sigma) + torch.exp(2 * delta_log_sigma)
                - 2 * delta_log_sigma - 1)
    return kl.flatten(1).sum(dim=1)


def soft_clamp(x: torch.Tensor) -> torch.Tensor:
    return SOFT_CLAMP * torch.tanh(x / SOFT_CLAMP)


class _SpectralMixin:
    """One power-iteration vector per convolution, kept as a buffer (NVAE §3.2's spectral regularization)."""

    def _init_power_iteration(self) -> None:
        generator = torch.Generator().manual_seed(0)
        for index, conv in enumerate(self._convolutions()):
            u = torch.randn(conv.weight.shape[0], generator=generator)
            self.register_buffer(f"spectral_u_{index}", u / u.norm())

    def _convolutions(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]

    def spectral_norm_sum(self, power_iterations: int = 1) -> torch.Tensor:
        """Σ_i s_i, the largest singular values of every convolution's kernel reshaped to a matrix, each estimated
        by ``power_iterations`` steps of power iteration from its stored vector (Miyato et al. 2018, Algorithm 1;
        NVAE's L_SR = λ Σ_i s_i). The vectors are updated in place; the gradient flows through W only."""
        total = 0.0
        for index, conv in enumerate(self._convolutions()):
            weight = conv.weight.flatten(1)
            u = getattr(self, f"spectral_u_{index}")
            with torch.no_grad():
                for _ in range(power_iterations):
                    v = F.normalize(weight.t() @ u, dim=0)
                    u = F.normalize(weight @ v, dim=0)
                getattr(self, f"spectral_u_{index}").copy_(u)
            total = total + u @ weight @ v
        return total


def _class_embedding(num_classes: int, dim: int) -> nn.Embedding | None:
    return nn.Embedding(num_classes, dim) if num_classes else None


def _embed(embedding: nn.Embedding | None, class_labels: torch.Tensor | None, features: torch.Tensor) -> torch.Tensor:
    """``features`` plus the class embedding (broadcast over space for feature maps)."""
    if embedding is None:
        return features
    if class_labels is None:
        raise ValueError("this VAE is class-conditional: pass class_labels")
    added = embedding(class_labels)
    return features + added.view(*added.shape, *([1] * (features.ndim - 2)))


def _check_size(image_size: int) -> None:
    check_image_size(image_size, 8)
    if image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of 2 of at least 8, got {image_size}")


class ConvVAE(_SpectralMixin, ModelMixin, ConfigMixin):
    """x → q(z|x) = N(m, s²) over ``latent_dim`` dims → decoder → per-pixel discretized logistic."""

    @register_to_config
    def __init__(self, latent_dim: int = 32, base_channels: int = 32, image_size: int = 32, channels: int = 1,
                 num_classes: int = 0):
        super().__init__()
        _check_size(image_size)
        levels = int(math.log2(image_size // 4))  # stride-2 stages between the image and a 4×4 map
        widths = [base_channels * min(2**i, 4) for i in range(levels + 1)]  # 32, 64, 128, 128 at 32×32
        encoder = [nn.Conv2d(channels, widths[0], 3, 1, 1), nn.SiLU()]
        for width_in, width_out in zip(widths, widths[1:]):
            encoder += [nn.Conv2d(width_in, width_out, 4, 2, 1), nn.SiLU()]
        self.encoder = nn.Sequential(*encoder, nn.Flatten())
        flat = widths[-1] * 16
        self.encoder_class = _class_embedding(num_classes, flat)
        self.posterior = nn.Linear(flat, 2 * latent_dim)
        self.decoder_class = _class_embedding(num_classes, latent_dim)
        decoder = [nn.Linear(latent_dim, flat), nn.Unflatten(1, (widths[-1], 4, 4)), nn.SiLU()]
        for width_in, width_out in zip(widths[::-1], widths[-2::-1]):
            decoder += [nn.ConvTranspose2d(width_in, width_out, 4, 2, 1), nn.SiLU()]
        self.decoder = nn.Sequential(*decoder, nn.Conv2d(widths[0], 2 * channels, 3, 1, 1))
        self._init_power_iteration()

    def encode(self, images: torch.Tensor, class_labels: torch.Tensor | None = None):
        """The posterior's mean and log-std, each N×latent_dim."""
        features = _embed(self.encoder_class, class_labels, self.encoder(images))
        mean, log_std = self.posterior(features).chunk(2, dim=1)
        return mean, soft_clamp(log_std)

    def decode(self, z: torch.Tensor, class_labels: torch.Tensor | None = None):
        """Per-pixel logistic location and log-scale for latents z."""
        mean, log_scale = self.decoder(_embed(self.decoder_class, class_labels, z)).chunk(2, dim=1)
        return mean, log_scale.clamp(min=MIN_LOG_SCALE)

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, use_mean: bool = False) -> VAEOutput:
        """One reparameterized posterior draw (its mean with ``use_mean``) decoded, and KL(q(z|x) ‖ N(0, I))."""
        mean, log_std = self.encode(images, class_labels)
        z = mean if use_mean else mean + torch.exp(log_std) * randn_tensor(
            mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return VAEOutput(*self.decode(z, class_labels), gaussian_kl(mean, log_std))

    def sample(self, batch_size: int, generator=None, class_labels: torch.Tensor | None = None,
               temperature: float = 1.0):
        """Decoder outputs for z ~ N(0, temperature² I)."""
        z = temperature * randn_tensor((batch_size, self.config.latent_dim), generator=generator,
                                       device=self.device, dtype=self.dtype)
        return self.decode(z, class_labels)


def _zero(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class _ResidualCell(nn.Module):
    """x + conv(swish(conv(swish(x)))) (NVAE's residual cell without BatchNorm and squeeze-excitation)."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, 1, 1), nn.SiLU(),
                                  nn.Conv2d(width, width, 3, 1, 1))
        _zero(self.body[-1])  # every cell starts as the identity, so a deep unnormalised stack stays bounded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class HierarchicalVAE(_SpectralMixin, ModelMixin, ConfigMixin):
    """NVAE-style VAE: a bottom-up encoder, a top-down path with ``groups_per_scale`` latent groups at 4×4, 8×8,
    16×16 … (coarse first), each ``latent_channels`` channels, and the residual posterior of NVAE eq. 2."""

    @register_to_config
    def __init__(self, width: int = 48, latent_channels: int = 8, groups_per_scale: tuple[int, ...] = (2, 2, 1),
                 image_size: int = 32, channels: int = 1, num_classes: int = 0):
        super().__init__()
        _check_size(image_size)
        scales = [4 * 2**i for i in range(len(groups_per_scale))]
        if not groups_per_scale or scales[-1] >= image_size or min(groups_per_scale) < 1:
            raise ValueError(f"groups_per_scale needs 1 to {int(math.log2(image_size // 8)) + 1} positive entries "
                             f"(latent scales 4×4, 8×8, … below {image_size}×{image_size}), got {groups_per_scale}")
        self.scales = scales
        self.stem = nn.Conv2d(channels, width, 3, 1, 1)
        # bottom-up: image_size → … → 4×4, a residual cell and a stride-2 convolution per halving
        self.down = nn.ModuleList(nn.Sequential(_ResidualCell(width), nn.Conv2d(width, width, 4, 2, 1))
                                  for _ in range(int(math.log2(image_size // 4))))
        self.encoder_class = _class_embedding(num_classes, width)
        self.decoder_class = _class_embedding(num_classes, width)
        self.top = nn.Parameter(torch.zeros(1, width, 4, 4))  # the top-down path's learned input h_0
        groups = sum(groups_per_scale)
        self.prior = nn.ModuleList(nn.Conv2d(width, 2 * latent_channels, 3, 1, 1) for _ in range(groups))
        self.posterior = nn.ModuleList(nn.Conv2d(2 * width, 2 * latent_channels, 3, 1, 1) for _ in range(groups))
        self.merge = nn.ModuleList(nn.Sequential(nn.Conv2d(latent_channels, width, 3, 1, 1), _ResidualCell(width))
                                   for _ in range(groups))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(width, width, 3, 1, 1),
                                              _ResidualCell(width))
                                for _ in range(int(math.log2(image_size // 4))))
        self.output = nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * channels, 3, 1, 1))
        for layer in (*self.prior, *self.posterior):
            _zero(layer)  # start with q = p = N(0, I) in every group: KL 0, no exploding Δμ²/σ²
        self._init_power_iteration()

    def _encoder_features(self, images: torch.Tensor, class_labels) -> dict[int, torch.Tensor]:
        """Bottom-up features at every latent scale, by side length."""
        h, features = self.stem(images), {}
        for down in self.down:
            h = down(h)
            features[h.shape[-1]] = h
        features[4] = _embed(self.encoder_class, class_labels, features[4])
        return features

    def _top_down(self, batch_size: int, class_labels, features: dict[int, torch.Tensor] | None, generator,
                  temperature: float = 1.0, use_mean: bool = False):
        """Walk the latent groups coarse to fine; posterior draws when ``features`` are given, prior draws
        otherwise. Returns the decoder distribution and the summed KL per image (zero when sampling)."""
        h = _embed(self.decoder_class, class_labels, self.top.expand(batch_size, -1, -1, -1))
        kl = h.new_zeros(batch_size)
        group = 0
        for level, up in enumerate(self.up):
            for _ in range(self.config.groups_per_scale[level] if level < len(self.scales) else 0):  # coarse first
                prior_mean, prior_log_sigma = self.prior[group](h).chunk(2, dim=1)
                if group == 0:  # the first group's prior is N(0, I): nothing above it to condition on
                    prior_mean, prior_log_sigma = torch.zeros_like(prior_mean), torch.zeros_like(prior_log_sigma)
                prior_log_sigma = soft_clamp(prior_log_sigma)
                mean, log_sigma = prior_mean, prior_log_sigma
                if features is not None:
                    delta_mean, delta_log_sigma = self.posterior[group](
                        torch.cat([h, features[h.shape[-1]]], dim=1)).chunk(2, dim=1)
                    delta_log_sigma = soft_clamp(delta_log_sigma)
                    kl = kl + gaussian_kl(delta_mean, delta_log_sigma, prior_log_sigma)
                    mean, log_sigma = prior_mean + delta_mean, prior_log_sigma + delta_log_sigma
                noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                z = mean if use_mean else mean + temperature * torch.exp(log_sigma) * noise
                h = h + self.merge[group](z)
                group += 1
            h = up(h)
        mean, log_scale = self.output(h).chunk(2, dim=1)
        return mean, log_scale.clamp(min=MIN_LOG_SCALE), kl

    def forward(self, images: torch.Tensor, class_labels: torch.Tensor | None = None,
                generator: torch.Generator | None = None, use_mean: bool = False) -> VAEOutput:
        """Posterior draws of every group (their means with ``use_mean``) decoded, and the summed KL."""
        features = self._encoder_features(images, class_labels)
        return VAEOutput(*self._top_down(len(images), class_labels, features, generator, use_mean=use_mean))

    def sample(self, batch_size: int, generator=None, class_labels: torch.Tensor | None = None,
               temperature: float = 1.0):
        """Decoder outputs for prior draws of every group, each with its noise scaled by ``temperature``."""
        mean, log_scale, _ = self._top_down(batch_size, class_labels, None, generator, temperature)
        return mean, log_scale
