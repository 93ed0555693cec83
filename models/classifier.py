"""A noise-conditional classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, §4; Su part 9).

It sees what a VP diffusion model sees — x_t = ᾱ_t x0 + β̄_t ε at a training timestep t of the same β schedule,
recorded in its config — and predicts the class of x0. Three conv stages (32→16→8→4 pixels) with GroupNorm,
each shifted by a projection of the sinusoidal timestep embedding (the UNet's time conditioning, diffusers'
``Timesteps`` + ``TimestepEmbedding``), global average pooling, a ``feature_dim`` layer (the features similarity
guidance compares), then logits.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from schedulers.process import VPSchedule, make_betas


class _TimeConditionedBlock(nn.Module):
    """conv → GroupNorm → + time shift → SiLU."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(8, out_channels)
        self.time_shift = nn.Linear(time_dim, out_channels)

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.norm(self.conv(x)) + self.time_shift(time)[:, :, None, None])


class NoisyClassifier(ModelMixin, ConfigMixin):
    """``forward(x_t, timestep) → logits``; ``features(x_t, timestep)`` the penultimate features; ``schedule`` the
    VP process of its inputs."""

    @register_to_config
    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, ...] = (32, 64, 128),
        feature_dim: int = 128,
        time_dim: int = 128,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
    ):
        super().__init__()
        self.schedule = VPSchedule(make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end))
        self.time_projection = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], time_dim)
        blocks, channels = [], in_channels
        for width in widths:
            blocks += [_TimeConditionedBlock(channels, width, time_dim), _TimeConditionedBlock(width, width, time_dim)]
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.feature_layer = nn.Sequential(nn.Linear(channels, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """N×``feature_dim`` features of the noisy images at ``timestep`` (scalar or per sample)."""
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1).expand(len(sample))
        time = self.time_embedding(self.time_projection(t).to(sample.dtype))
        x = sample
        for index, block in enumerate(self.blocks):
            x = block(x, time)
            if index % 2 == 1 and index < len(self.blocks) - 1:  # downsample after each stage but the last
                x = nn.functional.avg_pool2d(x, 2)
        return self.feature_layer(x.mean(dim=(2, 3)))

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        return self.head(self.features(sample, timestep))
