"""Train a GAN baseline with accelerate: ``python -m train.gan --steps 3000 --output-dir runs/NAME``.

Losses (``--loss``), for the critic T and the generator G, with ΔT = T(x_r) − T(x_f), x_r real, x_f = G(z):

* ``qp`` — GAN-QP (Su 2018; seed_methods.md §4.3): the critic maximizes E[ΔT − ΔT²/(2λ d(x_r, x_f))] with
  λ = ``--qp-lambda`` (10) and d the per-pixel RMS distance, so it minimizes E[−ΔT + ΔT²/(2λd)] (Su's
  ``gan_qp_l2.py``: ``mean(−t + 0.5 t²/d_norm)``, d_norm = 10·RMS); the generator minimizes E[ΔT] (no
  quadratic term in G's loss).
* ``hinge`` — Lim & Ye 2017 / Miyato et al. 2018: critic E[relu(1 − T(x_r))] + E[relu(1 + T(x_f))], G −E[T(x_f)].
* ``ns`` — the non-saturating GAN (Goodfellow et al. 2014, §3): critic E[softplus(−T(x_r))] + E[softplus(T(x_f))],
  G E[softplus(−T(x_f))]. Su's part 19 (MonoFlow, §3.19) reads all three generator losses as E[−h(T(G(z)))] with
  h increasing: one Euler step of the gradient flow dx/dt = ∇ log(p/q) pushed into G.

``--ogan`` (Su 2019, §4.5): the critic is T = mean ∘ E and both players also minimize −λ ρ(z, E(G(z))),
λ = ``--correlation-weight`` (Su's 0.5), ρ the per-sample Pearson correlation, so E learns to encode.
``--conditional``: G gets a class embedding, T is a projection discriminator (``models.gan``).

One training step is ``--critic-steps`` critic updates, each on a fresh real batch and fresh z, then one
generator update (Su: 2 critic steps per G step; Adam(2e-4, β1 = 0.5)). The exported generator holds the EMA
weights with its BatchNorm statistics re-estimated for them (NVAE's trick, §4.2: the training statistics belong
to the raw weights). The loop, EMA, checkpoints, resume and logs are ``train.run``'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel
from torch import nn

from models.gan import Critic, Generator
from pipelines import GANPipeline
from train.options import add_common_arguments, check_at_least_one, check_common_args, run_main
from train.run import Trainer, TrainingRun

QP_LAMBDA = 10.0
CORRELATION_WEIGHT = 0.5
# random streams (train.batch_order: 0 is the data order)
CRITIC_NOISE, GENERATOR_NOISE = 2, 3
BATCHNORM_BATCHES, BATCHNORM_BATCH_SIZE, BATCHNORM_SEED = 20, 256, 12345


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def rms_distance(x_real: torch.Tensor, x_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample root-mean-square pixel distance, shape (N,)."""
    return (x_real - x_fake).flatten(1).pow(2).mean(dim=1).sqrt()


def qp_critic_loss(t_real, t_fake, x_real, x_fake, qp_lambda: float = QP_LAMBDA) -> torch.Tensor:
    """GAN-QP critic loss E[−ΔT + ΔT²/(2λ d(x_r, x_f))], d the per-pixel RMS distance (pairs taken in batch order)."""
    delta = t_real - t_fake
    return (-delta + delta**2 / (2 * qp_lambda * rms_distance(x_real, x_fake))).mean()


def qp_generator_loss(t_real, t_fake) -> torch.Tensor:
    """GAN-QP generator loss E[ΔT] = E[T(x_r) − T(x_f)]."""
    return (t_real - t_fake).mean()


def hinge_critic_loss(t_real, t_fake, x_real=None, x_fake=None) -> torch.Tensor:
    return F.relu(1 - t_real).mean() + F.relu(1 + t_fake).mean()


def hinge_generator_loss(t_real, t_fake) -> torch.Tensor:
    return -t_fake.mean()


def ns_critic_loss(t_real, t_fake, x_real=None, x_fake=None) -> torch.Tensor:
    """−E[log σ(T(x_r))] − E[log(1 − σ(T(x_f)))], the discriminator's cross-entropy on logits T."""
    return F.softplus(-t_real).mean() + F.softplus(t_fake).mean()


