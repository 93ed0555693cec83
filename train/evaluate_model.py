"""Score a class-conditional MNIST diffusion model with the judge: ``python -m train.evaluate_model MODEL_DIR``.

Draws ``--samples`` images (the same number of every digit; ``evaluation.sampling.sample_images``) with the
model's exported scheduler, or the registered ``--sampler``, at ``--steps`` steps and each ``--guidance`` scale,
and reports (``evaluation.metrics.compute_metrics``)

* the judge's accuracy on the intended digits, per guidance scale;
* the share of raw output values outside [−1.1, 1.1] per guidance scale (the data lies in [−1, 1]; the final
  clamp, applied before scoring, would hide the overshoot);
* the feature-FID of the guidance-1 samples against the 500 real ``heldout``
  digits, next to ``real_fid_floor`` (250 real held-out digits against the other 250) and the judge's accuracy
  on those real digits, the two numbers a perfect generator would get.

A ``--grid`` PNG (``evaluation.sampling.image_grid``) shows one row per digit, ``--grid-columns`` samples each, at
the largest guidance scale.
``--json`` writes the numbers. The Fréchet distance is biased upwards by small sample counts, more for the
floor's 250 vs 250 than for the N vs 500 of the samples, so the floor is a yardstick, not an exact target.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from evaluation.judge import DEFAULT_JUDGE_PATH, heldout_digits, judge_accuracy, load_judge, real_fid_floor
from evaluation.metrics import compute_metrics
from evaluation.sampling import class_balanced_labels, image_grid, sample_images
from pipelines import DiffusionImagePipeline

RANGE_LIMIT = 1.1


def evaluate(model_dir: Path, samples: int, steps: int, guidance_scales: list[float], seed: int,
             judge_path: Path, sampler: str | None = None) -> dict:
    pipeline = DiffusionImagePipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    if sampler is not None:
        pipeline.set_sampler(sampler)
    if pipeline.num_classes == 0:
        raise ValueError(f"{model_dir} is an unconditional model; the judge scores class-conditional samples")
    if samples < 2 * pipeline.num_classes or samples % pipeline.num_classes:
        raise ValueError(f"--samples must be a multiple of the {pipeline.num_classes} classes, at least 2 of each; "
                         f"got {samples}")
    judge = load_judge(judge_path)
    labels = class_balanced_labels(pipeline.num_classes, samples)
    heldout_images, heldout_labels = heldout_digits()

    results = {"model": str(model_dir), "samples": samples, "steps": steps, "seed": seed,
               "sampler": sampler or type(pipeline.scheduler).__name__, "accuracy": {}, "outside_range": {},
               "sampling_seconds": {}}
    for guidance in guidance_scales:
        started = time.perf_counter()
        with tqdm(total=samples, desc=f"sampling at guidance {guidance}", leave=False) as bar:
            raw = sample_images(pipeline, class_labels=labels, seed=seed, num_inference_steps=steps,
                                guidance_scale=guidance, clamp=False,
                                progress=lambda done, total: bar.update(done - bar.n))
        results["sampling_seconds"][str(guidance)] = round(time.perf_counter() - started, 1)
        results["outside_range"][str(guidance)] = float((raw.abs() > RANGE_LIMIT).float().mean())
        images = raw.clamp(-1, 1)
        scores = compute_metrics(images, heldout_images, ["accuracy", "feature_fid"] if guidance == 1.0 else
                                 ["accuracy"], labels=labels, judge=judge)
        results["accuracy"][str(guidance)] = scores["accuracy"]
        if guidance == 1.0:
            results["feature_fid_guidance_1"] = scores["feature_fid"]
    results["real_fid_floor"] = real_fid_floor(judge)
    results["judge_accuracy_on_real_heldout"] = judge_accuracy(judge, heldout_images, heldout_labels)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate_model", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, help="an exported DiffusionImagePipeline directory")
    parser.add_argument("--samples", type=int, default=1000, help="images per guidance scale, equal per class")
    parser.add_argument("--steps", type=int, default=50, help="sampler steps")
    parser.add_argument("--sampler", default=None, help="a registered sampler (default: the exported scheduler)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0], help="guidance scales to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", type=Path, default=Path(DEFAULT_JUDGE_PATH))
    parser.add_argument("--grid", type=Path, default=None, help="write a sample grid PNG here")
    parser.add_argument("--grid-columns", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components…" bars would bury the results
    if 1.0 not in args.guidance:
        parser.error("--guidance must include 1 (the feature-FID is measured on plain conditional samples)")

    try:
        results = evaluate(args.model_dir, args.samples, args.steps, args.guidance, args.seed, args.judge,
                           args.sampler)
    except ValueError as error:
        parser.error(str(error))
    for guidance, accuracy in results["accuracy"].items():
        print(f"judge accuracy at guidance {guidance}: {accuracy:.2%}, raw values outside ±{RANGE_LIMIT}: "
              f"{results['outside_range'][guidance]:.2%} ({args.samples} samples, "
              f"{results['sampling_seconds'][guidance]:.0f} s)")
    print(f"feature-FID at guidance 1 vs held-out: {results['feature_fid_guidance_1']:.3f} "
          f"(real-vs-real floor {results['real_fid_floor']:.3f})")
    print(f"judge accuracy on the real held-out digits: {results['judge_accuracy_on_real_heldout']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        pipeline = DiffusionImagePipeline.from_pretrained(args.model_dir)
        pipeline.set_progress_bar_config(disable=True)
        if args.sampler is not None:
            pipeline.set_sampler(args.sampler)
        grid = image_grid(pipeline, args.grid_columns, seed=args.seed, guidance_scale=max(args.guidance),
                          num_inference_steps=args.steps)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        print(f"sample grid at guidance {max(args.guidance)}: {args.grid}")


if __name__ == "__main__":
    main()
