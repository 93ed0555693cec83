"""Train a VAE baseline with accelerate: ``python -m train.vae --model conv --steps 3000 --output-dir runs/NAME``.

``--model conv`` is ``models.vae.ConvVAE``; ``--model nvae`` the hierarchical ``HierarchicalVAE`` (NVAE-style:
latent groups at several scales, residual posterior N(μ + Δμ, σ²Δσ²)). Both decode to a discretized logistic
over the 256 levels of the [-1, 1]-scaled 8-bit data, so the ELBO bounds the discrete log-likelihood.

Objective per image, in nats, divided by the D pixels (Kingma & Welling 2014 eq. 3; NVAE §3.2 for the rest):

    L = [ −log p(x|z) + β_t · KL(q(z|x) ‖ p(z)) + λ_SR Σ_i s_i ] / D

* β_t, the KL warm-up: linear from ``--kl-min`` to 1 over ``--kl-warmup`` steps (NVAE's KL annealing);
* λ_SR Σ_i s_i, NVAE's spectral regularization: s_i the largest singular value of convolution i, from one power
  iteration per step (``--spectral-reg`` λ_SR; default 0.1 for nvae, 0 for conv).

Logged per step: the loss, the batch's −ELBO in bits/dim at β = 1 (``elbo_bpd``), its KL part, β, the gradient
norm and the learning rate (Adam, linear warm-up then cosine decay, gradient clipping). The exported pipeline holds
the EMA weights and records the held-out −ELBO in bits/dim (one posterior draw per image, seeded) in its
``model_info``. The loop, EMA, checkpoints, resume and logs are ``train.run``'s.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler

from data import load_dataset
from models.vae import ConvVAE, HierarchicalVAE, discretized_logistic_log_likelihood
from pipelines import VAEPipeline
from train.options import add_common_arguments, check_at_least_one, check_common_args, check_non_negative, run_main
from train.run import Trainer, TrainingRun

MODELS = {"conv": ConvVAE, "nvae": HierarchicalVAE}
DEFAULT_SPECTRAL_REG = {"conv": 0.0, "nvae": 0.1}
POSTERIOR_NOISE = 2  # random stream (train.batch_order: 0 is the data order)
EVALUATION_SEED = 0
EVALUATION_BATCH = 250


def kl_weight(step: int, warmup: int, minimum: float) -> float:
    """β at ``step``: linear from ``minimum`` at step 0 to 1 at ``warmup`` (1 throughout without warm-up)."""
    if warmup == 0:
        return 1.0
    return minimum + (1.0 - minimum) * min(step / warmup, 1.0)


def vae_loss(model, images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator,
             beta: float, spectral_reg: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss (nats/dim, see the module doc) and the batch's −ELBO and KL in bits/dim at β = 1."""
    output = model(images, labels, generator=generator)
    nll = -discretized_logistic_log_likelihood(images, output.mean, output.log_scale)
    dims = images[0].numel()
    loss = (nll + beta * output.kl).mean() / dims
    if spectral_reg:
        loss = loss + spectral_reg * _unwrap(model).spectral_norm_sum() / dims
    bits = dims * math.log(2)
    return loss, {"elbo_bpd": ((nll + output.kl).mean() / bits).item(), "kl_bpd": (output.kl.mean() / bits).item()}


