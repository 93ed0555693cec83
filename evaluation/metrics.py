"""Sample-quality metrics behind one entry point, ``compute_metrics(images, reference, metrics)``.

Every metric compares N generated images (N×C×H×W in [-1, 1]) with reference images, in some feature space:

``feature_fid``
    Fréchet distance (Heusel et al. 2017, GANs Trained by a Two Time-Scale Update Rule, §"Fréchet Inception
    Distance") between Gaussians fitted to the MNIST judge's 128-d penultimate features (``evaluation.judge``),
    d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½). On the judge's own scale: compare it with
    ``evaluation.judge.real_fid_floor``, never with Inception FIDs.
``feature_kid``
    Kernel Inception Distance (Bińkowski et al. 2018, Demystifying MMD GANs, §4 eq. 4) in the same judge features:
    the unbiased MMD² with the cubic kernel k(x, y) = (xᵀy/d + 1)³, averaged over random subsets (mean and
    standard deviation). Unbiased, so it is comparable across sample sizes where FID is not.
``inception_fid`` / ``inception_kid``
    The same two distances in the 2048-d pool features of the FID Inception-v3 (the TensorFlow 2015-12-05 weights
    of Heusel et al., as converted by torch-fidelity), images repeated to 3 channels, quantised to 8 bits and
    resized to 299×299 with TensorFlow 1.x's bilinear resize, as the published FIDs were.
``accuracy``
    The judge's accuracy on the intended ``labels``.
``coverage``
    The fraction of classes the judge predicts at least once, and the entropy of its predicted-class histogram
    (``class_coverage``).
``precision_recall``
    Improved precision and recall in judge features (Kynkäänniemi et al. 2019, §2, eq. 1–2; ``precision_recall``).
``bits_per_dim``
    The negative log-likelihood of a model directory's held-out data through its probability-flow ODE
    (``evaluation.likelihood.model_bits_per_dim``); it scores the model, not ``images``.

The Fréchet and kernel distances on feature vectors are torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` with the features handed in directly (``evaluation.distances.frechet_distance``,
``kernel_distance``), so the judge and Inception share one implementation, and tests check it on Gaussians whose
distance is known.

Inception and its dependencies. torchmetrics computes Inception features only through torch-fidelity (its
``NoTrainInceptionV3`` subclasses torch-fidelity's extractor), and torch-fidelity 0.4.0 declares torchvision as a
requirement and imports it in its package ``__init__`` (through its CLIP, DINOv2 and VGG extractors), so it
cannot be imported without torchvision. torchvision from the registry breaks the CPU build of torch this project
pins, so torch-fidelity is in ``requirements-gpu.txt`` and imported only when an Inception metric is asked for.
Nothing is downloaded at run time: the caller passes ``inception_weights``, a path to torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_WEIGHTS_URL``); a missing package or file is a clear
error naming it. The file must hold plain tensors (it is checked with ``torch.load(weights_only=True)`` before
torch-fidelity loads it).

Command line: ``python -m evaluation.metrics SOURCE`` scores a pipeline directory (class-balanced samples drawn
with its own scheduler) or an ``.npz`` of images against the 500 held-out MNIST digits; see ``--help``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from torch import nn

from evaluation.distances import KID_SUBSETS, frechet_distance, kernel_distance
from evaluation.judge import (
    BATCH_SIZE,
    DEFAULT_JUDGE_PATH,
    RANGE_TOLERANCE,
    check_judge_inputs,
    heldout_digits,
    judge_features,
    load_judge,
)
from evaluation.sampling import class_balanced_labels, sample_images
from models.judge import MNISTJudge

DEFAULT_K = 3  # Kynkäänniemi et al. 2019 use k = 3
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FEATURES = "2048"
INCEPTION_BATCH_SIZE = 64
LIKELIHOOD_SAMPLES = 64

JUDGE_METRICS = ("feature_fid", "feature_kid", "accuracy", "coverage", "precision_recall")
INCEPTION_METRICS = ("inception_fid", "inception_kid")
METRICS = (*JUDGE_METRICS, *INCEPTION_METRICS, "bits_per_dim")
DEFAULT_METRICS = JUDGE_METRICS


# ------------------------------------------------------------------------------------------------ manifolds


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = DEFAULT_K) -> dict:
    """Improved precision and recall (Kynkäänniemi et al. 2019, §2, eq. 1–2) of ``fake_features`` against
    ``real_features``: the real manifold is the union of balls around each real vector of radius its distance to
    its k-th nearest real neighbour; precision is the fraction of fake vectors inside it, recall the fraction of
    real vectors inside the fake manifold built the same way."""
    for name, features in (("real", real_features), ("fake", fake_features)):
        if features.ndim != 2 or len(features) <= k:
            raise ValueError(f"{name}_features must be N×D with N > k = {k}, got shape {tuple(features.shape)}")
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(f"feature sizes differ: {real_features.shape[1]} real vs {fake_features.shape[1]} fake")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    real, fake = real_features.double(), fake_features.double()
    return {"precision": _coverage(real, _radii(real, k), fake), "recall": _coverage(fake, _radii(fake, k), real)}


def _radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's distance to its k-th nearest other row."""
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # the 0 distance to itself is the first


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> float:
    """The fraction of ``queries`` within radius of at least one ``manifold`` point."""
    inside = torch.cdist(queries, manifold) <= radii[None, :]
    return inside.any(dim=1).float().mean().item()


