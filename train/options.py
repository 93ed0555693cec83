"""The command-line options every trainer shares (data, optimisation, run directory) and their range checks.

``train.diffusion``, ``train.gan`` and ``train.vae`` add their own options to the groups ``add_common_arguments``
returns, and call ``check_common_args`` before their own checks, so the same option reads and fails the same way
in every trainer (and in the app's Train tab, which parses with the trainer's parser).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

MIXED_PRECISIONS = ("no", "fp16", "bf16")


class OptionGroups(NamedTuple):
    data: argparse._ArgumentGroup
    optim: argparse._ArgumentGroup
    run: argparse._ArgumentGroup


def add_common_arguments(parser: argparse.ArgumentParser, lr: float, ema_decay: float) -> OptionGroups:
    """Add the shared options with this trainer's default learning rate and EMA decay; returns the groups."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="mnist", help="mnist, folder:PATH or hf:NAME (see data/)")
    data.add_argument("--image-size", type=int, default=32)
    data.add_argument("--max-train-images", type=int, default=None,
                      help="train on a fixed random subset of this many images (for tests and quick runs)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    conditioning = data.add_mutually_exclusive_group()
    conditioning.add_argument("--conditional", dest="conditional", action="store_true", default=None,
                              help="class-conditional (default when the dataset has labels)")
    conditioning.add_argument("--unconditional", dest="conditional", action="store_false")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, required=True, help="optimizer steps to train for (in total)")
    optim.add_argument("--batch-size", type=int, default=64, help="per process; effective = × processes")
    optim.add_argument("--lr", type=float, default=lr)
    optim.add_argument("--ema-decay", type=float, default=ema_decay)
    optim.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=None,
                       help="default: bf16 on a CUDA device that supports it, else no")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--cpu", action="store_true",
                       help="train on the CPU even when CUDA is available (implied without CUDA; multi-process "
                            "CPU runs then use gloo)")
    run = parser.add_argument_group("run directory")
    run.add_argument("--output-dir", type=Path, required=True)
    run.add_argument("--checkpoint-every", type=int, default=500)
    run.add_argument("--keep-checkpoints", type=int, default=3)
    run.add_argument("--resume", default=None, help="'latest' or a checkpoint directory of this run")
    run.add_argument("--sample-every", type=int, default=1000, help="EMA sample grid every N steps; 0 disables")
    run.add_argument("--export-every", type=int, default=0,
                     help="also export the EMA pipeline to OUTPUT_DIR/exports/step-STEP every N steps; 0 disables")
    run.add_argument("--export", type=Path, default=None, help="pipeline directory (default OUTPUT_DIR/model)")
    return OptionGroups(data, optim, run)


def check_at_least_one(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def check_non_negative(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")


def check_common_args(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first shared option out of range."""
    check_at_least_one(args, "steps", "batch_size", "checkpoint_every", "keep_checkpoints", "image_size")
    check_non_negative(args, "sample_every", "num_workers", "export_every")
    if not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.max_train_images is not None and args.max_train_images < 1:
        raise ValueError(f"--max-train-images must be at least 1, got {args.max_train_images}")


def run_main(build_parser: Callable[[], argparse.ArgumentParser], check_args: Callable[[argparse.Namespace], None],
             train: Callable[[argparse.Namespace, list[str]], Path], argv: list[str] | None) -> None:
    """Parse, validate (a bad option becomes the parser's usage error), train."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))
    train(args, argv)