def ns_generator_loss(t_real, t_fake) -> torch.Tensor:
    """−E[log σ(T(G(z)))]."""
    return F.softplus(-t_fake).mean()


LOSSES = {
    "qp": (qp_critic_loss, qp_generator_loss),
    "hinge": (hinge_critic_loss, hinge_generator_loss),
    "ns": (ns_critic_loss, ns_generator_loss),
}


def correlation(z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation ρ(z, E(G(z))) over the latent dimensions, shape (N,) (O-GAN, Su 2019):
    the cosine of the two vectors after each is centred on its own mean."""
    z = F.normalize(z - z.mean(dim=1, keepdim=True), dim=1)
    code = F.normalize(code - code.mean(dim=1, keepdim=True), dim=1)
    return (z * code).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.gan", description=__doc__.splitlines()[0])
    add_common_arguments(parser, lr=2e-4, ema_decay=0.999)
    gan = parser.add_argument_group("GAN")
    gan.add_argument("--loss", choices=list(LOSSES), default="qp")
    gan.add_argument("--qp-lambda", type=float, default=QP_LAMBDA, help="λ of GAN-QP's quadratic term")
    gan.add_argument("--ogan", action="store_true", help="O-GAN: the critic's encoder learns latent codes")
    gan.add_argument("--correlation-weight", type=float, default=CORRELATION_WEIGHT, help="O-GAN's λ on −ρ")
    gan.add_argument("--latent-dim", type=int, default=64)
    gan.add_argument("--base-channels", type=int, default=64, help="width of the largest feature maps")
    gan.add_argument("--critic-steps", type=int, default=2, help="critic updates per generator update")
    gan.add_argument("--adam-beta1", type=float, default=0.5)
    return parser


def check_args(args: argparse.Namespace) -> None:
    check_common_args(args)
    check_at_least_one(args, "latent_dim", "base_channels", "critic_steps")
    if not args.qp_lambda > 0:
        raise ValueError(f"--qp-lambda must be positive, got {args.qp_lambda}")
    if args.correlation_weight < 0:
        raise ValueError(f"--correlation-weight must not be negative, got {args.correlation_weight}")
    if not 0 <= args.adam_beta1 < 1:
        raise ValueError(f"--adam-beta1 must be in [0, 1), got {args.adam_beta1}")


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def recalibrate_batchnorm(generator: Generator, num_classes: int, batches: int = BATCHNORM_BATCHES,
                          batch_size: int = BATCHNORM_BATCH_SIZE, seed: int = BATCHNORM_SEED) -> Generator:
    """Re-estimate every BatchNorm's running mean/variance as the plain average over ``batches`` seeded batches
    of z (and uniform classes), for the weights the generator holds now; returns it in eval mode."""
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    generator.train()
    rng = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        z = torch.randn(batch_size, generator.config.latent_dim, generator=rng).to(generator.device)
        labels = torch.randint(num_classes, (batch_size,), generator=rng).to(generator.device) if num_classes else None
        generator(z, labels)
    for norm in norms:
        norm.momentum = 0.1
    return generator.eval()


def ema_generator(ema: EMAModel, trained: Generator) -> Generator:
    """A copy of the trained generator holding the EMA weights, BatchNorm statistics re-estimated for them."""
    copy = Generator.from_config(trained.config).to(trained.device)
    copy.load_state_dict(trained.state_dict())
    ema.copy_to(copy.parameters())
    return recalibrate_batchnorm(copy, trained.config.num_classes)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class GANModels(NamedTuple):
    """The prepared networks and optimizers one GAN step updates (``critic_module`` is T unwrapped)."""

    generator: torch.nn.Module
    critic: torch.nn.Module
    critic_module: Critic
    generator_optimizer: torch.optim.Optimizer
    critic_optimizer: torch.optim.Optimizer


def latents(run: TrainingRun, stream: int, index: int) -> torch.Tensor:
    """This process's shard of a global batch of z ~ N(0, I), drawn from (--seed, stream, index)."""
    z = torch.randn(run.global_batch, run.args.latent_dim, generator=run.generator(stream, index))
    return z[run.shard].to(run.device)


def gan_step(run: TrainingRun, models: GANModels, step: int) -> dict[str, float]:
    """``--critic-steps`` critic updates, each on a fresh real batch and z, then one generator update."""
    args, accelerator = run.args, run.accelerator
    generator, critic = models.generator, models.critic
    critic_loss_fn, generator_loss_fn = LOSSES[args.loss]
    qp_kwargs = {"qp_lambda": args.qp_lambda} if args.loss == "qp" else {}
    critic.train()
    generator.train()
    models.critic_module.requires_grad_(True)
    for k in range(args.critic_steps):
        x_real, labels = run.next_batch()
        labels = labels if run.num_classes else None
        z = latents(run, CRITIC_NOISE, step * args.critic_steps + k)
        with torch.no_grad():
            x_fake = generator(z, labels)
        t_real, _ = critic(x_real, labels)
        t_fake, code = critic(x_fake, labels)
        c_loss = critic_loss_fn(t_real, t_fake, x_real, x_fake, **qp_kwargs)
        rho = correlation(z, code).mean() if args.ogan else torch.zeros(())
        models.critic_optimizer.zero_grad(set_to_none=True)
        accelerator.backward(c_loss - args.correlation_weight * rho)
        models.critic_optimizer.step()
    # the generator: fresh z, the last real batch's labels (class frequencies as in the data)
    models.critic_module.requires_grad_(False)
    z = latents(run, GENERATOR_NOISE, step)
    with torch.no_grad():
        t_real, _ = critic(x_real, labels)
    t_fake, code = critic(generator(z, labels), labels)
    g_loss = generator_loss_fn(t_real, t_fake)
    g_rho = correlation(z, code).mean() if args.ogan else torch.zeros(())
    models.generator_optimizer.zero_grad(set_to_none=True)
    accelerator.backward(g_loss - args.correlation_weight * g_rho)
    models.generator_optimizer.step()
    values = {"critic_loss": c_loss.item(), "generator_loss": g_loss.item(), "delta_t": (t_real - t_fake).mean().item()}
    return {**values, "correlation": g_rho.item()} if args.ogan else values


def gan_trainer(run: TrainingRun) -> Trainer:
    """Build G and T, their Adam optimizers and G's EMA on ``run``; returns their ``Trainer``."""
    args, accelerator = run.args, run.accelerator
    sizes = dict(latent_dim=args.latent_dim, base_channels=args.base_channels, image_size=args.image_size,
                 channels=run.dataset.channels, num_classes=run.num_classes)
    torch.manual_seed(args.seed)
    generator, critic = Generator(**sizes), Critic(**sizes, ogan=args.ogan)
    betas = (args.adam_beta1, 0.999)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=args.lr, betas=betas)
    c_optimizer = torch.optim.Adam(critic.parameters(), lr=args.lr, betas=betas)
    generator, critic, g_optimizer, c_optimizer = accelerator.prepare(generator, critic, g_optimizer, c_optimizer)
    g_unwrapped, c_unwrapped = accelerator.unwrap_model(generator), accelerator.unwrap_model(critic)
    ema = run.track_ema(g_unwrapped)
    models = GANModels(generator, critic, c_unwrapped, g_optimizer, c_optimizer)
    info = dict(process="gan", loss=args.loss, ogan=args.ogan, latent_dim=args.latent_dim,
                critic_steps=args.critic_steps)

    def pipeline(step: int) -> GANPipeline:
        exported_critic = None
        if args.ogan:
            exported_critic = Critic.from_config(c_unwrapped.config)
            exported_critic.load_state_dict(c_unwrapped.state_dict())
            exported_critic.eval()
        pipe = GANPipeline(ema_generator(ema, g_unwrapped), exported_critic, run.info(step, **info))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def export(directory: Path, step: int) -> None:
        pipeline(step).save_pretrained(directory, safe_serialization=True)

    invariants = {name: getattr(args, name) for name in ("loss", "ogan", "latent_dim", "base_channels",
                                                          "critic_steps")}
    return Trainer(step=lambda step: gan_step(run, models, step), export=export, preview=pipeline,
                   invariants=invariants, batches_per_step=args.critic_steps)


def train(args: argparse.Namespace, argv: list[str]) -> Path:
    """Train (or resume) the GAN run described by ``args``; returns the exported pipeline directory."""
    check_args(args)
    run = TrainingRun(args, argv, "train.gan")
    return run.train(gan_trainer(run))


def main(argv: list[str] | None = None) -> None:
    run_main(build_parser, check_args, train, argv)


if __name__ == "__main__":
    main()
