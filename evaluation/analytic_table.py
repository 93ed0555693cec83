"""Analytic-DPM's E‖ε_θ‖²/d table for a shipped pipeline, saved as a scheduler beside it.

    python -m evaluation.analytic_table MODEL_DIR [--dataset NAME] [--timesteps 100] [--batch-size 160]

measures the table on the train split of the model's dataset (``schedulers.analytic.estimate_eps_second_moment``)
and writes a ``DDIMScheduler`` carrying it to ``MODEL_DIR/scheduler_analytic``; the ``analytic-ddpm`` and
``analytic-ddim`` samplers then run on the model (Bao et al. 2022).
"""

from __future__ import annotations

import argparse

import torch

from data import load_dataset
from pipelines import DiffusionImagePipeline
from schedulers import DDIMScheduler
from schedulers.analytic import estimate_eps_second_moment
from schedulers.process import VPSchedule


def pipeline_eps_second_moment(pipe, dataset: str | None = None, num_timesteps: int = 100, batch_size: int = 160,
                               seed: int = 0) -> list[float]:
    """``estimate_eps_second_moment`` for a ``DiffusionImagePipeline`` over the train split of ``dataset`` (default:
    the one its model was trained on), with the images' labels for a class-conditional model."""
    data = load_dataset(dataset or pipe.config.model_info["dataset"], image_size=pipe.sample_shape[-1], split="train")
    images, labels = data.tensors()
    config = pipe.scheduler.config
    return estimate_eps_second_moment(pipe.unet, VPSchedule.from_config(config), images, config.prediction_type,
                                      labels if pipe.null_class_id is not None else None, num_timesteps, batch_size,
                                      torch.Generator().manual_seed(seed))


def main(argv=None):
    """Estimate the E‖ε_θ‖²/d table of a shipped pipeline and save an Analytic-DPM scheduler beside it."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help="a DiffusionImagePipeline directory")
    parser.add_argument("--dataset", default=None, help="defaults to the model's recorded dataset")
    parser.add_argument("--timesteps", type=int, default=100, help="timesteps measured (the rest interpolated)")
    parser.add_argument("--batch-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe = DiffusionImagePipeline.from_pretrained(args.model)
    table = pipeline_eps_second_moment(pipe, args.dataset, args.timesteps, args.batch_size, args.seed)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, eps_second_moment=table)
    scheduler.save_pretrained(f"{args.model}/scheduler_analytic")
    print(f"saved {args.model}/scheduler_analytic; E‖ε‖²/d from {table[0]:.3f} (t=0) to {table[-1]:.3f} (t=T−1)")


if __name__ == "__main__":
    main()
