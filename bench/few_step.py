"""Few-step generation on MNIST: for a budget of network evaluations, which model and sampler gives the best images.

Rows, every one scored as ``bench/models.py`` scores its models (feature-FID and precision/recall against the
500 held-out digits in the judge's features, the judge's accuracy on the intended digits, seconds per image on
this machine), at NFE = network evaluations per image (classifier-free guidance doubles it):

* each few-step model (``--few-step``: consistency and MeanFlow models, default the shipped ``checkpoints/mnist-cd``
  and ``checkpoints/mnist-meanflow``) with its own sampler (``consistency`` or ``mean-flow``) at ``--steps``
  (1, 2, 4) and each ``--guidance`` scale (0.75 too: a MeanFlow model with guidance ω = 2 trained in is the plain
  conditional model again at w = 0.5, so its best few-step scale lies below 1);
* its teacher (``--teacher``, default ``checkpoints/mnist-flow``) with the best tuned multi-step sampler at
  ``--teacher-nfe`` (4, 5, 10, 20): the ``dpmpp-2m`` tuned for that NFE and those weights in ``MODEL_DIR/tuned/``
  (``python -m schedulers.tune``), else the stock ``dpmpp-2m`` (the row says which), unguided;
* the GAN-QP baseline (``--gan``), one evaluation of its generator.

Every model draws the same class-balanced labels from the same seed. FID grows as the sample count shrinks,
so compare rows of one run, not across runs: the "× teacher" column divides each row's feature-FID by the
teacher's at its largest NFE in the same run (the distilled model's goal is 2× at 2 NFE).

    python bench/few_step.py [--samples 1000] [--few-step checkpoints/mnist-cd checkpoints/mnist-meanflow]
                             [--steps 1 2 4] [--guidance 0.75 1 3] [--teacher-nfe 4 5 10 20]

prints the table and writes bench/results/few_step.json and few_step.png (feature-FID and accuracy against
NFE, one line per model and sampler).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import default_sampler, machine_info, write_results  # noqa: E402
from bench.models import NUM_CLASSES, load, score  # noqa: E402
from evaluation.judge import DEFAULT_JUDGE_PATH, heldout_digits, load_judge  # noqa: E402
from evaluation.sampling import class_balanced_labels, sample_images  # noqa: E402
from schedulers.registry import traced_nfe  # noqa: E402
from schedulers.tuning import load_tuned, tuned_name, tuned_schedulers  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TEACHER_SAMPLER = "dpmpp-2m"


def shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def runs(args) -> list[dict]:
    """What to sample: one dict per row (``family`` groups the rows of one line of the plot)."""
    planned = []
    for path in args.few_step:
        sampler = default_sampler(path)  # the model's own: consistency or mean-flow
        for guidance in args.guidance:
            for steps in args.steps:
                planned.append({"family": f"{path.name} {sampler}, guidance {guidance:g}", "path": path,
                                "sampler": sampler, "steps": steps, "guidance": guidance})
    shipped = tuned_schedulers(args.teacher)
    for nfe in args.teacher_nfe:
        tuned = tuned_name(TEACHER_SAMPLER, nfe)
        planned.append({"family": f"{args.teacher.name} {TEACHER_SAMPLER}", "path": args.teacher,
                        "sampler": f"tuned:{tuned}" if tuned in shipped else TEACHER_SAMPLER, "steps": nfe,
                        "guidance": 1.0})
    planned.append({"family": "GAN-QP", "path": args.gan, "sampler": None, "steps": None, "guidance": None})
    return planned


def sample_row(run: dict, labels, seed: int, judge, real) -> dict:
    """Sample one row's images and score them."""
    pipe = load(run["path"])
    started = time.perf_counter()
    if run["sampler"] is None:  # a one-shot generator
        images, nfe = sample_images(pipe, class_labels=labels, seed=seed), 1
    else:
        if run["sampler"].startswith("tuned:"):
            pipe.scheduler, _ = load_tuned(run["path"], run["sampler"].removeprefix("tuned:"))
        else:
            pipe.set_sampler(run["sampler"])
        images = sample_images(pipe, class_labels=labels, seed=seed, num_inference_steps=run["steps"],
                               guidance_scale=run["guidance"])
        nfe = traced_nfe(pipe.scheduler, run["steps"]) * (1 if run["guidance"] == 1.0 else 2)
    seconds = (time.perf_counter() - started) / len(labels)
    return {**{key: run[key] for key in ("family", "sampler", "steps", "guidance")}, "path": shown(run["path"]),
            "nfe": nfe, "seconds_per_image": seconds, **score(judge, images, labels, real)}


