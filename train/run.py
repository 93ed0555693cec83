"""One training run, shared by every trainer: ``train.diffusion``, ``train.gan``, ``train.vae`` (a run directory
with checkpoints) and ``train.judge``, ``train.classifier`` (the accelerator and the step loop only).

A trainer builds and ``prepare``s its models on ``TrainingRun.accelerator``, names the weights to average
(``track_ema``), and hands ``TrainingRun.train`` a ``Trainer``: its step function, the options a resumed run
must keep, a preview pipeline and an export function. The run owns everything else:

* the accelerator (mixed precision, CPU, multi-process gloo under torchrun), ``make_accelerator``;
* the seeded global-batch order and rank shards (``train.batch_order``): a step that reads data calls
  ``next_batch``/``next_global_batch`` ``batches_per_step`` times, so the data position is a pure function of
  the step, and draws its noise from ``generator(stream, index)``;
* the EMA of the weights (``diffusers.training_utils.EMAModel``), stepped after every trainer step;
* ``--resume latest`` (exact: the checkpoint restores weights, optimizer, schedule, RNG and EMA; newer
  checkpoints are discarded) and the invariants checked on resume;
* ``metrics.jsonl`` (one line per step; the app reads it for live curves) and TensorBoard in ``logs/``;
* SIGTERM / SIGINT (``StopRequest``): finish the step, checkpoint it, return without exporting;
* ``checkpoint-STEP/`` every ``--checkpoint-every`` steps and at the end (``train.checkpointing``), a preview
  grid every ``--sample-every`` steps (``samples/step-STEP.png``), ``train_config.json``, ``run_summary.json``
  and the export (``model/`` unless ``--export DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import accelerate
import diffusers
import numpy as np
import PIL.Image
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, gather_object, is_tensorboard_available
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.sampling import image_grid
from train.batch_order import GlobalBatchOrder, rank_shard, seeded_generator, training_data
from train.checkpointing import (
    complete_checkpoints,
    discard_checkpoints_after,
    find_checkpoint,
    load_checkpoint,
    read_training_state,
    save_checkpoint,
)

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "run_summary.json"
SNAPSHOT_DIR = "exports"  # --export-every's EMA pipelines, one step-STEP/ each
PREVIEW_COLUMNS = 8
PREVIEW_SEED = 0
# What every resumed run must share with the run that wrote the checkpoint (each trainer adds its own options).
COMMON_INVARIANTS = ("dataset", "image_size", "max_train_images", "conditional", "seed", "batch_size",
                     "num_processes")


# --------------------------------------------------------------------------------------------------
# Accelerator and command line
# --------------------------------------------------------------------------------------------------


def default_mixed_precision(cpu: bool) -> str:
    return "bf16" if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cpu: bool, mixed_precision: str, project_dir: Path | None = None,
                     grad_accum: int = 1) -> Accelerator:
    """The accelerator of a run; with ``project_dir``, TensorBoard logs go to ``project_dir/logs`` when available."""
    tensorboard = project_dir is not None and is_tensorboard_available()
    return Accelerator(
        # accelerate only forms a multi-process CPU group (gloo) under torchrun when told it runs on the CPU
        cpu=cpu or not torch.cuda.is_available(),
        gradient_accumulation_steps=grad_accum,
        mixed_precision=mixed_precision,
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs"))
        if project_dir is not None else None,
        # learning-rate schedules count optimizer steps, however many processes share them
        step_scheduler_with_optimizer=False,
    )


def launch_command(argv: list[str], num_processes: int, module: str) -> str:
    """The command line that reproduces this run (thread count included: it changes float summation order)."""
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    launcher = ["python"] if num_processes == 1 else ["torchrun", f"--nproc_per_node={num_processes}"]
    return threads + shlex.join([*launcher, "-m", module, *argv])


# --------------------------------------------------------------------------------------------------
# The step loop, metrics and the stop signal
# --------------------------------------------------------------------------------------------------


def run_steps(step_fn: Callable[[int], dict[str, float]], start: int, total: int, description: str,
              show: bool = True, after_step: Callable[[int, dict[str, float]], bool] | None = None) -> int:
    """Call ``step_fn(step)`` for step = start … total − 1 under a progress bar (its ``*loss*`` values shown).
    ``after_step(steps_done, values)`` returning True ends the loop early; returns the number of steps done."""
    step = start
    with tqdm(total=total, initial=start, desc=description, disable=not show) as progress:
        while step < total:
            values = step_fn(step)
            step += 1
            progress.update()
            progress.set_postfix({key: f"{value:.4f}" for key, value in values.items() if "loss" in key})
            if after_step is not None and after_step(step, values):
                break
    return step


class MetricsLog:
    """``metrics.jsonl`` (one JSON object per logged step) plus accelerate's trackers; main process only writes."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, resumed_step: int):
        self.accelerator = accelerator
        self.path = output_dir / METRICS_FILE
        self.cpu_seconds_before = 0.0  # the CPU seconds the logged steps took in earlier invocations
        if accelerator.is_main_process:
            self._truncate_after(resumed_step)

    def _truncate_after(self, step: int) -> None:
        """Drop the lines a killed run logged past the checkpoint it resumes from: they are recomputed."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))
        if kept:
            self.cpu_seconds_before = json.loads(kept[-1]).get("cpu_seconds", 0.0)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as file:
                file.write(json.dumps({"step": step, **values}) + "\n")

    def log_image(self, step: int, name: str, image: PIL.Image.Image) -> None:
        if self.accelerator.is_main_process and self.accelerator.trackers:
            pixels = np.asarray(image.convert("RGB"))[None]
            self.accelerator.get_tracker("tensorboard").log_images({name: pixels}, step, dataformats="NHWC")


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


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's parameters, in order, as raw bytes: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What one kind of model brings to a ``TrainingRun``.

    ``step(step) -> metrics`` does one optimizer step (reading ``batches_per_step`` batches); ``invariants`` are
    its options a resumed run must keep; ``preview(step)`` returns a pipeline for the sample grid, called with
    ``preview_kwargs``; ``export(directory, step)`` writes the final pipeline (main process only);
    ``checkpoint_fields(step)`` adds to ``training_state.json``, ``config_fields`` to ``train_config.json``;
    ``consistent_weights``, when given, has its per-process digest recorded in ``run_summary.json``.
    """

    step: Callable[[int], dict[str, float]]
    export: Callable[[Path, int], None]
    preview: Callable[[int], Any]
    invariants: dict[str, Any] = field(default_factory=dict)
    batches_per_step: int = 1
    preview_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_fields: Callable[[int], dict[str, Any]] = lambda step: {}
    config_fields: dict[str, Any] = field(default_factory=dict)
    consistent_weights: torch.nn.Module | None = None


