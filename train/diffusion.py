"""Train a diffusion model with accelerate: ``python -m train.diffusion --steps 5000 --output-dir runs/NAME``.

Also runs under a launcher, e.g. ``accelerate launch --num_processes 2 --cpu -m train.diffusion …`` or
``torchrun --nproc_per_node 2 -m train.diffusion …`` (gloo on CPU).

Batches. ``--batch-size`` is per process: the effective batch of one optimizer step is
batch × processes × ``--grad-accum``. Every process draws the same *global* batch (batch × processes images)
and the same noise, timesteps and label dropout for it, from generators seeded by (``--seed``, micro-step),
and trains on its own contiguous shard (rank r takes images r·batch … (r+1)·batch − 1). The data order is a
pure function of (seed, micro-step): global batch k is items k·G … (k+1)·G − 1 of the endless concatenation
of per-epoch permutations, epoch e's permutation drawn from a generator seeded by (seed, e). So a resumed run
continues the exact sequence, and N processes × batch B compute what 1 process × batch N·B does.

Optimisation: AdamW, linear warm-up then cosine (or constant) learning rate, gradient accumulation, gradient
clipping, an EMA of the weights (``diffusers.training_utils.EMAModel``).

Run directory (``--output-dir``): ``train_config.json`` (written at start), ``metrics.jsonl`` (one line per
step: step, loss, lr, grad_norm — the app reads it for live loss curves), TensorBoard logs in ``logs/`` when
tensorboard is installed (the same scalars, plus an EMA sample grid of ``--sample-steps`` sampler steps every
``--sample-every`` steps, also saved as ``samples/step-STEP.png``), ``checkpoint-STEP/`` every
``--checkpoint-every`` steps and at the end (see ``train.checkpointing``; the last ``--keep-checkpoints`` are
kept), and the exported pipeline (EMA weights, as ``--export-dtype``, ``model/`` unless ``--export DIR``).
``--resume latest`` continues from the newest complete checkpoint and truncates ``metrics.jsonl`` to it; resuming a
finished run only exports it again. SIGTERM or SIGINT (the app's Stop, Ctrl-C, a cluster's preemption notice)
finishes the current step, writes a checkpoint there and exits without exporting: nothing is lost, and
``--resume latest`` continues exactly. All of this is ``train.run``'s (data order: ``train.batch_order``); this
module supplies the UNet, the objective and the step.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from models.unet import UNET_CONFIGS, build_unet
from pipelines import DiffusionImagePipeline
from train.objectives import OBJECTIVES, TIMESTEP_SAMPLINGS, Objective, accepted_options, make_objective
from train.options import add_common_arguments, check_at_least_one, check_common_args, check_non_negative, run_main
from train.recipes import RECIPES, recipe_flags
from train.run import Trainer, TrainingRun

LR_DECAYS = {"cosine": "cosine", "constant": "constant_with_warmup"}  # --lr-decay → diffusers' schedule name
# passed to (and kept invariant by) the objectives that take them
PROCESS_OPTIONS = ("pfgm_D", "udm_loss", "udm_noise", "snr_gamma", "teacher", "consistency_steps", "mean_flow_ratio",
                   "mean_flow_guidance")
# What a resumed run must share with the checkpoint's run, besides train.run.COMMON_INVARIANTS and PROCESS_OPTIONS.
RESUME_INVARIANTS = ("objective", "timestep_sampling", "model", "label_dropout", "grad_accum", "init_from")
NOISE_STREAM = 1  # the random stream of the noise, timesteps and label dropout (train.batch_order)
PREVIEW_STEPS = 25
PREVIEW_GUIDANCE = 3.0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

# --export-dtype: what the exported UNet's safetensors hold (the shipped checkpoints' size budget; README)
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.diffusion", description=__doc__.splitlines()[0])
    groups = add_common_arguments(parser, lr=2e-4, ema_decay=0.999)
    model = parser.add_argument_group("model and objective")
    model.add_argument("--recipe", default=None, choices=list(RECIPES),
                       help="start from a named recipe's flags (train.recipes); flags given after it win")
    model.add_argument("--objective", default="vp-eps", choices=sorted(OBJECTIVES))
    model.add_argument("--timestep-sampling", default="uniform", choices=TIMESTEP_SAMPLINGS)
    model.add_argument("--model", default="small", choices=list(UNET_CONFIGS), help="models.unet.UNET_CONFIGS name")
    model.add_argument("--label-dropout", type=float, default=0.1, help="probability of training on the null class")
    model.add_argument("--export-dtype", choices=list(EXPORT_DTYPES), default="float32",
                       help="dtype of the exported UNet weights: float16 halves the file (diffusers loads it as "
                            "float32); training and checkpoints stay float32")
    process = parser.add_argument_group("process options (only the objectives that have them use them)")
    process.add_argument("--pfgm-D", "--D", dest="pfgm_D", type=int, default=128,
                         help="pfgmpp: extra dimensions D (1 = PFGM, larger → EDM; --objective edm is D = ∞)")
    process.add_argument("--snr-gamma", type=float, default=None,
                         help="vp-*: min-SNR-γ loss weighting (Hang et al. 2023; 5 is the paper's); default off")
    process.add_argument("--udm-loss", choices=["l1", "l2"], default="l1", help="udm-*: the x0 regression's norm")
    process.add_argument("--udm-noise", type=float, default=0.01,
                         help="udm-blur/udm-mask: std of the small noise added to the deterministic corruption")
    process.add_argument("--teacher", default=None, metavar="PIPELINE_DIR",
                         help="consistency-distillation: the exported vp, flow or edm model to distil (the student "
                              "starts from its weights: same --model, image size and classes)")
    process.add_argument("--consistency-steps", type=int, default=None,
                         help="consistency-distillation: steps N of the teacher's ODE grid from σ_max to σ_min "
                              "(default 20); consistency-training: the curriculum's final N, s1 (default 1280)")
    process.add_argument("--mean-flow-ratio", type=float, default=0.25,
                         help="mean-flow: share of samples with r ≠ t (the rest train plain flow matching at r = t)")
    process.add_argument("--mean-flow-guidance", type=float, default=1.0,
                         help="mean-flow: classifier-free guidance ω trained into the one-step map (1 = none)")
    model.add_argument("--init-from", default=None, metavar="PIPELINE_DIR",
                       help="start from the UNet weights of an exported pipeline (same --model, image size and "
                            "classes) instead of a random initialisation: fine-tuning, or a distilled student")
    groups.run.add_argument("--sample-steps", type=int, default=PREVIEW_STEPS,
                            help="sampler steps of the --sample-every grid (fewer: a cheaper, rougher preview)")
    groups.optim.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    groups.optim.add_argument("--lr-decay", default="cosine", choices=list(LR_DECAYS))
    groups.optim.add_argument("--grad-accum", type=int, default=1,
                              help="micro-batches per optimizer step (effective batch × this)")
    groups.optim.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's decoupled weight decay")
    groups.optim.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW's β1 (β2 stays 0.999)")
    groups.optim.add_argument("--ema-power", type=float, default=None,
                              help="EMA warm-up: decay min(1 − (1 + step)^−power, --ema-decay) (diffusers' "
                                   "train_unconditional uses 0.75); default: the constant --ema-decay")
    groups.optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first option out of range."""
    check_common_args(args)
    check_at_least_one(args, "grad_accum", "sample_steps")
    check_non_negative(args, "warmup", "grad_clip", "weight_decay")
    if not 0.0 <= args.adam_beta1 < 1.0:
        raise ValueError(f"--adam-beta1 must be in [0, 1), got {args.adam_beta1}")
    if args.ema_power is not None and not args.ema_power > 0:
        raise ValueError(f"--ema-power must be positive, got {args.ema_power}")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def ema_pipeline(ema: EMAModel, unet_config, objective: Objective, info: dict[str, Any]) -> DiffusionImagePipeline:
    """A pipeline around a fresh UNet holding the EMA weights (the training model stays untouched), with the
    objective's scheduler (``make_scheduler``: DDIM η = 0 for VP, Heun for flow) and ``info`` as its
    ``model_info``."""
    unet = objective.network_class.from_config(unet_config)
    ema.copy_to(unet.parameters())
    pipeline = DiffusionImagePipeline(unet.eval(), objective.make_scheduler(), info)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_initial_weights(model: UNet2DModel, directory: str | Path, option: str = "--init-from") -> None:
    """Copy the UNet weights of the pipeline at ``directory`` (loaded without unpickling, ``pipelines.loading``)
    into ``model``; ValueError naming the first parameter whose shape differs (another architecture, image size
    or number of classes); ``option`` names where ``directory`` came from."""
    from pipelines.loading import load_pipeline

    source = getattr(load_pipeline(directory), "unet", None)
    if source is None:
        raise ValueError(f"{option} {directory}: the pipeline there has no UNet")
    weights, own = source.state_dict(), model.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"{option} {directory}: its UNet lacks {missing[0]} (another --model architecture?)")
    for name, value in own.items():
        if weights[name].shape != value.shape:
            raise ValueError(f"{option} {directory}: {name} has shape {tuple(weights[name].shape)} there, "
                             f"{tuple(value.shape)} here (another --model, image size or number of classes)")
    model.load_state_dict({name: weights[name].to(value.dtype) for name, value in own.items()})