def best_per_budget(rows: list[dict]) -> list[dict]:
    """For each NFE that some row spends, the row with the lowest feature-FID among those spending at most it."""
    best = []
    for budget in sorted({row["nfe"] for row in rows}):
        within = [row for row in rows if row["nfe"] <= budget]
        winner = min(within, key=lambda row: row["fid"])
        best.append({"nfe": budget, "family": winner["family"], "sampler": winner["sampler"],
                     "steps": winner["steps"], "fid": winner["fid"], "accuracy": winner["accuracy"]})
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python bench/few_step.py", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000, help="images per row, equal per digit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--few-step", type=Path, nargs="*",
                        default=[ROOT / "checkpoints/mnist-cd", ROOT / "checkpoints/mnist-meanflow"],
                        help="consistency or MeanFlow models, each sampled with its own sampler")
    parser.add_argument("--steps", type=int, nargs="*", default=[1, 2, 4], help="the few-step models' steps")
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.75, 1.0, 3.0],
                        help="the few-step models' classifier-free guidance scales (1: off, NFE = steps)")
    parser.add_argument("--teacher", type=Path, default=ROOT / "checkpoints/mnist-flow")
    parser.add_argument("--teacher-nfe", type=int, nargs="*", default=[4, 5, 10, 20])
    parser.add_argument("--gan", type=Path, default=ROOT / "checkpoints/mnist-gan-qp")
    parser.add_argument("--judge", type=Path, default=ROOT / DEFAULT_JUDGE_PATH)
    parser.add_argument("--out", type=Path, default=RESULTS / "few_step.json")
    args = parser.parse_args(argv)
    if args.samples < 2 * NUM_CLASSES or args.samples % NUM_CLASSES:
        parser.error(f"--samples must be a multiple of {NUM_CLASSES}, at least {2 * NUM_CLASSES}")
    for name in ("steps", "teacher_nfe"):
        for value in getattr(args, name):
            if value < 1:
                parser.error(f"--{name.replace('_', '-')} values must be at least 1, got {value}")
    for path in (*args.few_step, args.teacher, args.gan):
        if not (path / "model_index.json").is_file():
            parser.error(f"{path} is not an exported pipeline directory (it has no model_index.json)")
    diffusers_logging.disable_progress_bar()

    judge = load_judge(args.judge)
    real, _ = heldout_digits()
    labels = class_balanced_labels(NUM_CLASSES, args.samples)
    rows = []
    results = {"benchmark": "few_step", **machine_info(), "samples": args.samples, "seed": args.seed,
               "teacher": shown(args.teacher), "rows": rows}
    for run in tqdm(runs(args), desc="rows"):
        rows.append(sample_row(run, labels, args.seed, judge, real))
        write_results(args.out, results)  # a run cut off keeps the rows it finished
    results["best_per_budget"] = best_per_budget(rows)
    write_results(args.out, results)
    print(table(results))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def teacher_reference(results: dict) -> dict | None:
    """The teacher's row at its largest NFE: the image quality the few-step models are distilled towards."""
    teacher = [row for row in results["rows"] if row["path"] == results.get("teacher")]
    return max(teacher, key=lambda row: row["nfe"]) if teacher else None


def table(results: dict) -> str:
    reference = teacher_reference(results)
    heading = f"× teacher at NFE {reference['nfe']}" if reference else "× teacher"
    lines = [f"| model and sampler | steps | NFE | feature-FID | {heading} | accuracy | precision | recall | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        sampler = "" if r["sampler"] is None or r["sampler"] in r["family"] else f" ({r['sampler']})"
        ratio = f"{r['fid'] / reference['fid']:.2f}" if reference else "—"
        lines.append(f"| {r['family']}{sampler} | {r['steps'] or '—'} | {r['nfe']} | {r['fid']:.2f} | {ratio} | "
                     f"{r['accuracy']:.1%} | {r['precision']:.3f} | {r['recall']:.3f} | {r['seconds_per_image']:.4f} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    """The table of every row, the best row within each NFE budget, and the plot."""
    lines = [f"{results['samples']} samples per row ({results['samples'] // NUM_CLASSES} per digit), seed "
             f"{results['seed']}; feature-FID and precision/recall against the 500 held-out digits in judge features; "
             f"s/image on this machine with {results['threads']} torch thread(s). NFE counts every network call "
             "(guidance doubles it).", "", table(results), "",
             "**Best within a budget** (the lowest feature-FID among the rows spending at most that NFE):", "",
             "| NFE budget | model and sampler | steps | feature-FID | accuracy |", "|---|---|---|---|---|"]
    for b in results.get("best_per_budget", []):
        lines.append(f"| {b['nfe']} | {b['family']} | {b['steps'] or '—'} | {b['fid']:.2f} | {b['accuracy']:.1%} |")
    lines += ["", "![few-step: FID and accuracy against NFE](../bench/results/few_step.png)"]
    return "\n".join(lines)


def plot(results: dict, path: Path):
    """Feature-FID (left, log) and judge accuracy (right) against NFE, one line per model and sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    families = dict.fromkeys(row["family"] for row in results["rows"])
    for family in families:
        rows = sorted((row for row in results["rows"] if row["family"] == family), key=lambda row: row["nfe"])
        style = {"marker": "*", "markersize": 12, "ls": ""} if len(rows) == 1 else {"marker": "o"}
        left.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], label=family, **style)
        right.plot([r["nfe"] for r in rows], [r["accuracy"] for r in rows], label=family, **style)
    left.set(xscale="log", yscale="log", xlabel="network evaluations per image", ylabel="feature-FID (judge)",
             title=f"MNIST, {results['samples']} samples per row")
    right.set(xscale="log", xlabel="network evaluations per image", ylabel="judge accuracy", ylim=(0, 1.02))
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