# ------------------------------------------------------------------------------------------------ the judge


def judge_predictions(judge: MNISTJudge, images: torch.Tensor) -> torch.Tensor:
    """The judge's predicted class of each N×1×32×32 image in [-1, 1]."""
    check_judge_inputs(judge, images)
    with torch.no_grad():
        return torch.cat([judge(batch.to(judge.device)).argmax(dim=1).cpu() for batch in images.split(BATCH_SIZE)])


def class_coverage(predictions: torch.Tensor, num_classes: int) -> dict:
    """Fraction of the ``num_classes`` predicted at least once, and the predicted-class entropy in bits
    (log2 ``num_classes`` for perfectly balanced classes; a generator that collapses onto a few scores low on both)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if len(predictions) == 0 or predictions.min() < 0 or predictions.max() >= num_classes:
        raise ValueError(f"predictions must be a non-empty tensor of classes in [0, {num_classes - 1}]")
    counts = torch.bincount(predictions, minlength=num_classes).double()
    frequencies = counts[counts > 0] / counts.sum()
    return {"coverage": (counts > 0).double().mean().item(),
            "entropy_bits": max(0.0, -(frequencies * frequencies.log2()).sum().item()),
            "max_entropy_bits": math.log2(num_classes)}


# ------------------------------------------------------------------------------------------------ Inception


def inception_features(images: torch.Tensor, weights: str | Path, batch_size: int = INCEPTION_BATCH_SIZE):
    """The FID Inception-v3's 2048-d pool features of N×C×H×W images in [-1, 1] (C = 1 or 3), as N×2048 float64.

    ``weights``: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_WEIGHTS_URL``).
    """
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Inception takes grayscale or RGB images, got {images.shape[1]} channels")
    extractor = _inception(str(Path(weights).resolve()))
    # [-1, 1] → 8-bit RGB, the input the FID Inception was defined on (it resizes to 299×299 itself)
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1)
    with torch.no_grad():
        return torch.cat([extractor(batch).double() for batch in pixels.split(batch_size)])


def check_inception_available(weights: str | Path | None) -> Path:
    """The weights path, once both it and torch-fidelity are there; else an error naming what is missing."""
    if weights is None:
        raise ValueError("inception_fid and inception_kid need the Inception-v3 weights file, and nothing is "
                         "downloaded at run time: pass inception_weights=PATH (--inception-weights PATH), the file "
                         f"torch-fidelity uses, from {INCEPTION_WEIGHTS_URL}")
    path = Path(weights)
    if not path.is_file():
        raise ValueError(f"inception_weights: no file at {path}; download {INCEPTION_WEIGHTS_URL} there")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "inception_fid and inception_kid need the torch-fidelity package (torchmetrics' Inception runs on it), "
            "which requires torchvision: pip install -r requirements-gpu.txt on a machine with a CUDA build of "
            "torch (torchvision does not work with this project's CPU build)")
    return path


@functools.lru_cache(maxsize=1)
def _inception(weights: str) -> nn.Module:
    """torchmetrics' never-training Inception-v3 on ``weights`` (resolved path), after a pickle-safe load check."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or others for a foreign file
        raise ValueError(f"inception_weights: {weights} is not a plain tensor state dict ({error})") from error
    # antialias=False: TensorFlow 1.x's bilinear resize, as in the reference FID code (torch-fidelity's default)
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=[INCEPTION_FEATURES],
                              feature_extractor_weights_path=weights, antialias=False)