def _unwrap(model):
    return getattr(model, "module", model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.vae", description=__doc__.splitlines()[0])
    add_common_arguments(parser, lr=1e-3, ema_decay=0.999)
    vae = parser.add_argument_group("VAE")
    vae.add_argument("--model", choices=list(MODELS), default="conv")
    vae.add_argument("--latent-dim", type=int, default=32, help="conv: latent dimensions")
    vae.add_argument("--base-channels", type=int, default=32, help="conv: width at full resolution")
    vae.add_argument("--width", type=int, default=48, help="nvae: channels of every feature map")
    vae.add_argument("--latent-channels", type=int, default=8, help="nvae: channels of each latent group")
    vae.add_argument("--groups-per-scale", type=int, nargs="+", default=[2, 2, 1],
                     help="nvae: latent groups at 4×4, 8×8, 16×16 … (coarse first)")
    vae.add_argument("--kl-warmup", type=int, default=500, help="steps over which β rises to 1")
    vae.add_argument("--kl-min", type=float, default=1e-2, help="β at step 0")
    vae.add_argument("--spectral-reg", type=float, default=None, help="λ_SR (default: 0.1 nvae, 0 conv)")
    vae.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    vae.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    return parser


def check_args(args: argparse.Namespace) -> None:
    check_common_args(args)
    check_at_least_one(args, "latent_dim", "base_channels", "width", "latent_channels")
    check_non_negative(args, "kl_warmup", "warmup", "grad_clip")
    if not 0 <= args.kl_min <= 1:
        raise ValueError(f"--kl-min must be in [0, 1], got {args.kl_min}")
    if args.spectral_reg is not None and args.spectral_reg < 0:
        raise ValueError(f"--spectral-reg must not be negative, got {args.spectral_reg}")


def build_model(args: argparse.Namespace, channels: int, num_classes: int):
    common = dict(image_size=args.image_size, channels=channels, num_classes=num_classes)
    if args.model == "conv":
        return ConvVAE(latent_dim=args.latent_dim, base_channels=args.base_channels, **common)
    return HierarchicalVAE(width=args.width, latent_channels=args.latent_channels,
                           groups_per_scale=tuple(args.groups_per_scale), **common)


def heldout_bits_per_dim(pipeline: VAEPipeline, args: argparse.Namespace) -> float | None:
    """Mean −ELBO in bits/dim of the dataset's held-out split (None when it has none)."""
    try:
        images, labels = load_dataset(args.dataset, image_size=args.image_size, split="heldout").tensors()
    except ValueError:
        return None
    generator = torch.Generator().manual_seed(EVALUATION_SEED)
    bits = [pipeline.bits_per_dim(batch, batch_labels if pipeline.num_classes else None, generator=generator)
            for batch, batch_labels in zip(images.split(EVALUATION_BATCH), labels.split(EVALUATION_BATCH))]
    return torch.cat(bits).mean().item()


def vae_trainer(run: TrainingRun) -> Trainer:
    """Build the VAE, Adam with its schedule and the EMA on ``run``; returns their ``Trainer``."""
    args, accelerator = run.args, run.accelerator
    torch.manual_seed(args.seed)
    model = build_model(args, run.dataset.channels, run.num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    lr_schedule = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup, num_training_steps=args.steps)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    unwrapped = accelerator.unwrap_model(model)
    ema = run.track_ema(unwrapped)
    max_grad_norm = args.grad_clip or math.inf

    def step(index: int) -> dict[str, float]:
        model.train()
        images, labels = run.next_batch()
        beta = kl_weight(index, args.kl_warmup, args.kl_min)
        loss, values = vae_loss(model, images, labels if run.num_classes else None,
                                run.generator(POSTERIOR_NOISE, index), beta, args.spectral_reg)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        lr = lr_schedule.get_last_lr()[0]
        optimizer.step()
        lr_schedule.step()
        return {"loss": loss.item(), **values, "kl_weight": beta, "grad_norm": float(grad_norm), "lr": lr}

    info = dict(process="vae", model=args.model, likelihood="discretized logistic, 256 levels on [-1, 1]")

    def pipeline(step_count: int, **extra_info) -> VAEPipeline:
        copy = type(unwrapped).from_config(unwrapped.config).to(accelerator.device)
        copy.load_state_dict(unwrapped.state_dict())  # the power-iteration buffers come along
        ema.copy_to(copy.parameters())
        pipe = VAEPipeline(copy.eval(), run.info(step_count, **info, **extra_info))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def export(directory: Path, step_count: int) -> None:
        bits = heldout_bits_per_dim(pipeline(step_count), args)
        pipeline(step_count, heldout_elbo_bits_per_dim=bits).save_pretrained(directory, safe_serialization=True)
        accelerator.print(f"held-out −ELBO: {bits:.4f} bits/dim" if bits is not None else "no held-out split")

    invariants = {name: getattr(args, name) for name in ("model", "latent_dim", "base_channels", "width",
                                                          "latent_channels", "groups_per_scale")}
    return Trainer(step=step, export=export, preview=pipeline, invariants=invariants)


def train(args: argparse.Namespace, argv: list[str]) -> Path:
    """Train (or resume) the VAE run described by ``args``; returns the exported pipeline directory."""
    check_args(args)
    if args.spectral_reg is None:
        args.spectral_reg = DEFAULT_SPECTRAL_REG[args.model]
    run = TrainingRun(args, argv, "train.vae")
    return run.train(vae_trainer(run))


def main(argv: list[str] | None = None) -> None:
    run_main(build_parser, check_args, train, argv)


if __name__ == "__main__":
    main()
