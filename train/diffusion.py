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
tensorboard is installed (the same scalars, plus an EMA sample grid every ``--sample-every`` steps, also saved
as ``samples/step-STEP.png``), ``checkpoint-STEP/`` every ``--checkpoint-every`` steps and at the end (see
``train.checkpointing``; the last ``--keep-checkpoints`` are kept), and the exported pipeline (EMA weights,
``model/`` unless ``--export DIR``). ``--resume latest`` continues from the newest complete checkpoint and
truncates ``metrics.jsonl`` to it; resuming a finished run only exports it again. SIGTERM or SIGINT (the app's
Stop, Ctrl-C, a cluster's preemption notice) finishes the current step, writes a checkpoint there and exits
without exporting: nothing is lost, and ``--resume latest`` continues exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import signal
import time
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, is_tensorboard_available
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from data import ImageDataset, load_dataset
from models.unet import UNET_CONFIGS, build_unet
from pipelines import DiffusionImagePipeline
from train.checkpointing import (
    complete_checkpoints,
    discard_checkpoints_after,
    find_checkpoint,
    load_checkpoint,
    read_training_state,
    save_checkpoint,
)
from train.objectives import OBJECTIVES, TIMESTEP_SAMPLINGS, Objective, accepted_options, make_objective
from train.options import add_common_arguments, check_at_least_one, check_common_args, check_non_negative, run_main

LR_DECAYS = {"cosine": "cosine", "constant": "constant_with_warmup"}  # --lr-decay → diffusers' schedule name
# What a resumed run must share with the run that wrote the checkpoint for the continuation to be exact.
PROCESS_OPTIONS = ("pfgm_D", "udm_loss", "udm_noise")  # passed to (and kept invariant by) the objectives that take them
RESUME_INVARIANTS = ("dataset", "image_size", "max_train_images", "objective", "timestep_sampling", "model",
                     "conditional", "label_dropout", "seed", "batch_size", "num_processes", "grad_accum")
# Independent random streams of a run, mixed into the seed so data order and noise never share draws.
DATA_STREAM, NOISE_STREAM = 0, 1
SUBSET_SEED = 0  # --max-train-images takes the first N images of this fixed shuffle, whatever --seed is
PREVIEW_COLUMNS = 8
UNCONDITIONAL_ROWS = 4
PREVIEW_STEPS = 25
PREVIEW_GUIDANCE = 3.0
PREVIEW_SEED = 0
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "run_summary.json"


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.diffusion", description=__doc__.splitlines()[0])
    groups = add_common_arguments(parser, lr=2e-4, ema_decay=0.999)
    model = parser.add_argument_group("model and objective")
    model.add_argument("--objective", default="vp-eps", choices=sorted(OBJECTIVES))
    model.add_argument("--timestep-sampling", default="uniform", choices=TIMESTEP_SAMPLINGS)
    model.add_argument("--model", default="small", choices=list(UNET_CONFIGS), help="models.unet.UNET_CONFIGS name")
    model.add_argument("--label-dropout", type=float, default=0.1, help="probability of training on the null class")
    process = parser.add_argument_group("process options (only the objectives that have them use them)")
    process.add_argument("--pfgm-D", "--D", dest="pfgm_D", type=int, default=128,
                         help="pfgmpp: extra dimensions D (1 = PFGM, larger → EDM; --objective edm is D = ∞)")
    process.add_argument("--udm-loss", choices=["l1", "l2"], default="l1", help="udm-*: the x0 regression's norm")
    process.add_argument("--udm-noise", type=float, default=0.01,
                         help="udm-blur/udm-mask: std of the small noise added to the deterministic corruption")
    groups.optim.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    groups.optim.add_argument("--lr-decay", default="cosine", choices=list(LR_DECAYS))
    groups.optim.add_argument("--grad-accum", type=int, default=1,
                              help="micro-batches per optimizer step (effective batch × this)")
    groups.optim.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 disables clipping")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first option out of range."""
    check_common_args(args)
    check_at_least_one(args, "grad_accum")
    check_non_negative(args, "warmup", "grad_clip")


def default_mixed_precision(cpu: bool) -> str:
    return "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def launch_command(argv: list[str], num_processes: int, module: str = "train.diffusion") -> str:
    """The command line that reproduces this run (thread count included: it changes float summation order)."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    launcher = ["python"] if num_processes == 1 else ["torchrun", f"--nproc_per_node={num_processes}"]
    return threads + shlex.join([*launcher, "-m", module, *argv])


# --------------------------------------------------------------------------------------------------
# Data order and randomness: pure functions of (seed, step)
# --------------------------------------------------------------------------------------------------


def derived_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 63-bit seed for item ``index`` of random ``stream`` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, stream, index))


class GlobalBatchOrder:
    """Endless, seeded, resumable order of global batches (a ``DataLoader`` batch sampler).

    Global batch k is positions k·G … (k+1)·G − 1 of the concatenation of per-epoch permutations of the
    dataset, epoch e's permutation drawn from (seed, e); iteration starts at batch ``start_batch``.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, seed: int, start_batch: int = 0):
        if dataset_size < 1 or global_batch_size < 1:
            raise ValueError(f"need a non-empty dataset and batch, got {dataset_size} images and a batch of "
                             f"{global_batch_size}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.start_batch = start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.dataset_size, generator=seeded_generator(self.seed, DATA_STREAM, epoch))

    def batch_indices(self, batch: int) -> list[int]:
        positions = torch.arange(batch * self.global_batch_size, (batch + 1) * self.global_batch_size)
        epochs, offsets = positions // self.dataset_size, positions % self.dataset_size
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            in_epoch = epochs == epoch
            indices[in_epoch] = self.permutation(epoch)[offsets[in_epoch]]
        return indices.tolist()

    def __iter__(self):
        batch = self.start_batch
        while True:
            yield self.batch_indices(batch)
            batch += 1


def rank_shard(batch_size: int, process_index: int) -> slice:
    """The contiguous part of a global batch that process ``process_index`` trains on."""
    return slice(process_index * batch_size, (process_index + 1) * batch_size)


def training_data(args: argparse.Namespace) -> tuple[ImageDataset, Dataset]:
    """The dataset (for its metadata) and what is trained on: all of it, or the fixed ``--max-train-images`` subset."""
    dataset = load_dataset(args.dataset, image_size=args.image_size, split="train")
    if args.max_train_images is None or args.max_train_images >= len(dataset):
        return dataset, dataset
    subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return dataset, Subset(dataset, subset[: args.max_train_images].tolist())


# --------------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------------


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus accelerate's trackers; main process only writes."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, resumed_step: int):
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        if accelerator.is_main_process:
            self._truncate_after(resumed_step)

    def _truncate_after(self, step: int) -> None:
        """Drop the lines a killed run logged past the checkpoint it resumes from: they are recomputed."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, **values}) + "\n")

    def log_image(self, step: int, name: str, image: PIL.Image.Image) -> None:
        if self.accelerator.is_main_process and self.accelerator.trackers:
            pixels = np.asarray(image.convert("RGB"))[None]
            self.accelerator.get_tracker("tensorboard").log_images({name: pixels}, step, dataformats="NHWC")


# --------------------------------------------------------------------------------------------------
# Sampling and export
# --------------------------------------------------------------------------------------------------


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters, in order, as raw bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ema_pipeline(ema: EMAModel, unet_config, objective: Objective, info: dict[str, Any]) -> DiffusionImagePipeline:
    """A pipeline around a fresh UNet holding the EMA weights (the training model stays untouched), with the
    objective's scheduler (``make_scheduler``: DDIM η = 0 for VP, Heun for flow) and ``info`` as its
    ``model_info``."""
    unet = UNet2DModel.from_config(unet_config)
    ema.copy_to(unet.parameters())
    pipeline = DiffusionImagePipeline(unet.eval(), objective.make_scheduler(), info)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_grid(pipeline: DiffusionImagePipeline, columns: int, guidance_scale: float, seed: int,
                num_inference_steps: int) -> PIL.Image.Image:
    """A grid of samples, ``columns`` per row: one row per class (conditional model) or 4 rows (unconditional)."""
    classes = pipeline.num_classes
    rows = classes or UNCONDITIONAL_ROWS
    labels = torch.arange(rows).repeat_interleave(columns) if classes else None
    images = pipeline(
        batch_size=rows * columns,
        num_inference_steps=num_inference_steps,
        generator=torch.Generator().manual_seed(seed),
        class_labels=labels,
        guidance_scale=guidance_scale if classes else 1.0,
        output_type="np",
    ).images
    # 1-pixel grey borders keep neighbouring digits apart: (rows, cols, H+2, W+2, C) → (rows·(H+2), cols·(W+2), C)
    framed = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=0.5)
    _, height, width, channels = framed.shape
    grid = framed.reshape(rows, columns, height, width, channels).transpose(0, 2, 1, 3, 4)
    grid = (grid.reshape(rows * height, columns * width, channels) * 255).round().astype(np.uint8)
    return PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)


def model_info(args: argparse.Namespace, dataset: ImageDataset, objective: Objective, step: int,
               command: str) -> dict[str, Any]:
    """What the exported pipeline records about how its model was trained."""
    return {
        **objective.model_info(),
        "dataset": args.dataset,
        "image_size": args.image_size,
        "channels": dataset.channels,
        "num_classes": dataset.num_classes if args.conditional else 0,
        "class_names": dataset.class_names if args.conditional else [],
        "null_class_id": objective.null_class_id,
        "model": args.model,
        "steps": step,
        "training_command": command,
        "seed": args.seed,
    }


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train(args: argparse.Namespace, argv: list[str]) -> Path:
    """Train (or resume) the run described by ``args``; returns the exported pipeline directory."""
    check_args(args)
    output_dir = args.output_dir
    args.mixed_precision = args.mixed_precision or default_mixed_precision(args.cpu)
    accelerator = Accelerator(
        # accelerate only forms a multi-process CPU group (gloo) under torchrun when told it runs on the CPU
        cpu=args.cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard" if is_tensorboard_available() else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the LR schedule counts optimizer steps, however many processes share them
        step_scheduler_with_optimizer=False,
    )
    dataset, train_set = training_data(args)
    if args.conditional is None:
        args.conditional = dataset.num_classes > 0
    if args.conditional and dataset.num_classes == 0:
        raise ValueError(f"--conditional needs a labelled dataset; {args.dataset} has no classes")
    num_classes = dataset.num_classes if args.conditional else 0
    args.num_processes = accelerator.num_processes
    global_batch = args.batch_size * accelerator.num_processes
    command = launch_command(argv, accelerator.num_processes)

    torch.manual_seed(args.seed)  # the same initial weights on every process
    model = build_unet(args.model, args.image_size, dataset.channels, num_classes)
    process_options = accepted_options(args.objective, {name: getattr(args, name) for name in PROCESS_OPTIONS})
    objective = make_objective(args.objective, label_dropout=args.label_dropout,
                               timestep_sampling=args.timestep_sampling,
                               null_class_id=num_classes if num_classes else None, **process_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    lr_schedule = get_scheduler(LR_DECAYS[args.lr_decay], optimizer, num_warmup_steps=args.warmup,
                                num_training_steps=args.steps)
    model, optimizer, lr_schedule = accelerator.prepare(model, optimizer, lr_schedule)
    unwrapped = accelerator.unwrap_model(model)
    ema = EMAModel(unwrapped.parameters(), decay=args.ema_decay, model_cls=UNet2DModel, model_config=unwrapped.config)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema, objective)

    invariants = {**{name: getattr(args, name) for name in RESUME_INVARIANTS}, **process_options}
    start_step = resume_run(accelerator, args, invariants)
    config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "effective_batch_size": global_batch * args.grad_accum, "train_images": len(train_set),
              "num_classes": num_classes, "device": str(accelerator.device), "command": command,
              "resumed_from_step": start_step,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "accelerate": accelerate.__version__, "python": platform.python_version()}}
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    accelerator.init_trackers("train", config={k: v for k, v in config.items() if isinstance(v, (int, float, str))})
    metrics = MetricsLog(accelerator, output_dir, start_step)

    order = GlobalBatchOrder(len(train_set), global_batch, args.seed, start_batch=start_step * args.grad_accum)
    batches = iter(DataLoader(train_set, batch_sampler=order, num_workers=args.num_workers))
    shard = rank_shard(args.batch_size, accelerator.process_index)
    max_grad_norm = args.grad_clip or math.inf

    started = time.perf_counter()
    step = start_step
    progress = tqdm(total=args.steps, initial=step, desc="training", disable=not accelerator.is_main_process)
    model.train()
    stop = StopRequest(accelerator)
    while step < args.steps:
        step_loss = 0.0
        for micro in range(args.grad_accum):
            micro_step = step * args.grad_accum + micro
            x0, labels = (tensor.to(accelerator.device) for tensor in next(batches))
            batch = objective.sample(x0, labels if args.conditional else None,
                                     seeded_generator(args.seed, NOISE_STREAM, micro_step))
            local = batch.select(shard)
            with accelerator.accumulate(model):
                output = model(local.noisy, **local.model_kwargs).sample
                loss, per_sample = objective.loss(output, local)
                accelerator.backward(loss)
            losses = accelerator.gather(per_sample)  # the global batch's, in rank order = batch order
            objective.observe(batch.model_kwargs, losses)
            step_loss += (batch.loss_weight * losses).mean().item() / args.grad_accum
        # the last micro-step synchronised the gradients: clip, step, average
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        lr = lr_schedule.get_last_lr()[0]
        optimizer.step()
        optimizer.zero_grad()
        lr_schedule.step()
        ema.step(unwrapped.parameters())
        step += 1

        metrics.log(step, {"loss": step_loss, "lr": lr, "grad_norm": float(grad_norm)})
        progress.update()
        progress.set_postfix(loss=f"{step_loss:.4f}")
        stopping = stop.requested()
        if step % args.checkpoint_every == 0 or step == args.steps or stopping:
            save_checkpoint(accelerator, output_dir, step, {"micro_step": step * args.grad_accum,
                                                            "samples_seen": step * args.grad_accum * global_batch,
                                                            "invariants": invariants},
                            keep=args.keep_checkpoints)
        if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
            pipeline = ema_pipeline(ema, unwrapped.config, objective, model_info(args, dataset, objective, step,
                                                                                 command))
            grid = sample_grid(pipeline, PREVIEW_COLUMNS, PREVIEW_GUIDANCE, PREVIEW_SEED, PREVIEW_STEPS)
            (output_dir / "samples").mkdir(exist_ok=True)
            grid.save(output_dir / "samples" / f"step-{step}.png")
            metrics.log_image(step, "ema_samples", grid)
        if stopping:
            progress.close()
            accelerator.end_training()
            accelerator.print(f"stopped at step {step}, checkpoint saved: continue with --resume latest")
            return output_dir / f"checkpoint-{step}"
    progress.close()
    stop.restore()

    # data parallelism must leave every process with the same weights; record each one's digest to show it
    digests = gather_object([weights_digest(unwrapped)])
    export_dir = args.export or output_dir / "model"
    if accelerator.is_main_process:
        summary = {"step": step, "resumed_from_step": start_step,
                   "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
                   "weights_sha256_per_process": digests, "export_dir": str(export_dir)}
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        pipeline = ema_pipeline(ema, unwrapped.config, objective, model_info(args, dataset, objective, step, command))
        pipeline.save_pretrained(export_dir, safe_serialization=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"exported the EMA model to {export_dir}")
    return export_dir


class StopRequest:
    """SIGTERM / SIGINT set a flag instead of killing the run; the loop checks it after every step. With several
    processes the flag is summed over ranks, so all of them stop after the same step (a signal reaching one
    rank first cannot leave the others waiting in a collective)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.flag = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.flag
        flags = self.accelerator.reduce(torch.tensor([float(self.flag)], device=self.accelerator.device), "sum")
        return bool(flags.item() > 0)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def resume_run(accelerator: Accelerator, args: argparse.Namespace, invariants: dict[str, Any]) -> int:
    """Restore the checkpoint ``--resume`` names, if any; returns the step to continue from."""
    if args.resume is None:
        if complete_checkpoints(args.output_dir):
            raise ValueError(f"{args.output_dir} already holds checkpoints of a run: pass --resume latest to "
                             "continue it, or choose another --output-dir")
        return 0
    checkpoint = find_checkpoint(args.output_dir, args.resume)
    if checkpoint is None:
        accelerator.print(f"no complete checkpoint in {args.output_dir}: starting from step 0")
        return 0
    saved = read_training_state(checkpoint)["invariants"]
    changed = {name: (saved.get(name), value) for name, value in invariants.items() if saved.get(name) != value}
    if changed:
        raise ValueError(f"cannot resume {checkpoint} exactly: these settings differ from the checkpoint's "
                         f"(checkpoint, now): {changed}")
    state = load_checkpoint(accelerator, checkpoint)
    accelerator.print(f"resumed from {checkpoint} (step {state['step']})")
    if accelerator.is_main_process:
        for path in discard_checkpoints_after(args.output_dir, state["step"]):
            accelerator.print(f"discarded {path}, past the checkpoint resumed from")
    accelerator.wait_for_everyone()
    return state["step"]


def main(argv: list[str] | None = None) -> None:
    run_main(build_parser, check_args, train, argv)


if __name__ == "__main__":
    main()