# ------------------------------------------------------------------------------------------------ one entry point


def _check_images(name: str, images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim != 4:
        got = f"{images.dtype} of shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) \
            else type(images).__name__
        raise ValueError(f"{name} must be a float N×C×H×W tensor in [-1, 1], got {got}")
    if len(images) < 2:
        raise ValueError(f"{name} must hold at least 2 images, got {len(images)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} holds non-finite values")
    if images.min() < -1 - RANGE_TOLERANCE or images.max() > 1 + RANGE_TOLERANCE:
        raise ValueError(f"{name} must lie in [-1, 1], got values in [{images.min().item():.3g}, "
                         f"{images.max().item():.3g}]")


def compute_metrics(images: torch.Tensor | None, reference: torch.Tensor | None = None,
                    metrics: Sequence[str] = DEFAULT_METRICS, *, labels: torch.Tensor | None = None,
                    judge: MNISTJudge | str | Path | None = None, inception_weights: str | Path | None = None,
                    model_dir: str | Path | None = None, k: int = DEFAULT_K, kid_subsets: int = KID_SUBSETS,
                    likelihood_samples: int = LIKELIHOOD_SAMPLES, seed: int = 0) -> dict:
    """Score generated ``images`` (N×C×H×W in [-1, 1]; the judge's metrics need 1×32×32) against ``reference``
    images (default: the 500 held-out MNIST digits) with each of ``metrics`` (names in ``METRICS``). ``images``
    may be None when ``bits_per_dim`` is the only metric.

    ``labels``: the intended class of each image (``accuracy`` needs them); ``judge``: a loaded judge, its
    directory, or None for the shipped one (``evaluation.judge.load_judge``); ``inception_weights``: the
    Inception-v3 weights file (``inception_*``); ``model_dir``: the pipeline ``bits_per_dim`` scores on
    ``likelihood_samples`` held-out images of its dataset; ``k``: precision/recall's neighbour; ``seed``: KID's
    subsets and the likelihood's dequantization and probes.

    Returns a flat dict: ``samples``, ``reference_samples`` and, per metric, ``feature_fid``; ``feature_kid``,
    ``feature_kid_std``; ``inception_fid``; ``inception_kid``, ``inception_kid_std``; ``accuracy``; ``coverage``,
    ``entropy_bits``, ``max_entropy_bits``; ``precision``, ``recall``; ``bits_per_dim``,
    ``bits_per_dim_standard_error``, ``bits_per_dim_samples``.
    """
    metrics = list(dict.fromkeys(metrics))
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    if "accuracy" in metrics:
        if labels is None:
            raise ValueError("accuracy needs labels: the intended class of each image")
        labels = torch.as_tensor(labels)
        if images is not None and labels.shape != (len(images),):
            raise ValueError(f"expected one label per image ({len(images)}), got labels of shape "
                             f"{tuple(labels.shape)}")
    if "bits_per_dim" in metrics and model_dir is None:
        raise ValueError("bits_per_dim scores a model: pass model_dir, a pipeline directory")
    if any(name in INCEPTION_METRICS for name in metrics):
        check_inception_available(inception_weights)
    results = {}
    if metrics != ["bits_per_dim"]:
        _check_images("images", images)
        if reference is None:
            reference, _ = heldout_digits()
        _check_images("reference", reference)
        results.update(samples=len(images), reference_samples=len(reference))

    if any(name in JUDGE_METRICS for name in metrics):
        judge = judge if isinstance(judge, MNISTJudge) else load_judge(judge)
        fake = judge_features(judge, images)  # the judge runs once per image set: its logits come from these
        if {"feature_fid", "feature_kid", "precision_recall"} & set(metrics):
            real = judge_features(judge, reference).double()
            if "feature_fid" in metrics:
                results["feature_fid"] = frechet_distance(fake.double(), real)
            if "feature_kid" in metrics:
                results["feature_kid"], results["feature_kid_std"] = kernel_distance(fake.double(), real, kid_subsets,
                                                                                     seed=seed)
            if "precision_recall" in metrics:
                results.update(precision_recall(real, fake.double(), k))
        with torch.no_grad():
            predictions = judge.classifier(fake).argmax(dim=1).cpu()
        if "accuracy" in metrics:
            results["accuracy"] = (predictions == labels).float().mean().item()  # float32, as judge_accuracy
        if "coverage" in metrics:
            results.update(class_coverage(predictions, judge.config.num_classes))
    if any(name in INCEPTION_METRICS for name in metrics):
        fake, real = inception_features(images, inception_weights), inception_features(reference, inception_weights)
        if "inception_fid" in metrics:
            results["inception_fid"] = frechet_distance(fake, real)
        if "inception_kid" in metrics:
            results["inception_kid"], results["inception_kid_std"] = kernel_distance(fake, real, kid_subsets,
                                                                                     seed=seed)
    if "bits_per_dim" in metrics:
        from evaluation.likelihood import model_bits_per_dim

        likelihood = model_bits_per_dim(str(model_dir), likelihood_samples, seed=seed)
        results.update(bits_per_dim=likelihood["bits_per_dim"],
                       bits_per_dim_standard_error=likelihood["standard_error"],
                       bits_per_dim_samples=likelihood["samples"])
    return results


# ------------------------------------------------------------------------------------------------ command line


def load_images(source: Path, samples: int, steps: int, guidance: float, seed: int):
    """(images in [-1, 1], labels or None) from an ``.npz`` (``images``: float in [-1, 1] or uint8 0..255, N×H×W or
    N×C×H×W; optional ``labels``) or from a diffusion pipeline directory (``samples`` class-balanced draws)."""
    if source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as archive:
            if "images" not in archive:
                raise ValueError(f"{source} has no 'images' array (it has {', '.join(archive.files)})")
            images = torch.from_numpy(archive["images"])
            labels = torch.from_numpy(archive["labels"]).long() if "labels" in archive else None
        images = images[:, None] if images.ndim == 3 else images
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        return images.float(), labels
    from pipelines import DiffusionImagePipeline
    from pipelines.loading import load_pipeline

    pipeline = load_pipeline(source)
    if not isinstance(pipeline, DiffusionImagePipeline):
        raise ValueError(f"{source} holds a {type(pipeline).__name__}; sample it into an .npz to score it")
    pipeline.set_progress_bar_config(disable=True)
    if not pipeline.num_classes:
        return sample_images(pipeline, samples, seed=seed, num_inference_steps=steps), None
    labels = class_balanced_labels(pipeline.num_classes, samples)
    return sample_images(pipeline, class_labels=labels, seed=seed, num_inference_steps=steps,
                         guidance_scale=guidance), labels


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evaluation.metrics",
                                     description="Score a diffusion pipeline's samples, or an .npz of images, against "
                                                 "the held-out MNIST digits")
    parser.add_argument("source", type=Path, help="a DiffusionImagePipeline directory or an .npz with 'images' "
                                                  "(and optionally 'labels')")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=None,
                        help="default: the judge's metrics (accuracy only when labels are known)")
    parser.add_argument("--samples", type=int, default=200, help="images to draw from a pipeline")
    parser.add_argument("--steps", type=int, default=25, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", type=Path, default=Path(DEFAULT_JUDGE_PATH))
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help=f"Inception-v3 weights for inception_fid / inception_kid ({INCEPTION_WEIGHTS_URL})")
    parser.add_argument("--likelihood-samples", type=int, default=LIKELIHOOD_SAMPLES,
                        help="held-out images bits_per_dim scores (a pipeline source only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components…" bars would bury the results
    try:
        images, labels = None, None
        if args.metrics != ["bits_per_dim"]:  # the likelihood scores the model on held-out data: no samples
            images, labels = load_images(args.source, args.samples, args.steps, args.guidance, args.seed)
        metrics = args.metrics or [name for name in JUDGE_METRICS if labels is not None or name != "accuracy"]
        results = compute_metrics(images, None, metrics, labels=labels, judge=args.judge,
                                  inception_weights=args.inception_weights,
                                  model_dir=args.source if args.source.is_dir() else None,
                                  likelihood_samples=args.likelihood_samples, seed=args.seed)
    except (ValueError, ModuleNotFoundError) as error:
        parser.error(str(error))
    for name, value in results.items():
        print(f"{name:28s} {value:.4g}" if isinstance(value, float) else f"{name:28s} {value}")
    if args.json:
        args.json.write_text(json.dumps({"source": str(args.source), **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
