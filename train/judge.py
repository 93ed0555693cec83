"""Train the MNIST judge: ``python -m train.judge --out checkpoints/mnist-judge [--epochs N --seed S]``.

Trains ``models.judge.MNISTJudge`` on the ``mnist`` train split (4,500 digits at 32×32), each batch shifted at
random by up to 2 pixels so the judge does not rely on digits being centred the way MNIST centres them, and
noised with per-image Gaussian pixel noise of σ ∈ [0, 0.5] so that a generated digit on a grainy background is
still judged by its shape (without it, the judge called every such sample an 8), then
reports its accuracy on the 500 held-out digits and writes the model (``save_pretrained``, safetensors) plus a
README.md recording the command, the held-out accuracy, the training time and the hardware.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from data import load_dataset
from evaluation.judge import DEFAULT_JUDGE_PATH, judge_accuracy
from models.judge import JUDGE_IMAGE_SIZE, MNISTJudge
from train.run import launch_command, make_accelerator, run_steps

MAX_SHIFT = 2
MAX_NOISE = 0.5


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels along each axis, filling with background (-1)."""
    size = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([image[:, top : top + size, left : left + size] for image, (top, left) in zip(padded, offsets)])


def random_noise(images: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, σ²) pixel noise with σ ~ U(0, max_sigma) per image, clamped back to [-1, 1]."""
    sigma = max_sigma * torch.rand(len(images), 1, 1, 1, generator=generator)
    return (images + sigma * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def epoch_batches(size: int, batch_size: int, epochs: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """The index batches of ``epochs`` passes over ``size`` items, each pass a fresh permutation from ``generator``
    (drawn when the pass begins, so the augmentations drawn in between come from the same stream, in order)."""
    for _ in range(epochs):
        yield from torch.randperm(size, generator=generator).split(batch_size)


def train_judge(epochs: int, seed: int, batch_size: int, learning_rate: float) -> MNISTJudge:
    """A judge trained from scratch on the ``mnist`` train split with AdamW and a one-cycle schedule, on the CPU
    (``train.run``'s accelerator and step loop); eval mode."""
    accelerator = make_accelerator(cpu=True, mixed_precision="no")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_dataset("mnist", image_size=JUDGE_IMAGE_SIZE, split="train").tensors()
    judge = MNISTJudge().train()
    total_steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=learning_rate, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=total_steps)
    judge, optimizer, schedule = accelerator.prepare(judge, optimizer, schedule)
    batches = epoch_batches(len(images), batch_size, epochs, generator)

    def step(index: int) -> dict[str, float]:
        batch = next(batches)
        logits = judge(random_noise(random_shift(images[batch], MAX_SHIFT, generator), MAX_NOISE, generator))
        loss = F.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()
        schedule.step()
        return {"loss": loss.item()}

    run_steps(step, 0, total_steps, "training the MNIST judge")
    return accelerator.unwrap_model(judge).eval()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m train.judge", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_JUDGE_PATH), help="folder to save the judge in")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak of the one-cycle schedule")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.learning_rate <= 0:
        parser.error("--epochs and --batch-size must be positive integers, --learning-rate a positive number")

    started = time.perf_counter()
    judge = train_judge(args.epochs, args.seed, args.batch_size, args.learning_rate)
    training_seconds = time.perf_counter() - started
    heldout_images, heldout_labels = load_dataset("mnist", image_size=JUDGE_IMAGE_SIZE, split="heldout").tensors()
    accuracy = judge_accuracy(judge, heldout_images, heldout_labels)
    print(f"held-out accuracy: {accuracy:.2%} ({len(heldout_labels)} digits); trained in {training_seconds:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    judge.save_pretrained(args.out, safe_serialization=True)
    command = launch_command(argv, 1, "train.judge")  # with the thread count, which changes the weights
    card = _model_card(judge, args.out, command, accuracy, len(heldout_labels), training_seconds)
    (args.out / "README.md").write_text(card)
    print(f"saved to {args.out}")


def _model_card(
    judge: MNISTJudge, out: Path, command: str, accuracy: float, heldout_size: int, training_seconds: float
) -> str:
    parameter_count = sum(parameter.numel() for parameter in judge.parameters())
    return f"""# MNIST judge

A {parameter_count:,}-parameter CNN digit classifier (`models.judge.MNISTJudge`) whose 128-d penultimate
features drive `evaluation.judge.feature_fid`. Load it with `evaluation.judge.load_judge("{out}")`.

- command: `{command}`
- data: `data.load_dataset("mnist")`, 4,500 train digits at 32×32, random shifts of up to {MAX_SHIFT} pixels
  and Gaussian pixel noise of σ ∈ [0, {MAX_NOISE}]
- held-out accuracy: **{accuracy:.2%}** on the {heldout_size} `heldout` digits
- training time: {training_seconds:.0f} s
- hardware: {hardware_description()}
- trained: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC
"""


def hardware_description() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model_lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = model_lines[0].split(":", 1)[1].strip() if model_lines else cpu
    return (
        f"CPU only: {cpu}, {os.cpu_count()} cores, torch threads: {torch.get_num_threads()}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
