"""Log-likelihood and bits/dim through the probability-flow ODE (Song et al. 2021, §4.3 and appendix D.2).

In σ-space the ODE is dx/dσ = f(x, σ) = (x − D(x; σ))/σ, and along a solution the density obeys the
instantaneous change of variables (Chen et al. 2018): d log p_σ(x(σ))/dσ = −∇·f. Integrating from the data
at σ_min up to σ_max, where p is N(0, σ_max² I) up to O(1/σ_max²),

    log p_{σ_min}(x) = log N(x(σ_max); 0, σ_max² I) + ∫_{σ_min}^{σ_max} ∇·f(x(σ), σ) dσ.

∇·f = (d − ∇·D)/σ, with ∇·D exact by d vector-Jacobian products (small d) or estimated by Hutchinson's
v·(∂D/∂x)v with Rademacher v (Grathwohl et al. 2019). The ODE is solved by scipy's adaptive RK45
(Dormand–Prince) with rtol/atol, and the function evaluations it spent are reported.

Bits/dim of a shipped model on held-out images (``python -m evaluation.likelihood MODEL_DIR --samples N``) use
uniform dequantization (Theis et al. 2016; Song et al. 2021, appendix D.2): a pixel value k ∈ {0, …, 255} is
spread uniformly over its bin, x = 2 (k + u)/256 − 1 with u ~ U[0, 1), and

    bits/dim = (−log p_{σ_min}(x)/d + log(256/2)) / log 2,

an upper bound on the discrete model's code length (by Jensen over u). Here p_{σ_min} is the model's density
at its first training noise level (σ_min = σ(t = 0), e.g. 0.01 for the linear VP schedule), the end of its
probability-flow ODE, and a conditional model is scored unconditionally, through its null class, unless
``--class-conditional`` scores log p(x | true label).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.integrate import solve_ivp
from tqdm.auto import tqdm

from schedulers.process import VPSchedule
from schedulers.processes import VPProcess

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]  # D(x_ve, σ) → E[x0 | x_ve]


@dataclass
class LikelihoodResult:
    """``log_prob``: log p_{σ_min}(x) per sample (nats); ``nfe``: ODE right-hand-side evaluations."""

    log_prob: torch.Tensor
    nfe: int


def vp_denoiser(model, schedule: VPSchedule, prediction_type: str, class_labels=None) -> Denoiser:
    """D(x_ve, σ) for a model trained on a discrete VP process."""
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    adapter = VPProcess(prediction_type, schedule)

    def denoise(x_ve: torch.Tensor, sigma: float) -> torch.Tensor:
        return adapter.denoise(lambda x, t: model(x.to(model.dtype), t, **kwargs).sample, x_ve, sigma)

    return denoise


def _divergence(denoiser: Denoiser, x: torch.Tensor, sigma: float, probes: torch.Tensor | None):
    """(f, ∇·f) at x, with f = (x − D)/σ; exact trace when ``probes`` is None, else Hutchinson's estimate."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        denoised = denoiser(x, sigma)
        d = x[0].numel()
        if probes is None:
            flat = denoised.reshape(len(x), -1)
            trace = sum(torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i < d - 1)[0].reshape(len(x), -1)[:, i]
                        for i in range(d))
        else:
            (vjp,) = torch.autograd.grad(denoised, x, probes)
            trace = (vjp * probes).reshape(len(x), -1).sum(1)
    return ((x - denoised) / sigma).detach(), (d - trace.detach()) / sigma