def build_objective(args: argparse.Namespace, num_classes: int) -> tuple[Objective, dict[str, Any]]:
    """The objective ``--objective`` names, and the process options it took (kept invariant on resume)."""
    process_options = accepted_options(args.objective, {name: getattr(args, name) for name in PROCESS_OPTIONS})
    # a curriculum's length: not an invariant, since a resumed run may train longer
    run_length = accepted_options(args.objective, {"training_batches": args.steps * args.grad_accum})
    objective = make_objective(args.objective, label_dropout=args.label_dropout,
                               timestep_sampling=args.timestep_sampling,
                               null_class_id=num_classes if num_classes else None, **process_options, **run_length)
    return objective, process_options


class DiffusionParts(NamedTuple):
    """What one diffusion step updates: the prepared UNet, its objective, optimizer and learning-rate schedule."""

    model: torch.nn.Module
    objective: Objective
    optimizer: torch.optim.Optimizer
    lr_schedule: Any


def diffusion_step(run: TrainingRun, parts: DiffusionParts, index: int) -> dict[str, float]:
    """One optimizer step of ``--grad-accum`` micro-batches: each process trains on its shard of the global batch,
    noised by the objective from the (seed, micro-step) generator; then clip, step."""
    args, accelerator = run.args, run.accelerator
    model, objective = parts.model, parts.objective
    step_loss = 0.0
    for micro in range(args.grad_accum):
        x0, labels = run.next_global_batch()
        batch = objective.sample(x0, labels if args.conditional else None,
                                 run.generator(NOISE_STREAM, index * args.grad_accum + micro))
        local = batch.select(run.shard)
        with accelerator.accumulate(model):
            loss, per_sample = objective.training_loss(model, local)
            accelerator.backward(loss)
        losses = accelerator.gather(per_sample)  # the global batch's, in rank order = batch order
        objective.observe(batch.model_kwargs, losses)
        step_loss += (batch.loss_weight * losses).mean().item() / args.grad_accum
    # the last micro-step synchronised the gradients: clip, step
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
    lr = parts.lr_schedule.get_last_lr()[0]
    parts.optimizer.step()
    parts.optimizer.zero_grad()
    parts.lr_schedule.step()
    return {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm)}


