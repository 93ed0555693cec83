"""Sampling images from a pipeline: the preview grid every trainer writes.

(A minimal version holding only ``image_grid``; the full sampling-and-scoring service replaces this module.)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

UNCONDITIONAL_ROWS = 4
BORDER_GREY = 0.5


def image_grid(pipeline: Any, columns: int, *, seed: int = 0, **call_kwargs: Any) -> PIL.Image.Image:
    """A grid of samples, ``columns`` per row: one row per class (``pipeline.num_classes``) or 4 rows.

    Works with any of the project's pipelines (diffusion, GAN, VAE): they all take ``batch_size``, ``generator``,
    ``class_labels`` and ``output_type="np"``; ``call_kwargs`` go to the call (``num_inference_steps``,
    ``guidance_scale``, …). Each image gets a 1-pixel grey border so neighbouring digits stay apart.
    """
    classes = pipeline.num_classes
    rows = classes or UNCONDITIONAL_ROWS
    labels = torch.arange(rows).repeat_interleave(columns) if classes else None
    images = pipeline(batch_size=rows * columns, generator=torch.Generator().manual_seed(seed), class_labels=labels,
                      output_type="np", **call_kwargs).images
    # (rows·cols, H+2, W+2, C) → (rows, H+2, cols, W+2, C) → (rows·(H+2), cols·(W+2), C)
    framed = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=BORDER_GREY)
    _, height, width, channels = framed.shape
    grid = framed.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    grid = (grid.reshape(rows * height, columns * width, channels) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)
