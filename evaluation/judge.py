"""Scoring MNIST images with the trained judge: accuracy on intended labels, and a feature-space FID.

``feature_fid`` is the Fréchet distance of Heusel et al. 2017 (GANs Trained by a Two Time-Scale Update Rule,
§"Fréchet Inception Distance"), d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½), between Gaussians fitted
to the judge's 128-d penultimate features instead of Inception's (``evaluation.distances.frechet_distance``, on
torchmetrics' ``FrechetInceptionDistance``). Its values are on the judge's own feature scale: compare them with
``real_fid_floor`` (two halves of real held-out digits), not with Inception FIDs. ``evaluation.metrics`` gathers
every sample-quality metric, these included, behind one entry point.

``load_judge`` is the one way to load the judge (every scorer, the app and the benchmarks call it), and
``heldout_digits`` the one way to get the 500 real held-out digits everything is scored against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data import load_dataset
from evaluation.distances import frechet_distance
from models.judge import MNISTJudge

DEFAULT_JUDGE_PATH = "checkpoints/mnist-judge"  # the shipped judge, relative to the repository root
REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 256
# generated samples may overshoot [-1, 1] by rounding; anything beyond this is a wrongly scaled input.
RANGE_TOLERANCE = 1e-3


def load_judge(path: str | Path | None = None) -> MNISTJudge:
    """The judge saved at ``path`` (by ``python -m train.judge``), in eval mode; None: the shipped judge,
    ``DEFAULT_JUDGE_PATH`` under the repository root, whatever the working directory."""
    path = REPOSITORY_ROOT / DEFAULT_JUDGE_PATH if path is None else path
    if not (Path(path) / MNISTJudge.config_name).is_file():
        raise ValueError(f"no MNIST judge checkpoint at {path}; train one with: python -m train.judge --out {path}")
    return MNISTJudge.from_pretrained(path).eval()


def judge_features(judge: MNISTJudge, images: torch.Tensor, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """The judge's penultimate features of N×1×32×32 images in [-1, 1], as an N×128 tensor."""
    check_judge_inputs(judge, images)
    with torch.no_grad():
        return torch.cat([judge.features(batch.to(judge.device)) for batch in images.split(batch_size)])


def judge_accuracy(judge: MNISTJudge, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of images the judge classifies as their ``labels``."""
    check_judge_inputs(judge, images)
    if labels.shape != (len(images),):
        raise ValueError(f"expected one label per image ({len(images)}), got labels of shape {tuple(labels.shape)}")
    with torch.no_grad():
        predictions = torch.cat([judge(batch.to(judge.device)).argmax(dim=1) for batch in images.split(BATCH_SIZE)])
    return (predictions == labels.to(predictions.device)).float().mean().item()


def feature_fid(judge: MNISTJudge, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """The Fréchet distance between the judge-feature Gaussians of two image sets (N×1×32×32 in [-1, 1])."""
    for images in (images_a, images_b):
        if len(images) < 2:
            raise ValueError(f"feature_fid needs at least 2 images per set to estimate a covariance, got {len(images)}")
    return frechet_distance(judge_features(judge, images_a).cpu(), judge_features(judge, images_b).cpu())


def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The ``mnist`` held-out split the judge scores against: 500 images (N×1×32×32 in [-1, 1], 50 of each
    digit, grouped by class) and their labels."""
    return load_dataset("mnist", image_size=32, split="heldout").tensors()


def real_fid_floor(judge: MNISTJudge) -> float:
    """``feature_fid`` between two halves of the real ``mnist`` held-out split (250 vs 250, 25 per digit).

    The score two independent sets of real digits get: a generator cannot be told from real data below it.
    """
    images, labels = heldout_digits()
    # the held-out digits come grouped by class; alternating positions after a stable sort by label gives
    # each half 25 digits of every class.
    by_label = labels.argsort(stable=True)
    return feature_fid(judge, images[by_label[0::2]], images[by_label[1::2]])


def check_judge_inputs(judge: MNISTJudge, images: torch.Tensor) -> None:
    if judge.training:
        raise ValueError("the judge is in training mode (BatchNorm, dropout); call judge.eval() before scoring")
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a float image tensor in [-1, 1], got {got}")
    if len(images) and (images.min() < -1 - RANGE_TOLERANCE or images.max() > 1 + RANGE_TOLERANCE):
        raise ValueError(
            f"images must lie in [-1, 1], got values in [{images.min().item():.3g}, {images.max().item():.3g}]"
        )