def diffusion_trainer(run: TrainingRun) -> Trainer:
    """Build the UNet, objective, AdamW with its schedule and the EMA on ``run``; returns their ``Trainer``."""
    args, accelerator = run.args, run.accelerator
    torch.manual_seed(args.seed)  # the same initial weights on every process
    objective, process_options = build_objective(args, run.num_classes)
    model = build_unet(args.model, args.image_size, run.dataset.channels, run.num_classes, objective.network_class)
    if args.init_from is not None:
        load_initial_weights(model, args.init_from)
    elif objective.initial_weights() is not None:  # a distillation's student starts as its teacher
        load_initial_weights(model, objective.initial_weights(), "--teacher")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.adam_beta1, 0.999),
                                  weight_decay=args.weight_decay)
    lr_schedule = get_scheduler(LR_DECAYS[args.lr_decay], optimizer, num_warmup_steps=args.warmup,
                                num_training_steps=args.steps)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    unwrapped = accelerator.unwrap_model(model)
    warmup = {} if args.ema_power is None else {"use_ema_warmup": True, "inv_gamma": 1.0, "power": args.ema_power}
    ema = run.track_ema(unwrapped, model_cls=objective.network_class, model_config=unwrapped.config, **warmup)
    accelerator.register_for_checkpointing(objective)
    model.train()
    parts = DiffusionParts(model, objective, optimizer, lr_schedule)

    def pipeline(step: int) -> DiffusionImagePipeline:
        info = run.info(step, **objective.model_info(), null_class_id=objective.null_class_id, model=args.model)
        return ema_pipeline(ema, unwrapped.config, objective, info)

    def export(directory: Path, step: int) -> None:
        exported = pipeline(step)
        exported.unet.to(EXPORT_DTYPES[args.export_dtype])
        exported.save_pretrained(directory, safe_serialization=True)

    preview_kwargs = {"num_inference_steps": args.sample_steps,
                      **({"guidance_scale": PREVIEW_GUIDANCE} if run.num_classes else {})}
    return Trainer(
        step=lambda index: diffusion_step(run, parts, index), export=export, preview=pipeline,
        preview_kwargs=preview_kwargs,
        invariants={**{name: getattr(args, name) for name in RESUME_INVARIANTS}, **process_options},
        batches_per_step=args.grad_accum, checkpoint_fields=lambda step: {"micro_step": step * args.grad_accum},
        config_fields={"effective_batch_size": run.global_batch * args.grad_accum}, consistent_weights=unwrapped)


