"""Score a class-conditional MNIST diffusion model with the judge: ``python -m train.evaluate_model MODEL_DIR``.

Draws ``--samples`` images (the same number of every digit; ``evaluation.sampling.sample_images``) with the
model's exported scheduler, or the registered ``--sampler``, at ``--steps`` steps and each ``--guidance`` scale,
and reports (``evaluation.metrics.compute_metrics``)

* the judge's accuracy on the intended digits, per guidance scale;
* the share of raw output values outside [−1.1, 1.1] per guidance scale (the data lies in [−1, 1]; the final
  clamp, applied before scoring, would hide the overshoot);
* the feature-FID of each guidance scale's samples against the 500 real ``heldout`` digits (guidance trades
  diversity for fidelity, so above 1 it rises even for a perfect model), next to ``real_fid_floor`` (250 real
  held-out digits against the other 250) and the judge's accuracy on those real digits, the two numbers a perfect
  generator would get.

``--x0-clipping clip`` or ``threshold`` samples with x̂0 clipped to [−1, 1] or dynamically thresholded (Imagen's
percentile rule; ``schedulers.clipping``), on the registered ``--sampler`` or on the exported scheduler.

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
# --x0-clipping: the scheduler config keys of each rule (schedulers.clipping; diffusers' names)
X0_CLIPPING = {"none": {}, "clip": {"clip_sample": True, "clip_sample_range": 1.0}, "threshold": {"thresholding": True}}


def use_x0_clipping(pipeline, rule: str, sampler: str | None) -> None:
    """Put x̂0 clipping ``rule`` (a key of ``X0_CLIPPING``) on the registered ``sampler`` or, when it is None, on the
    pipeline's own scheduler; a ValueError naming the scheduler when it has no such config key."""
    if rule not in X0_CLIPPING:
        raise ValueError(f"unknown x̂0 clipping rule {rule!r}; choose one of {', '.join(X0_CLIPPING)}")
    settings = X0_CLIPPING[rule]
    if sampler is not None:
        pipeline.set_sampler(sampler, settings)
        return
    if not settings:
        return
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, **settings)
    unknown = [key for key, value in settings.items() if scheduler.config.get(key) != value]
    if unknown:
        raise ValueError(f"{type(scheduler).__name__} has no x̂0 clipping ({', '.join(unknown)}): pass a registered "
                         f"--sampler")
    pipeline.scheduler = scheduler


def evaluate(model_dir: Path, samples: int, steps: int, guidance_scales: list[float], seed: int,
             judge_path: Path, sampler: str | None = None, x0_clipping: str = "none") -> dict:
    pipeline = DiffusionImagePipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    use_x0_clipping(pipeline, x0_clipping, sampler)
    if pipeline.num_classes == 0:
        raise ValueError(f"{model_dir} is an unconditional model; the judge scores class-conditional samples")
    if samples < 2 * pipeline.num_classes or samples % pipeline.num_classes:
        raise ValueError(f"--samples must be a multiple of the {pipeline.num_classes} classes, at least 2 of each; "
                         f"got {samples}")
    judge = load_judge(judge_path)
    labels = class_balanced_labels(pipeline.num_classes, samples)
    heldout_images, heldout_labels = heldout_digits()

    results = {"model": str(model_dir), "samples": samples, "steps": steps, "seed": seed,
               "sampler": sampler or type(pipeline.scheduler).__name__, "x0_clipping": x0_clipping, "accuracy": {},
               "feature_fid": {}, "outside_range": {}, "sampling_seconds": {}}
    for guidance in guidance_scales:
        started = time.perf_counter()
        with tqdm(total=samples, desc=f"sampling at guidance {guidance}", leave=False) as bar:
            raw = sample_images(pipeline, class_labels=labels, seed=seed, num_inference_steps=steps,
                                guidance_scale=guidance, clamp=False,
                                progress=lambda done, total: bar.update(done - bar.n))
        results["sampling_seconds"][str(guidance)] = round(time.perf_counter() - started, 1)
        results["outside_range"][str(guidance)] = float((raw.abs() > RANGE_LIMIT).float().mean())
        images = raw.clamp(-1, 1)
        scores = compute_metrics(images, heldout_images, ["accuracy", "feature_fid"], labels=labels, judge=judge)
        results["accuracy"][str(guidance)] = scores["accuracy"]
        results["feature_fid"][str(guidance)] = scores["feature_fid"]
    results["feature_fid_guidance_1"] = results["feature_fid"].get("1.0")  # the headline: plain conditional samples
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
    parser.add_argument("--x0-clipping", choices=list(X0_CLIPPING), default="none",
                        help="clip x̂0 to [−1, 1] or threshold it dynamically while sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge", type=Path, default=Path(DEFAULT_JUDGE_PATH))
    parser.add_argument("--grid", type=Path, default=None, help="write a sample grid PNG here")
    parser.add_argument("--grid-columns", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components…" bars would bury the results

    try:
        results = evaluate(args.model_dir, args.samples, args.steps, args.guidance, args.seed, args.judge,
                           args.sampler, args.x0_clipping)
    except ValueError as error:
        parser.error(str(error))
    for guidance, accuracy in results["accuracy"].items():
        print(f"guidance {guidance}: judge accuracy {accuracy:.2%}, feature-FID vs held-out "
              f"{results['feature_fid'][guidance]:.3f}, raw values outside ±{RANGE_LIMIT}: "
              f"{results['outside_range'][guidance]:.2%} ({args.samples} samples, "
              f"{results['sampling_seconds'][guidance]:.0f} s)")
    print(f"real-vs-real feature-FID floor {results['real_fid_floor']:.3f}")
    print(f"judge accuracy on the real held-out digits: {results['judge_accuracy_on_real_heldout']:.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.grid:
        pipeline = DiffusionImagePipeline.from_pretrained(args.model_dir)
        pipeline.set_progress_bar_config(disable=True)
        use_x0_clipping(pipeline, args.x0_clipping, args.sampler)
        grid = image_grid(pipeline, args.grid_columns, seed=args.seed, guidance_scale=max(args.guidance),
                          num_inference_steps=args.steps)
        args.grid.parent.mkdir(parents=True, exist_ok=True)
        grid.save(args.grid)
        print(f"sample grid at guidance {max(args.guidance)}: {args.grid}")


if __name__ == "__main__":
    main()