def log_likelihood(denoiser: Denoiser, x: torch.Tensor, sigma_min: float, sigma_max: float,
                   trace: str = "exact", rtol: float = 1e-5, atol: float = 1e-5,
                   generator: torch.Generator | None = None) -> LikelihoodResult:
    """log p_{σ_min}(x) of samples x (N, ...) under the model's probability-flow ODE."""
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace must be 'exact' or 'hutchinson', got {trace!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    x = x.to(torch.float64)
    shape, n, d = x.shape, len(x), x[0].numel()
    probes = None
    if trace == "hutchinson":  # one fixed Rademacher probe per sample for the whole solve
        probes = torch.randint(0, 2, shape, generator=generator, dtype=torch.float64) * 2 - 1
    nfe = 0

    def rhs(sigma, state):
        nonlocal nfe
        nfe += 1
        current = torch.from_numpy(state[: n * d]).reshape(shape)
        drift, divergence = _divergence(denoiser, current, float(sigma), probes)
        return np.concatenate([drift.reshape(-1).numpy(), divergence.numpy()])

    start = np.concatenate([x.reshape(-1).numpy(), np.zeros(n)])
    solution = solve_ivp(rhs, (sigma_min, sigma_max), start, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise RuntimeError(f"the probability-flow ODE solve failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1])
    x_end, integral = end[: n * d].reshape(n, d), end[n * d:]
    prior = -0.5 * (x_end**2).sum(1) / sigma_max**2 - d * math.log(sigma_max) - 0.5 * d * math.log(2 * math.pi)
    return LikelihoodResult(log_prob=prior + integral, nfe=nfe)


def bits_per_dim(log_prob: torch.Tensor, dims: int, levels: int = 256, data_range: float = 2.0) -> torch.Tensor:
    """Bits per dimension of 8-bit data scaled to a range of width ``data_range`` (e.g. [−1, 1]):
    the continuous density's −log p plus the log of the bin volume (Ho et al. 2020, §4; uniform dequantization)."""
    bin_width = data_range / levels
    return (-log_prob / dims - math.log(bin_width)) / math.log(2)


def dequantize(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly dequantized uint8 pixels on [−1, 1): x = 2 (k + u)/256 − 1, u ~ U[0, 1) (the bins of
    ``bits_per_dim`` with ``levels = 256``, ``data_range = 2``)."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"dequantize expects uint8 pixels (0..255), got {pixels.dtype}")
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float64)
    return 2 * (pixels.double() + noise) / 256 - 1


def model_bits_per_dim(model_dir: str, samples: int, batch_size: int = 16, class_conditional: bool = False,
                       rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0) -> dict:
    """Bits/dim of a shipped pipeline on ``samples`` of its dataset's held-out images (Hutchinson trace,
    one Rademacher probe per image): the mean, its standard error over images, and the NFE per batch."""
    from data import load_dataset
    from pipelines import DiffusionImagePipeline

    if samples < 2 or batch_size < 1:
        raise ValueError(f"need samples ≥ 2 (for a standard error) and batch_size ≥ 1, got {samples}, {batch_size}")
    pipe = DiffusionImagePipeline.from_pretrained(model_dir)
    info = pipe.config.model_info
    if info.get("process", "vp") != "vp":
        raise ValueError(f"{model_dir}: likelihood needs a VP model, this one was trained on {info['process']!r}")
    channels, height, _ = pipe.sample_shape
    heldout = load_dataset(info["dataset"], image_size=height, channels=channels, split="heldout")
    if samples > len(heldout):
        raise ValueError(f"asked for {samples} samples, but the held-out split has {len(heldout)} images")
    if class_conditional and pipe.null_class_id is None:
        raise ValueError(f"{model_dir} is unconditional: --class-conditional needs class labels")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(heldout), generator=generator)[:samples]
    schedule = VPSchedule.from_config(pipe.scheduler.config)
    sigma_min = float(schedule.sigma(torch.tensor(0)))
    sigma_max = float(schedule.sigma(torch.tensor(schedule.num_train_timesteps - 1)))
    prediction_type = info.get("prediction_type", pipe.scheduler.config.prediction_type)
    bits, nfes = [], []
    progress = tqdm(range(0, samples, batch_size), desc="bits/dim", unit="batch")
    for start in progress:
        index = chosen[start:start + batch_size]
        x = dequantize(heldout.images[index], generator)
        labels = None
        if pipe.null_class_id is not None:
            labels = heldout.labels[index] if class_conditional else torch.full((len(index),), pipe.null_class_id)
        denoiser = vp_denoiser(pipe.unet, schedule, prediction_type, class_labels=labels)
        result = log_likelihood(denoiser, x, sigma_min, sigma_max, trace="hutchinson", rtol=rtol, atol=atol,
                                generator=generator)
        bits.append(bits_per_dim(result.log_prob, x[0].numel()))
        nfes.append(result.nfe)
        progress.set_postfix(bits_per_dim=f"{float(torch.cat(bits).mean()):.3f}", nfe=result.nfe)
    bits = torch.cat(bits)
    return {"bits_per_dim": float(bits.mean()), "standard_error": float(bits.std() / math.sqrt(len(bits))),
            "samples": len(bits), "nfe_per_batch": nfes, "sigma_min": sigma_min, "sigma_max": sigma_max,
            "class_conditional": class_conditional, "rtol": rtol, "atol": atol, "seed": seed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bits/dim of a model on held-out images through its "
                                                 "probability-flow ODE (RK45, Hutchinson trace)")
    parser.add_argument("model_dir")
    parser.add_argument("--samples", type=int, default=64, help="held-out images to score")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--class-conditional", action="store_true", help="score log p(x | label), not log p(x)")
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--atol", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = model_bits_per_dim(args.model_dir, args.samples, args.batch_size, args.class_conditional, args.rtol,
                                args.atol, args.seed)
    kind = "log p(x | label)" if args.class_conditional else "log p(x)"
    print(f"{args.model_dir}: {result['bits_per_dim']:.3f} ± {result['standard_error']:.3f} bits/dim "
          f"({kind}, {result['samples']} held-out images, uniform dequantization, "
          f"σ_min = {result['sigma_min']:.4g}, RK45 rtol = {args.rtol:g}, NFE per batch {result['nfe_per_batch']})")


if __name__ == "__main__":
    main()
