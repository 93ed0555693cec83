"""Guidance trade-off on the shipped MNIST model: judge accuracy against feature-FID as the scale grows.

For classifier-free guidance (the model's own null class) and classifier guidance (the noise-conditional
classifier, ``checkpoints/mnist-noisy-classifier``, on the model's unconditional output), every scale draws the
same per-digit labels from the same seeds with the model's DDIM scheduler, and is scored by the judge:

* ``accuracy``: the judge's accuracy on the intended digits (the condition is obeyed);
* ``feature_fid``: the Fréchet distance of judge features to the 500 held-out digits (quality and diversity),
  next to the real-vs-real floor.

    python bench/guidance.py [--samples 1000] [--steps 25] [--scales 0 1 2 3 4 6 8] [--modes classifier-free]

prints the table, writes bench/results/guidance.json (with the machine it ran on) and guidance.png (accuracy
against feature-FID, one curve per mode, scales marked). The modes are independent, so they can run as separate
processes (``--modes classifier --name guidance-classifier``) and be joined afterwards:

    python bench/guidance.py --merge bench/results/guidance-cfg.json bench/results/guidance-classifier.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine_info, write_results  # noqa: E402
from evaluation.judge import heldout_digits, load_judge, real_fid_floor  # noqa: E402
from evaluation.metrics import compute_metrics  # noqa: E402
from evaluation.sampling import class_balanced_labels, sample_images  # noqa: E402
from models.classifier import NoisyClassifier  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("classifier-free", "classifier")


def run(model_dir: Path, classifier_dir: Path, samples: int, steps: int, scales: list[float], seed: int,
        modes: list[str]) -> dict:
    classifier = NoisyClassifier.from_pretrained(classifier_dir).eval()
    pipeline = DiffusionImagePipeline.from_pretrained(model_dir, classifier=classifier)
    pipeline.set_progress_bar_config(disable=True)
    judge = load_judge()
    heldout, _ = heldout_digits()
    labels = class_balanced_labels(pipeline.num_classes, samples)
    rows = []
    for mode in modes:
        for scale in scales:
            started = time.perf_counter()
            images = sample_images(pipeline, class_labels=labels, seed=seed, num_inference_steps=steps,
                                   guidance_scale=scale, guidance_mode=mode)
            scores = compute_metrics(images, heldout, ["accuracy", "feature_fid"], labels=labels, judge=judge)
            rows.append({"mode": mode, "scale": scale, "accuracy": scores["accuracy"],
                         "feature_fid": scores["feature_fid"], "seconds": round(time.perf_counter() - started, 1)})
            print(f"{mode:>16} {scale:5.1f}  accuracy {rows[-1]['accuracy']:.1%}  "
                  f"feature-FID {rows[-1]['feature_fid']:.2f}  ({rows[-1]['seconds']:.0f} s)", flush=True)
    return {"model": str(model_dir), "classifier": str(classifier_dir), "samples": samples, "steps": steps,
            "seed": seed, "sampler": type(pipeline.scheduler).__name__, "real_fid_floor": real_fid_floor(judge),
            **machine_info(),
            "rows": rows}


def merge(paths: list[Path]) -> dict:
    """One results dict from runs of different modes with the same model, samples, steps and seed."""
    parts = [json.loads(path.read_text()) for path in paths]
    settings = ("model", "classifier", "samples", "steps", "seed", "sampler")
    for path, part in zip(paths[1:], parts[1:]):
        differing = [key for key in settings if part[key] != parts[0][key]]
        if differing:
            raise SystemExit(f"cannot merge {path} with {paths[0]}: they differ in {', '.join(differing)}")
    return {**parts[0], "rows": [row for part in parts for row in part["rows"]]}


def markdown(results: dict) -> str:
    """The table of every mode and scale, the real-vs-real floor, and the plot."""
    lines = [f"{results['samples']} samples per point (equal per digit), {results['sampler']} with "
             f"{results['steps']} steps, seed {results['seed']}; feature-FID against the 500 held-out digits.", "",
             "| mode | scale | judge accuracy | feature-FID |", "|---|---|---|---|"]
    lines += [f"| {row['mode']} | {row['scale']:g} | {row['accuracy']:.1%} | {row['feature_fid']:.2f} |"
              for row in results["rows"]]
    lines += [f"| real held-out halves (floor) | — | — | {results['real_fid_floor']:.2f} |", "",
              "![judge accuracy against feature-FID per guidance scale](../bench/results/guidance.png)"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for mode in MODES:
        rows = [row for row in results["rows"] if row["mode"] == mode]
        if not rows:
            continue
        axis.plot([row["feature_fid"] for row in rows], [100 * row["accuracy"] for row in rows], "o-", label=mode)
        for row in rows:
            axis.annotate(f"{row['scale']:g}", (row["feature_fid"], 100 * row["accuracy"]), fontsize=8,
                          xytext=(3, 3), textcoords="offset points")
    axis.axvline(results["real_fid_floor"], color="grey", linestyle=":", label="real-vs-real floor")
    axis.set_xlabel("feature-FID vs held-out digits (lower is better)")
    axis.set_ylabel("judge accuracy on the intended digit (%)")
    axis.set_title(f"guidance scale sweep: {results['samples']} samples per point, DDIM {results['steps']} steps")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("checkpoints/mnist-vp"))
    parser.add_argument("--classifier", type=Path, default=Path("checkpoints/mnist-noisy-classifier"))
    parser.add_argument("--samples", type=int, default=1000, help="samples per point, equal per digit")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scales", type=float, nargs="+", default=[0, 1, 2, 3, 4, 6, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--name", default="guidance", help="results file stem under bench/results/")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="join earlier runs' results files (one per mode) instead of sampling")
    args = parser.parse_args(argv)
    if args.samples < 20 or args.samples % 10:
        parser.error("--samples must be a multiple of 10 (equal per digit), at least 20")
    if args.merge:
        results = merge(args.merge)
    else:
        diffusers_logging.disable_progress_bar()
        results = run(args.model, args.classifier, args.samples, args.steps, args.scales, args.seed, args.modes)
    print("\n" + markdown(results))
    RESULTS.mkdir(exist_ok=True)
    write_results(RESULTS / f"{args.name}.json", results)
    plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {RESULTS / (args.name + '.json')} and {args.name}.png")


if __name__ == "__main__":
    main()
