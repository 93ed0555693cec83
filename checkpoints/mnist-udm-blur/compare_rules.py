"""UDM sampling rules side by side on this model: ``PYTHONPATH=. python checkpoints/mnist-udm-blur/compare_rules.py``.

For each rule (``udm-naive``, ``udm-improved``, ``udm-invertible``; ``schedulers/udm.py``) it draws ``--samples``
images (equal per digit, the same seeds for every rule) with ``--steps`` steps at guidance ``--guidance`` and
reports the judge's accuracy and the feature-FID against the 500 held-out digits, as ``train.evaluate_model``
does for the shipped rule; ``--grid`` writes one PNG with the three rules' grids side by side (one row per digit).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging as diffusers_logging

import schedulers
from evaluation.judge import DEFAULT_JUDGE_PATH, feature_fid, judge_accuracy, load_judge
from evaluation.sampling import image_grid
from pipelines import DiffusionImagePipeline
from train.data import load_dataset
from train.evaluate_model import generate

RULES = ("udm-naive", "udm-improved", "udm-invertible")
GAP = 6  # pixels of white between the rules' grids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", default=Path(__file__).resolve().parent)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-columns", type=int, default=6)
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    diffusers_logging.disable_progress_bar()

    pipe = DiffusionImagePipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    if pipe.num_classes == 0 or args.samples % pipe.num_classes:
        raise ValueError(f"needs a class-conditional model and --samples a multiple of its {pipe.num_classes} classes")
    judge = load_judge(DEFAULT_JUDGE_PATH)
    heldout, _ = load_dataset("mnist", image_size=32, split="heldout").tensors()
    labels = torch.arange(pipe.num_classes).repeat_interleave(args.samples // pipe.num_classes)
    model_config = pipe.scheduler.config
    results, grids = {}, []
    for rule in RULES:
        pipe.scheduler = schedulers.get_sampler(rule).create(model_config)
        images = generate(pipe, labels, args.guidance, args.steps, args.seed)
        results[rule] = {"accuracy": judge_accuracy(judge, images, labels),
                         "feature_fid": feature_fid(judge, images, heldout)}
        print(f"{rule}: judge accuracy {results[rule]['accuracy']:.2%}, feature-FID {results[rule]['feature_fid']:.2f}"
              f" ({args.samples} samples, {args.steps} steps, guidance {args.guidance})")
        grid = image_grid(pipe, args.grid_columns, seed=args.seed, num_inference_steps=args.steps,
                          guidance_scale=args.guidance if pipe.num_classes else 1.0)
        grids.append(np.asarray(grid))
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "steps": args.steps, "guidance": args.guidance,
                                         "seed": args.seed, "rules": results}, indent=2) + "\n")
    if args.grid:
        gap = np.full((grids[0].shape[0], GAP, *grids[0].shape[2:]), 255, dtype=np.uint8)
        row = [part for grid in grids for part in (grid, gap)][:-1]
        PIL.Image.fromarray(np.concatenate(row, axis=1)).save(args.grid)
        print(f"grids ({', '.join(RULES)}, left to right): {args.grid}")


if __name__ == "__main__":
    main()
