"""The MNIST judge: a small CNN digit classifier whose penultimate features stand in for Inception's.

FID (Heusel et al. 2017) compares Inception-v3 features of real and generated images; Inception knows nothing
of 32×32 grayscale digits, so for MNIST this classifier, trained on the ``mnist`` train split, is both the
judge of class-conditional samples (accuracy on their intended labels) and the feature extractor for a
feature-space Fréchet distance (``evaluation.judge``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

JUDGE_IMAGE_SIZE = 32
NATIVE_MNIST_SIZE = 28


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MNISTJudge(ModelMixin, ConfigMixin):
    """Three conv stages (32→16→8→4 pixels), global average pooling, a ``feature_dim`` layer, then logits.

    Input: N×1×32×32 images in [-1, 1]; native 28×28 digits are accepted and padded with background (-1).
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, feature_dim: int = 128, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        stages, in_channels = [], 1
        for width in widths:
            stages += [_conv_block(in_channels, width), _conv_block(width, width), nn.MaxPool2d(2)]
            in_channels = width
        self.trunk = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_layer = nn.Sequential(nn.Linear(in_channels, feature_dim), nn.ReLU(inplace=True))
        # dropout on the features regularises the classifier without changing what features() returns.
        self.classifier = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features, N×``feature_dim``."""
        return self.feature_layer(self.trunk(_as_judge_input(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits, N×``num_classes``."""
        return self.classifier(self.features(images))


def _as_judge_input(images: torch.Tensor) -> torch.Tensor:
    accepted_sizes = {(JUDGE_IMAGE_SIZE, JUDGE_IMAGE_SIZE), (NATIVE_MNIST_SIZE, NATIVE_MNIST_SIZE)}
    if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) not in accepted_sizes:
        raise ValueError(f"the MNIST judge takes N×1×32×32 (or N×1×28×28) images, got shape {tuple(images.shape)}")
    if images.shape[-1] == NATIVE_MNIST_SIZE:
        margin = (JUDGE_IMAGE_SIZE - NATIVE_MNIST_SIZE) // 2
        images = F.pad(images, (margin, margin, margin, margin), value=-1.0)
    return images
