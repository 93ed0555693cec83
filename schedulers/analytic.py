"""Analytic-DPM: the optimal reverse variance of a DDIM-family step (Bao et al. 2022; Su parts 7–8).

Treat x0 | x_t as N(x̂0(x_t), σ̄_t² I) instead of a point. The step's mean is unchanged and its variance gains
the uncertainty of x̂0 carried through the posterior mean's x0 coefficient γ_t (Su part 7):

    Var = σ_t² + γ_t² σ̄_t²,    γ_t = ᾱ' − ᾱ sqrt(β̄'² − σ_t²)/β̄,
    σ̄_t² = (β̄_t²/ᾱ_t²) (1 − E‖ε_θ(x_t, t)‖²/d),

with the expectation over x_t ~ p_t (real data noised to t). The factor 1 − E‖ε_θ‖²/d is clipped to [0, 1]
(spec §6.4). ``estimate_eps_second_moment`` measures E‖ε_θ‖²/d per training timestep by Monte Carlo; the
table lives in the scheduler config (``eps_second_moment``), so the tuned scheduler saves and loads with
the model. ``python -m schedulers.analytic MODEL_DIR`` writes such a scheduler into ``MODEL_DIR/scheduler_analytic``.
"""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .process import VPSchedule, to_x0_and_epsilon


def analytic_extra_variance(acp: torch.Tensor, acp_prev: torch.Tensor, std: torch.Tensor,
                            eps_second_moment: float) -> torch.Tensor:
    """γ_t² σ̄_t², the variance Analytic-DPM adds to a step ᾱ² → ᾱ'² with DDIM noise ``std`` (Su part 7)."""
    alpha, beta = acp.sqrt(), (1 - acp).sqrt()
    gamma = acp_prev.sqrt() - alpha * (1 - acp_prev - std**2).clamp(min=0).sqrt() / beta
    factor = min(max(1.0 - eps_second_moment, 0.0), 1.0)
    return gamma**2 * (1 - acp) / acp * factor


def analytic_last_std_cap(clip_pixels: float) -> float:
    """The cap on the second-to-last step's std in Bao et al.'s code (``clip_sigma_idx=1``): noise whose mean
    absolute value is ``clip_pixels`` 8-bit levels of data in [−1, 1], clip_pixels · (2/255) · sqrt(π/2) (E|z| =
    sqrt(2/π) for z ~ N(0, 1)). They use 2 for the linear β schedule and 1 for the cosine one. Without it the
    x̂0 uncertainty at the last noisy step, which the final, noiseless step cannot remove, leaves visible grain."""
    return clip_pixels * (2 / 255) * math.sqrt(math.pi / 2)


@torch.no_grad()
def estimate_eps_second_moment(model, schedule: VPSchedule, images: torch.Tensor, prediction_type: str,
                               labels: torch.Tensor | None = None, num_timesteps: int = 100, batch_size: int = 160,
                               generator: torch.Generator | None = None) -> list[float]:
    """E‖ε_θ(x_t, t)‖²/d at every training timestep, measured on ``num_timesteps`` evenly spaced ones
    (``batch_size`` random images each, as Su's adpm.py) and interpolated linearly in between."""
    T = schedule.num_train_timesteps
    measured_at = np.unique(np.linspace(0, T - 1, num_timesteps).round().astype(int))
    device = next(itertools.chain(model.parameters(), model.buffers())).device  # a UNet has no buffers
    values = []
    for t in tqdm(measured_at, desc="E‖ε‖²/d", leave=False):
        pick = torch.randint(0, len(images), (batch_size,), generator=generator)
        x0 = images[pick].to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        alpha, beta = schedule.coefficients(torch.tensor(int(t)))
        x_t = (alpha * x0 + beta * noise).to(model.dtype)
        kwargs = {} if labels is None else {"class_labels": labels[pick].to(device)}
        output = model(x_t, torch.tensor(int(t), device=device), **kwargs).sample
        _, eps = to_x0_and_epsilon(prediction_type, output.double(), x_t.double(), alpha, beta)
        values.append(float((eps**2).mean()))
    return np.interp(np.arange(T), measured_at, values).tolist()


def pipeline_eps_second_moment(pipe, dataset: str | None = None, num_timesteps: int = 100, batch_size: int = 160,
                               seed: int = 0) -> list[float]:
    """``estimate_eps_second_moment`` for a ``DiffusionImagePipeline`` over the train split of ``dataset`` (default:
    the one its model was trained on), with the images' labels for a class-conditional model."""
    from data import load_dataset

    data = load_dataset(dataset or pipe.config.model_info["dataset"], image_size=pipe.sample_shape[-1], split="train")
    images, labels = data.tensors()
    config = pipe.scheduler.config
    return estimate_eps_second_moment(pipe.unet, VPSchedule.from_config(config), images, config.prediction_type,
                                      labels if pipe.null_class_id is not None else None, num_timesteps, batch_size,
                                      torch.Generator().manual_seed(seed))


def main(argv=None):
    """Estimate the E‖ε_θ‖²/d table of a shipped pipeline and save an Analytic-DPM scheduler beside it."""
    from pipelines import DiffusionImagePipeline

    from .ddim import DDIMScheduler

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