def train(args: argparse.Namespace, argv: list[str]) -> Path:
    """Train (or resume) the run described by ``args``; returns the exported pipeline directory (or, when
    SIGTERM/SIGINT stopped it, the checkpoint saved at that step)."""
    check_args(args)
    run = TrainingRun(args, argv, "train.diffusion", grad_accum=args.grad_accum)
    try:
        trainer = diffusion_trainer(run)
    except ValueError as error:  # a setting only the objective or the weights can check (--teacher, --init-from)
        raise SystemExit(f"python -m train.diffusion: error: {error}") from None
    return run.train(trainer)


def with_recipe(argv: list[str]) -> list[str]:
    """``argv`` with ``--recipe NAME`` expanded into the recipe's flags, placed where it stands so that later
    flags override it (argparse keeps the last value)."""
    for i, arg in enumerate(argv):
        name = arg.split("=", 1)[1] if arg.startswith("--recipe=") else argv[i + 1] if (
            arg == "--recipe" and i + 1 < len(argv)) else None
        if name is not None:
            width = 1 if "=" in arg else 2
            return [*argv[:i], *recipe_flags(name), *argv[i:i + width], *with_recipe(argv[i + width:])]
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        argv = with_recipe(argv)
    except ValueError as err:
        build_parser().error(str(err))
    run_main(build_parser, check_args, train, argv)


if __name__ == "__main__":
    main()
