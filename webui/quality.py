"""Sample quality of a generation setting, measured by the MNIST judge on N extra samples.

Two numbers (``evaluation.metrics.compute_metrics``): the judge's accuracy on the intended digits, and the
feature-FID (Fréchet distance in the judge's penultimate features, Heusel et al. 2017 with the judge in place of
Inception) against the 500 real held-out digits. They apply to models that make digits in 10 classes at 32×32
or at MNIST's native 28×28. The images are drawn as the Generate tab draws them (``webui.sampling.run_job``,
which holds the model's lock and honours Stop) and scored as the 8-bit pixels it shows.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import gradio as gr
import numpy as np
import torch

from evaluation.judge import heldout_digits, load_judge
from evaluation.metrics import compute_metrics
from webui import models
from webui.sampling import MAX_BATCH, Job, run_job

MAX_SAMPLES = 2000


JUDGED_SHAPES = ((1, 32, 32), (1, 28, 28))  # the judge pads native 28×28 digits (models.judge)
NOT_JUDGED = "does not make 1×32×32 or 1×28×28 digits in 10 classes: the MNIST judge cannot score it"


def judge_fits(pipe) -> bool:
    return models.sample_shape(pipe) in JUDGED_SHAPES and models.num_classes(pipe) == 10


@lru_cache(maxsize=1)
def judge_and_heldout():
    """The shipped judge and the held-out digits, loaded once per app."""
    return load_judge(), heldout_digits()[0]


def score(catalog: models.ModelCatalog, job: Job, samples: int, on_step=None) -> dict[str, float]:
    """Feature-FID and judge accuracy of ``samples`` images drawn with ``job``'s settings, every digit in turn,
    from seeds after ``job.seed`` (so the cell's own images are not reused); also their NFE per image and the
    seconds they took."""
    pipe = catalog.load(job.model).pipe
    if not judge_fits(pipe):
        raise gr.Error(f"{job.model} {NOT_JUDGED}")
    if job.guidance_mode in models.NEEDS_REFERENCE:
        raise gr.Error("quality metrics sample every digit; they do not apply to similarity guidance")
    mode = job.guidance_mode if job.guidance_mode in models.CLASS_GUIDED else "none"
    judge, heldout = judge_and_heldout()
    pixels, seconds, nfe = [], 0.0, 0
    for k, start in enumerate(range(0, samples, MAX_BATCH)):
        batch = min(MAX_BATCH, samples - start)
        chunk = dataclasses.replace(job, batch=batch, class_name=models.EVERY_CLASS, seed=job.seed + 1 + k,
                                    resolution=0, guidance_mode=mode)
        result = run_job(catalog, chunk, on_step)
        pixels += [np.asarray(image.convert("L")) for image in result.images]
        seconds, nfe = seconds + result.seconds, result.nfe
    images = torch.from_numpy(np.stack(pixels))[:, None].float() / 127.5 - 1
    # every chunk starts at digit 0 (EVERY_CLASS labels image i with i mod 10)
    labels = torch.cat([torch.arange(min(MAX_BATCH, samples - s)) % 10 for s in range(0, samples, MAX_BATCH)])
    scores = compute_metrics(images, heldout, ["feature_fid", "accuracy"], labels=labels, judge=judge)
    return {"feature_fid": scores["feature_fid"], "judge_accuracy": scores["accuracy"], "nfe": nfe,
            "seconds": round(seconds, 3)}
