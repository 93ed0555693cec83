"""The accelerate run shared by the baseline trainers (``train.gan``, ``train.vae``).

It is ``train.diffusion``'s run with the model-specific step left open: the same options for data, optimisation
and the run directory, the same seeded global-batch order (``GlobalBatchOrder``, rank shards), the same atomic
checkpoints with ``--resume latest`` and keep-last-K (``train.checkpointing``), ``metrics.jsonl`` with
TensorBoard (``MetricsLog``), a tqdm bar, sample grids and ``run_summary.json``. A trainer builds and
``prepare``s its models, registers its extra state (EMA) for checkpointing, then hands ``BaselineRun.train`` a
``step(step) -> metrics`` function, a preview and an export function.

A trainer step that reads data calls ``next_batch()`` a fixed number of times per step (``batches_per_step``),
so the data position is a pure function of the step and a resumed run reads the same images; its noise comes
from ``generator(stream, index)``, a pure function of (seed, stream, index).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, is_tensorboard_available
from torch.utils.data import DataLoader
from tqdm import tqdm

from train.checkpointing import save_checkpoint
from train.diffusion import (
    CONFIG_FILE,
    SUMMARY_FILE,
    GlobalBatchOrder,
    MetricsLog,
    StopRequest,
    default_mixed_precision,
    launch_command,
    rank_shard,
    resume_run,
    seeded_generator,
    training_data,
)

# What a resumed baseline run must share with the checkpoint's run (each trainer adds its model's options).
COMMON_INVARIANTS = ("dataset", "image_size", "max_train_images", "conditional", "seed", "batch_size",
                     "num_processes")


class BaselineRun:
    """One training run of a baseline model: accelerator, data, resume, logging, checkpoints, export."""

    def __init__(self, args: argparse.Namespace, argv: list[str], module: str):
        self.args = args
        args.mixed_precision = args.mixed_precision or default_mixed_precision(args.cpu)
        self.accelerator = Accelerator(
            cpu=args.cpu or not torch.cuda.is_available(),
            mixed_precision=args.mixed_precision,
            log_with="tensorboard" if is_tensorboard_available() else None,
            project_config=ProjectConfiguration(project_dir=str(args.output_dir),
                                                logging_dir=str(args.output_dir / "logs")),
            step_scheduler_with_optimizer=False,  # learning-rate schedules count optimizer steps
        )
        self.dataset, self.train_set = training_data(args)
        if args.conditional is None:
            args.conditional = self.dataset.num_classes > 0
        if args.conditional and self.dataset.num_classes == 0:
            raise ValueError(f"--conditional needs a labelled dataset; {args.dataset} has no classes")
        self.num_classes = self.dataset.num_classes if args.conditional else 0
        args.num_processes = self.accelerator.num_processes
        self.command = launch_command(argv, self.accelerator.num_processes, module)
        self.start_step = 0
        self._batches: Iterator | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def generator(self, stream: int, index: int) -> torch.Generator:
        """A generator seeded by (--seed, stream, index): the same draws on every process and after resuming."""
        return seeded_generator(self.args.seed, stream, index)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's shard of the next global batch of real images and labels, on the device."""
        images, labels = next(self._batches)
        shard = rank_shard(self.args.batch_size, self.accelerator.process_index)
        return images[shard].to(self.device), labels[shard].to(self.device)

    def info(self, step: int, **fields: Any) -> dict[str, Any]:
        """The ``model_info`` an exported pipeline records: data, classes, how it was trained, and ``fields``."""
        return {**fields, "dataset": self.args.dataset, "image_size": self.args.image_size,
                "channels": self.dataset.channels, "num_classes": self.num_classes,
                "class_names": self.dataset.class_names if self.num_classes else [], "steps": step,
                "training_command": self.command, "seed": self.args.seed}

    def train(self, step_fn: Callable[[int], dict[str, float]], invariants: dict[str, Any], batches_per_step: int,
              preview: Callable[[], PIL.Image.Image], export: Callable[[Path, int], None]) -> Path:
        """Resume if asked, run ``step_fn`` up to ``--steps`` with logs and checkpoints, export; returns the export
        directory (or, when SIGTERM/SIGINT stopped the run, the checkpoint it saved at the step it was in).
        Models, optimizers and extra state must be prepared/registered with the accelerator before."""
        args, accelerator = self.args, self.accelerator
        invariants = {**{name: getattr(args, name) for name in COMMON_INVARIANTS}, **invariants}
        self.start_step = step = resume_run(accelerator, args, invariants)
        global_batch = args.batch_size * accelerator.num_processes
        config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "train_images": len(self.train_set), "num_classes": self.num_classes,
                  "device": str(accelerator.device), "command": self.command, "resumed_from_step": step,
                  "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                               "accelerate": accelerate.__version__, "python": platform.python_version()}}
        if accelerator.is_main_process:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            (args.output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        accelerator.init_trackers("train", config={k: v for k, v in config.items()
                                                   if isinstance(v, (int, float, str))})
        metrics = MetricsLog(accelerator, args.output_dir, step)
        order = GlobalBatchOrder(len(self.train_set), global_batch, args.seed, start_batch=step * batches_per_step)
        self._batches = iter(DataLoader(self.train_set, batch_sampler=order, num_workers=args.num_workers))

        started = time.perf_counter()
        stop = StopRequest(accelerator)  # SIGTERM / SIGINT: checkpoint the current step and return
        progress = tqdm(total=args.steps, initial=step, desc="training", disable=not accelerator.is_main_process)
        while step < args.steps:
            values = step_fn(step)
            step += 1
            metrics.log(step, values)
            progress.update()
            progress.set_postfix({key: f"{value:.4f}" for key, value in values.items() if "loss" in key})
            stopping = stop.requested()
            if step % args.checkpoint_every == 0 or step == args.steps or stopping:
                save_checkpoint(accelerator, args.output_dir, step,
                                {"samples_seen": step * batches_per_step * global_batch, "invariants": invariants},
                                keep=args.keep_checkpoints)
            if args.sample_every and step % args.sample_every == 0 and accelerator.is_main_process:
                grid = preview()
                (args.output_dir / "samples").mkdir(exist_ok=True)
                grid.save(args.output_dir / "samples" / f"step-{step}.png")
                metrics.log_image(step, "ema_samples", grid)
            if stopping:
                progress.close()
                stop.restore()
                accelerator.end_training()
                accelerator.print(f"stopped at step {step}, checkpoint saved: continue with --resume latest")
                return args.output_dir / f"checkpoint-{step}"
        progress.close()
        stop.restore()

        export_dir = args.export or args.output_dir / "model"
        if accelerator.is_main_process:
            summary = {"step": step, "resumed_from_step": self.start_step,
                       "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
                       "export_dir": str(export_dir)}
            (args.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            export(export_dir, step)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        accelerator.print(f"exported the EMA model to {export_dir}")
        return export_dir


def preview_grid(pipeline, num_classes: int, columns: int = 8, seed: int = 0) -> PIL.Image.Image:
    """A grid of one-pass samples: one row per class (conditional) or four rows, ``columns`` wide."""
    rows = num_classes or 4
    labels = torch.arange(rows).repeat_interleave(columns) if num_classes else None
    images = pipeline(batch_size=rows * columns, class_labels=labels, output_type="pil",
                      generator=torch.Generator().manual_seed(seed)).images
    return diffusers.utils.make_image_grid(images, rows=rows, cols=columns)
