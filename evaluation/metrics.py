"""Sample-quality metrics beyond FID: precision/recall in feature space and the judge's class coverage.

``precision_recall`` is the improved precision and recall of Kynkäänniemi et al. 2019 (§2, eq. 1–2): the real
manifold is the union of balls around each real feature vector, of radius its distance to its k-th nearest
real neighbour; precision is the fraction of generated samples inside it, recall the fraction of real samples
inside the generated manifold built the same way. The features are the MNIST judge's (``evaluation.judge``).

``class_coverage`` reads the judge's predicted digits of a sample set: the fraction of the classes produced at
least once, and the entropy of the predicted-class histogram in bits (log2 10 ≈ 3.32 for perfectly balanced
digits; a generator that collapses onto a few digits scores low on both).
"""

from __future__ import annotations

import math

import torch

from evaluation.judge import BATCH_SIZE, check_judge_inputs
from models.judge import MNISTJudge

DEFAULT_K = 3  # Kynkäänniemi et al. 2019 use k = 3


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 0 distance to itself is the first


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """The fraction of ``queries`` within radius of at least one ``manifold`` point."""
    inside = torch.cdist(queries, manifold) <= radii[None, :]
    return inside.any(dim=1).float().mean().item()


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = DEFAULT_K) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake_features`` against ``real_features``."""
    for name, features in (("real", real_features), ("fake", fake_features)):
        if features.ndim != 2 or len(features) <= k:
            raise ValueError(f"{name}_features must be N×D with N > k = {k}, got shape {tuple(features.shape)}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"feature sizes differ: {real_features.shape[1]} real vs {fake_features.shape[1]} fake")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real, fake = real_features.double(), fake_features.double()
    return {"precision": _coverage(real, _radii(real, k), fake), "recall": _coverage(fake, _radii(fake, k), real)}


def judge_predictions(judge: MNISTJudge, images: torch.Tensor) -> torch.Tensor:
    """The judge's predicted class of each N×1×32×32 image in [-1, 1]."""
    check_judge_inputs(judge, images)
    with torch.no_grad():
        return torch.cat([judge(batch.to(judge.device)).argmax(dim=1).cpu() for batch in images.split(BATCH_SIZE)])


def class_coverage(predictions: torch.Tensor, num_classes: int) -> dict:
    """Fraction of the ``num_classes`` predicted at least once, and the predicted-class entropy in bits."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if len(predictions) == 0 or predictions.min() < 0 or predictions.max() >= num_classes:
        raise ValueError(f"predictions must be a non-empty tensor of classes in [0, {num_classes - 1}]")
    counts = torch.bincount(predictions, minlength=num_classes).double()
    frequencies = counts[counts > 0] / counts.sum()
    return {"coverage": (counts > 0).double().mean().item(),
            "entropy_bits": max(0.0, -(frequencies * frequencies.log2()).sum().item()),
            "max_entropy_bits": math.log2(num_classes)}