class TrainingRun:
    """One run of a trainer with a run directory (``train.options.add_common_arguments``): accelerator, data,
    EMA, resume, metrics, stop signal, checkpoints, previews and export."""

    def __init__(self, args: argparse.Namespace, argv: list[str], module: str, grad_accum: int = 1):
        self.args = args
        args.mixed_precision = args.mixed_precision or default_mixed_precision(args.cpu)
        self.accelerator = make_accelerator(args.cpu, args.mixed_precision, args.output_dir, grad_accum)
        self.dataset, self.train_set = training_data(args)
        if args.conditional is None:
            args.conditional = self.dataset.num_classes > 0
        if args.conditional and self.dataset.num_classes == 0:
            raise ValueError(f"--conditional needs a labelled dataset; {args.dataset} has no classes")
        self.num_classes = self.dataset.num_classes if args.conditional else 0
        args.num_processes = self.accelerator.num_processes
        self.command = launch_command(argv, self.accelerator.num_processes, module)
        self.global_batch = args.batch_size * self.accelerator.num_processes
        self.shard = rank_shard(args.batch_size, self.accelerator.process_index)
        self.start_step = 0
        self._ema: tuple[EMAModel, torch.nn.Module] | None = None
        self._batches: Iterator | None = None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def generator(self, stream: int, index: int) -> torch.Generator:
        """A generator seeded by (--seed, stream, index): the same draws on every process and after resuming."""
        return seeded_generator(self.args.seed, stream, index)

    def next_global_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next global batch of real images and labels (every process's shards), on the device."""
        images, labels = next(self._batches)
        return images.to(self.device), labels.to(self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's shard of the next global batch of real images and labels, on the device."""
        images, labels = next(self._batches)
        return images[self.shard].to(self.device), labels[self.shard].to(self.device)

    def track_ema(self, model: torch.nn.Module, **ema_options: Any) -> EMAModel:
        """An EMA (``--ema-decay``) of ``model``'s parameters, checkpointed and stepped after every trainer step.
        Call it before registering any other state for checkpointing (the files are numbered in that order)."""
        ema = EMAModel(model.parameters(), decay=self.args.ema_decay, **ema_options)
        ema.to(self.device)
        self.accelerator.register_for_checkpointing(ema)
        self._ema = (ema, model)
        return ema

    def info(self, step: int, **fields: Any) -> dict[str, Any]:
        """The ``model_info`` an exported pipeline records: data, classes, how it was trained, and ``fields``."""
        return {**fields, "dataset": self.args.dataset, "image_size": self.args.image_size,
                "channels": self.dataset.channels, "num_classes": self.num_classes,
                "class_names": self.dataset.class_names if self.num_classes else [], "steps": step,
                "training_command": self.command, "seed": self.args.seed}

    def train(self, trainer: Trainer) -> Path:
        """Resume if asked, run ``trainer.step`` up to ``--steps`` with logs and checkpoints, export; returns the
        export directory (or, when SIGTERM/SIGINT stopped the run, the checkpoint it saved at that step)."""
        args = self.args
        invariants = {**{name: getattr(args, name) for name in COMMON_INVARIANTS}, **trainer.invariants}
        self.start_step = self._resume(invariants)
        self._write_config(trainer)
        metrics = MetricsLog(self.accelerator, args.output_dir, self.start_step)
        order = GlobalBatchOrder(len(self.train_set), self.global_batch, args.seed,
                                 start_batch=self.start_step * trainer.batches_per_step)
        self._batches = iter(DataLoader(self.train_set, batch_sampler=order, num_workers=args.num_workers))
        started = time.perf_counter()
        self._cpu_started = time.process_time()
        stop = StopRequest(self.accelerator)
        stopped = False

        def after_step(step: int, values: dict[str, float]) -> bool:
            nonlocal stopped
            stopped = self._after_step(step, values, trainer, invariants, metrics, stop)
            return stopped

        try:
            step = run_steps(self._step_with_ema(trainer.step), self.start_step, args.steps, "training",
                             self.accelerator.is_main_process, after_step)
        finally:
            stop.restore()
        if stopped:
            self.accelerator.end_training()
            self.accelerator.print(f"stopped at step {step}, checkpoint saved: continue with --resume latest")
            return args.output_dir / f"checkpoint-{step}"
        return self._export(trainer, step, started)

    def _step_with_ema(self, step_fn: Callable[[int], dict[str, float]]) -> Callable[[int], dict[str, float]]:
        def step(index: int) -> dict[str, float]:
            values = step_fn(index)
            if self._ema is not None:
                ema, model = self._ema
                ema.step(model.parameters())
            return values
        return step

    def _after_step(self, step: int, values: dict[str, float], trainer: Trainer, invariants: dict[str, Any],
                    metrics: MetricsLog, stop: StopRequest) -> bool:
        """Log (with the run's CPU seconds so far, over every invocation), checkpoint when due (or when stopping),
        export a snapshot and preview when due; returns whether to stop."""
        args = self.args
        cpu_seconds = metrics.cpu_seconds_before + time.process_time() - self._cpu_started
        metrics.log(step, {**values, "cpu_seconds": round(cpu_seconds, 2)})
        stopping = stop.requested()
        if step % args.checkpoint_every == 0 or step == args.steps or stopping:
            samples_seen = step * trainer.batches_per_step * self.global_batch
            save_checkpoint(self.accelerator, args.output_dir, step,
                            {**trainer.checkpoint_fields(step), "samples_seen": samples_seen,
                             "invariants": invariants}, keep=args.keep_checkpoints)
        if args.export_every and step % args.export_every == 0 and self.accelerator.is_main_process:
            trainer.export(args.output_dir / SNAPSHOT_DIR / f"step-{step}", step)
        if args.sample_every and step % args.sample_every == 0 and self.accelerator.is_main_process:
            grid = image_grid(trainer.preview(step), PREVIEW_COLUMNS, seed=PREVIEW_SEED, **trainer.preview_kwargs)
            (args.output_dir / "samples").mkdir(exist_ok=True)
            grid.save(args.output_dir / "samples" / f"step-{step}.png")
            metrics.log_image(step, "ema_samples", grid)
        return stopping

    def _resume(self, invariants: dict[str, Any]) -> int:
        """Restore the checkpoint ``--resume`` names, if any; returns the step to continue from."""
        args, accelerator = self.args, self.accelerator
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

    def _write_config(self, trainer: Trainer) -> None:
        """``train_config.json``: the options, the run's shape and versions; also the trackers' hyperparameters."""
        args, accelerator = self.args, self.accelerator
        config = {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  **trainer.config_fields, "train_images": len(self.train_set), "num_classes": self.num_classes,
                  "device": str(accelerator.device), "command": self.command, "resumed_from_step": self.start_step,
                  "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                               "accelerate": accelerate.__version__, "python": platform.python_version()}}
        if accelerator.is_main_process:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            (args.output_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        accelerator.init_trackers("train", config={k: v for k, v in config.items()
                                                   if isinstance(v, (int, float, str))})

    def _export(self, trainer: Trainer, step: int, started: float) -> Path:
        """``run_summary.json`` and the trainer's export (main process); returns the export directory."""
        args, accelerator = self.args, self.accelerator
        # data parallelism must leave every process with the same weights; record each one's digest to show it
        digests = None if trainer.consistent_weights is None else gather_object(
            [weights_digest(trainer.consistent_weights)])
        export_dir = args.export or args.output_dir / "model"
        if accelerator.is_main_process:
            summary = {"step": step, "resumed_from_step": self.start_step,
                       "wall_seconds_this_invocation": round(time.perf_counter() - started, 1),
                       **({} if digests is None else {"weights_sha256_per_process": digests}),
                       "export_dir": str(export_dir)}
            (args.output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
            trainer.export(export_dir, step)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        accelerator.print(f"exported the EMA model to {export_dir}")
        return export_dir
