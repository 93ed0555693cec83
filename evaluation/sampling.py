"""Drawing images from any pipeline, the one way: for scores, previews and the benchmarks.

``sample_images`` draws N images in batches, batch i from ``torch.Generator().manual_seed(seed + i)``, so a
setting's images are the same whichever caller asks for them (``python -m train.evaluate_model``,
``python -m evaluation.metrics``, the benchmarks); ``image_grid`` lays one small draw out one row per class;
``class_balanced_labels`` gives every class the same number of images. They take a ``DiffusionImagePipeline``
or a GAN/VAE pipeline (``pipelines.baselines``) alike: both are called with ``batch_size``, ``generator``,
``class_labels`` and ``output_type="raw"``, and anything else (``num_inference_steps``, ``guidance_scale``,
``eta``, ``guidance_mode``, …) goes to the call unchanged.

Scoring the images is ``evaluation.metrics.compute_metrics`` (judge accuracy, feature-FID against the held-out
digits and the rest), with the judge from ``evaluation.judge.load_judge``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

SAMPLING_BATCH = 250  # images per pipeline call; with the seeds, it fixes which noise every image gets
UNCONDITIONAL_ROWS = 4
BORDER_GREY = 0.5


def class_balanced_labels(num_classes: int, count: int) -> torch.Tensor:
    """``count`` labels, ``count / num_classes`` of each class in turn: 0, 0, …, 1, 1, …"""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if count < num_classes or count % num_classes:
        raise ValueError(f"{count} images cannot be shared equally among {num_classes} classes: "
                         f"ask for a positive multiple of {num_classes}")
    return torch.arange(num_classes).repeat_interleave(count // num_classes)


def sample_images(pipeline, count: int | None = None, *, class_labels=None, seed: int = 0,
                  batch_size: int = SAMPLING_BATCH, progress: Callable[[int, int], None] | None = None,
                  clamp: bool = True, **call_kwargs) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] from ``pipeline``, ``batch_size`` per call, call i seeded with seed + i.

    ``class_labels``: one label per image (a tensor or list; ``count`` may then be left out), or None for
    ``count`` unconditional images. ``progress(done, total)`` runs after every batch. ``call_kwargs`` go to every
    pipeline call. The raw output is clamped to [-1, 1] (the data's range) unless ``clamp`` is False, which
    returns it as the sampler left it (to measure how far a model overshoots).
    """
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels)
        if class_labels.ndim != 1:
            raise ValueError(f"class_labels must hold one label per image, got shape {tuple(class_labels.shape)}")
        if count is not None and count != len(class_labels):
            raise ValueError(f"count is {count} but there are {len(class_labels)} class labels")
        count = len(class_labels)
    if count is None or count < 1:
        raise ValueError(f"ask for at least one image (count or class_labels), got count={count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches = []
    for i, start in enumerate(range(0, count, batch_size)):
        size = min(batch_size, count - start)
        labels = None if class_labels is None else class_labels[start:start + size]
        batches.append(pipeline(batch_size=size, class_labels=labels, generator=torch.Generator().manual_seed(seed + i),
                                output_type="raw", **call_kwargs).images)
        if progress is not None:
            progress(start + size, count)
    images = torch.cat(batches)
    return images.clamp(-1, 1) if clamp else images


def image_grid(pipeline, columns: int, *, seed: int = 0, **call_kwargs) -> PIL.Image.Image:
    """One draw of ``columns`` samples per row, one row per class (a class-conditional pipeline) or
    ``UNCONDITIONAL_ROWS`` rows, each image framed by a 1-pixel grey border to keep neighbours apart.

    All the images come from one call seeded with ``seed``. An unconditional model ignores guidance, so a
    ``guidance_scale`` in ``call_kwargs`` is set to 1 for it.
    """
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    classes = pipeline.num_classes
    rows = classes or UNCONDITIONAL_ROWS
    labels = class_balanced_labels(classes, classes * columns) if classes else None
    if not classes and "guidance_scale" in call_kwargs:
        call_kwargs["guidance_scale"] = 1.0
    images = sample_images(pipeline, rows * columns, class_labels=labels, seed=seed, batch_size=rows * columns,
                           **call_kwargs)
    # [-1, 1] → [0, 1] as the pipelines' "np" output does, then (N, H, W, C) with a border round each image
    pixels = (images.float() / 2 + 0.5).permute(0, 2, 3, 1).cpu().numpy()
    framed = np.pad(pixels, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=BORDER_GREY)
    _, height, width, channels = framed.shape
    # (rows, columns, H+2, W+2, C) → (rows·(H+2), columns·(W+2), C)
    grid = framed.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    grid = (grid.reshape(rows * height, columns * width, channels) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)
