"""DCGAN-style generator and critic for small images (32×32), optionally class-conditional, with O-GAN's encoder.

Architecture after Radford et al. 2016 (DCGAN) as Su's GAN-QP code builds it (seed_methods.md §4.3): the
generator maps z through a linear layer to a 4×4 map, then stride-2 transposed convolutions with BatchNorm and
ReLU double the size up to the image, ending in tanh; the critic is stride-2 convolutions with LeakyReLU(0.2)
and BatchNorm on every layer but the first. Kernels are 4×4 (stride 2, padding 1) so sizes halve exactly.

Class conditioning: the generator adds a learned class embedding to z; the critic is a projection
discriminator (Miyato & Koyama 2018, eq. 3), T(x, y) = ψ(φ(x)) + ⟨e_y, φ(x)⟩.

O-GAN (Su 2019, seed_methods.md §4.5): the critic is split as T = ψ ∘ E with E(x) ∈ R^{latent_dim}, and with
``ogan=True`` its score is Su's simplest form ψ(e) = mean(e), so E is trained as an encoder by the correlation
loss between z and E(G(z)) (``train.gan.correlation``); images are reconstructed as G(N(E(x))).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from data import check_image_size

BASE_SIZE = 4  # the generator's first feature map and the critic's last are 4×4
LEAKY_SLOPE = 0.2


def _levels(image_size: int) -> int:
    """How many stride-2 stages separate a 4×4 map from ``image_size``."""
    check_image_size(image_size, BASE_SIZE)
    levels = (image_size // BASE_SIZE).bit_length() - 1
    if BASE_SIZE * 2**levels != image_size:
        raise ValueError(f"image_size must be 4 times a power of 2 (8, 16, 32, 64, …), got {image_size}")
    return levels


class Generator(ModelMixin, ConfigMixin):
    """z (N×latent_dim) [+ class label] → N×C×H×W image in [-1, 1].

    Widths run from ``base_channels · 2^(levels−1)`` at 4×4 down to ``base_channels`` before the last layer.
    """

    @register_to_config
    def __init__(self, latent_dim: int = 64, base_channels: int = 64, image_size: int = 32, channels: int = 1,
                 num_classes: int = 0):
        super().__init__()
        levels = _levels(image_size)
        widths = [base_channels * 2 ** (levels - 1 - i) for i in range(levels)]  # e.g. 256, 128, 64 at 32×32
        self.class_embedding = nn.Embedding(num_classes, latent_dim) if num_classes else None
        self.project = nn.Sequential(
            nn.Linear(latent_dim, widths[0] * BASE_SIZE * BASE_SIZE, bias=False),
            nn.Unflatten(1, (widths[0], BASE_SIZE, BASE_SIZE)),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        layers = []
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(width_in, width_out, 4, 2, 1, bias=False), nn.BatchNorm2d(width_out),
                       nn.ReLU()]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this generator is class-conditional: pass class_labels")
            z = z + self.class_embedding(class_labels)
        return self.upsample(self.project(z))


class Critic(ModelMixin, ConfigMixin):
    """The critic T(x[, y]) = ψ(E(x)) [+ ⟨e_y, E(x)⟩], with E: image → R^{latent_dim} (O-GAN's encoder)."""

    @register_to_config
    def __init__(self, latent_dim: int = 64, base_channels: int = 64, image_size: int = 32, channels: int = 1,
                 num_classes: int = 0, ogan: bool = False):
        super().__init__()
        levels = _levels(image_size)
        layers, width_in = [], channels
        for i in range(levels):
            width = base_channels * 2**i
            layers += [nn.Conv2d(width_in, width, 4, 2, 1, bias=i == 0)]
            layers += [nn.LeakyReLU(LEAKY_SLOPE)] if i == 0 else [nn.BatchNorm2d(width), nn.LeakyReLU(LEAKY_SLOPE)]
            width_in = width
        self.trunk = nn.Sequential(*layers, nn.Flatten())
        self.encode_layer = nn.Linear(width_in * BASE_SIZE * BASE_SIZE, latent_dim)
        # O-GAN's simplest form scores with the mean of the code; otherwise a learned linear read-out ψ.
        self.score_layer = None if ogan else nn.Sequential(nn.LeakyReLU(LEAKY_SLOPE), nn.Linear(latent_dim, 1))
        self.class_projection = nn.Embedding(num_classes, latent_dim) if num_classes else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """E(x): N×latent_dim features (the latent code under O-GAN)."""
        return self.encode_layer(self.trunk(images))

    def score(self, code: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """T from E(x): ψ(E(x)), plus the projection ⟨e_y, E(x)⟩ when class-conditional; shape (N,)."""
        score = code.mean(dim=1) if self.score_layer is None else self.score_layer(code).squeeze(1)
        if self.class_projection is not None:
            if class_labels is None:
                raise ValueError("this critic is class-conditional: pass class_labels")
            score = score + (self.class_projection(class_labels) * code).sum(dim=1) / code.shape[1] ** 0.5
        return score

    def forward(self, images: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(T(x[, y]) of shape (N,), E(x) of shape N×latent_dim): O-GAN's losses need both from one pass."""
        code = self.encode(images)
        return self.score(code, class_labels), code
