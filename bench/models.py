"""Model benchmark on MNIST: the GAN and VAE baselines beside the diffusion model at several NFE, one table.

The diffusion model is ``--diffusion`` (default the app's default, ``checkpoints/mnist-flow``) with ``--sampler``
(default the app's choice for its process: DDIM on a VP model, else DPM-Solver++ 2M).

Every model draws ``--samples`` class-conditional digits (the same number of each digit; seed ``--seed``), and
the MNIST judge (``checkpoints/mnist-judge``) scores them:

* ``fid``: feature-FID against the 500 real held-out digits (``evaluation.metrics.compute_metrics``' ``feature_fid``);
* ``accuracy``: the judge's accuracy on the intended digits;
* ``coverage`` / ``entropy``: fraction of the 10 digits the judge sees at least once, and the entropy of its
  predicted-digit histogram in bits (``evaluation.metrics.class_coverage``; at most log2 10 = 3.32);
* ``precision`` / ``recall``: Kynkäänniemi et al. 2019 in the judge's feature space, k = 3, against the held-out
  digits (``evaluation.metrics.precision_recall``);
* ``s/image``: sampling wall time per image on this machine, this run (one thread unless OMP_NUM_THREADS says
  otherwise); ``NFE``: network evaluations per image (1 for GAN and VAE; CFG doubles the diffusion model's).

A first row scores real digits the same way (250 held-out digits against the other 250): the floor a perfect
generator would reach. FID grows as the sample count shrinks, so compare rows of one run, not across runs.

    python bench/models.py [--samples 200] [--diffusion checkpoints/mnist-flow] [--sampler dpmpp-2m]
                           [--steps 5 10 25] [--cfg-steps 10 --cfg-scale 3]

prints the table and writes bench/results/models.json and models.png (FID against seconds per image, and
precision against recall).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipelines  # noqa: E402
from bench.common import default_sampler, machine_info, write_results  # noqa: E402
from evaluation.judge import DEFAULT_JUDGE_PATH, heldout_digits, load_judge  # noqa: E402
from evaluation.metrics import compute_metrics  # noqa: E402
from evaluation.sampling import class_balanced_labels, sample_images  # noqa: E402
from schedulers.registry import traced_nfe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10
METRICS = ("feature_fid", "accuracy", "coverage", "precision_recall")


def load(path: Path):
    """The pipeline at ``path``, of the class its ``model_index.json`` names (one of ``pipelines``' exports)."""
    name = json.loads((path / "model_index.json").read_text())["_class_name"]
    if name not in pipelines.__all__:
        raise ValueError(f"{path}: pipeline class {name!r} is not one of {pipelines.__all__}")
    pipe = getattr(pipelines, name).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score(judge, images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> dict:
    """The row's scores of ``images`` against the ``real`` digits."""
    scores = compute_metrics(images, real, METRICS, labels=labels, judge=judge)
    return {"fid": scores["feature_fid"], "accuracy": scores["accuracy"],
            **{key: scores[key] for key in ("coverage", "entropy_bits", "max_entropy_bits", "precision", "recall")}}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/models.py", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="images per model, equal per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gan", type=Path, default=ROOT / "checkpoints/mnist-gan-qp")
    parser.add_argument("--vae", type=Path, default=ROOT / "checkpoints/mnist-vae")
    parser.add_argument("--diffusion", type=Path, default=ROOT / "checkpoints/mnist-flow")
    parser.add_argument("--sampler", default=None, help="a registered sampler for the diffusion model (default: "
                        "DDIM on a VP model, else dpmpp-2m)")
    parser.add_argument("--steps", type=int, nargs="*", default=[5, 10, 25], help="diffusion steps, guidance 1")
    parser.add_argument("--cfg-steps", type=int, nargs="*", default=[10], help="diffusion steps with guidance")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--judge", type=Path, default=ROOT / DEFAULT_JUDGE_PATH)
    parser.add_argument("--out", type=Path, default=RESULTS / "models.json")
    args = parser.parse_args(argv)
    if args.samples < 2 * NUM_CLASSES or args.samples % NUM_CLASSES:
        parser.error(f"--samples must be a multiple of {NUM_CLASSES}, at least {2 * NUM_CLASSES}")
    try:
        sampler = args.sampler or default_sampler(args.diffusion)
    except ValueError as error:
        parser.error(str(error))
    diffusers_logging.disable_progress_bar()

    judge = load_judge(args.judge)
    real, real_labels = heldout_digits()
    labels = class_balanced_labels(NUM_CLASSES, args.samples)

    # the yardstick: half of the held-out digits scored against the other half (25 of each digit per half)
    by_label = real_labels.argsort(stable=True)
    half_a, half_b = by_label[0::2], by_label[1::2]
    floor = score(judge, real[half_a], real_labels[half_a], real[half_b])
    rows = [{"model": "real held-out (250 vs 250)", "nfe": 0, "seconds_per_image": 0.0, **floor}]

    runs = [("GAN-QP", "gan", args.gan, None, None), ("VAE", "vae", args.vae, None, None)]
    runs += [(f"{args.diffusion.name} {sampler} {s}", "diffusion", args.diffusion, s, 1.0) for s in args.steps]
    runs += [(f"{args.diffusion.name} {sampler} {s}, CFG {args.cfg_scale:g}", "diffusion", args.diffusion, s,
              args.cfg_scale) for s in args.cfg_steps]
    for name, kind, path, steps, guidance in tqdm(runs, desc="models"):
        pipe = load(path)
        started = time.perf_counter()
        if kind == "diffusion":
            pipe.set_sampler(sampler)
            images = sample_images(pipe, class_labels=labels, seed=args.seed, num_inference_steps=steps,
                                   guidance_scale=guidance)
            nfe = traced_nfe(pipe.scheduler, steps) * (1 if guidance == 1.0 else 2)
        else:
            images = sample_images(pipe, class_labels=labels, seed=args.seed)
            nfe = 1
        seconds = (time.perf_counter() - started) / len(labels)
        rows.append({"model": name, "path": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
                     "nfe": nfe, "seconds_per_image": seconds, **score(judge, images, labels, real)})

    header = (f"{'model':28s} {'NFE':>4s} {'FID':>7s} {'acc':>6s} {'cover':>6s} {'entropy':>8s} {'prec':>6s} "
              f"{'recall':>6s} {'s/image':>8s}")
    print(f"\n{args.samples} samples per model ({args.samples // NUM_CLASSES} per digit), seed {args.seed}; "
          f"FID and precision/recall against the 500 held-out digits, judge features")
    print(header)
    for r in rows:
        print(f"{r['model']:28s} {r['nfe']:4d} {r['fid']:7.2f} {r['accuracy']:6.1%} {r['coverage']:6.0%} "
              f"{r['entropy_bits']:8.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['seconds_per_image']:8.4f}")
    result = {"benchmark": "models", **machine_info(), "samples": args.samples, "seed": args.seed, "rows": rows}
    write_results(args.out, result)
    plot(rows, args.out.with_suffix(".png"), args.samples)
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def markdown(results: dict) -> str:
    """The table of every model (the real-digit floor first) and the plot."""
    lines = [f"{results['samples']} samples per model ({results['samples'] // NUM_CLASSES} per digit), seed "
             f"{results['seed']}; feature-FID and precision/recall against the 500 held-out digits in judge features; "
             f"s/image on this machine with {results['threads']} torch thread(s). FID grows as the sample count "
             "shrinks: compare rows of one run.", "",
             "| model | NFE | feature-FID | accuracy | coverage | entropy (bits) | precision | recall | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['nfe']} | {r['fid']:.2f} | {r['accuracy']:.1%} | {r['coverage']:.0%} | "
                     f"{r['entropy_bits']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['seconds_per_image']:.4f} |")
    lines += ["", "![models: FID against time, precision against recall](../bench/results/models.png)"]
    return "\n".join(lines)


def plot(rows, path: Path, samples: int):
    """Left: feature-FID against seconds per image; right: precision against recall. The real floor dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor, models = rows[0], rows[1:]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in models:
        color = "tab:red" if r["model"].startswith("GAN") else "tab:green" if r["model"].startswith("VAE") \
            else "tab:blue"
        left.scatter(r["seconds_per_image"], r["fid"], color=color)
        left.annotate(f"{r['model']} (NFE {r['nfe']})", (r["seconds_per_image"], r["fid"]), fontsize=7,
                      xytext=(4, 3), textcoords="offset points")
        right.scatter(r["recall"], r["precision"], color=color)
        right.annotate(r["model"], (r["recall"], r["precision"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    left.axhline(floor["fid"], color="k", ls="--", lw=0.8, label="real vs real")
    left.set(xscale="log", yscale="log", xlabel="seconds per image (this machine)", ylabel="feature-FID (judge)",
             title=f"MNIST, {samples} samples per model")
    left.legend()
    right.scatter(floor["recall"], floor["precision"], color="k", marker="*", label="real vs real")
    right.set(xlim=(0, 1.05), ylim=(0, 1.05), xlabel="recall (k = 3)", ylabel="precision (k = 3)",
              title="precision / recall in judge-feature space")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
