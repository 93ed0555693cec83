"""Training recipes at equal CPU time: which recipe (``train.recipes``) gives the best MNIST model per CPU-minute.

Every recipe trains the same class-conditional UNet (``--model``, default ``mnist28`` at MNIST's native 28×28) on
the same data, batch and seed through ``train.diffusion --recipe NAME``, for the same number of steps: the
budget ``--cpu-minutes`` divided by the step's CPU cost, measured first on a few steps of the ``eps`` recipe (the
recipes share the network, so a step costs the same in each; the table reports each run's own CPU time). The
runs go ``--parallel`` at a time, one torch thread each, so they share the machine alike. Each run exports its
EMA weights ``--points`` times along the way (``--export-every``), and every snapshot is scored on ``--samples``
class-balanced digits at guidance 1 with the project's judge (``checkpoints/mnist-judge``):

* feature-FID against the 500 held-out digits, sampled with DPM-Solver++ 2M at 20 steps at every snapshot and,
  at the last one (it costs 5× as much), with DDPM at 100 steps for the VP recipes (the other processes have no
  DDPM; their cell is empty);
* judge accuracy (of the DPM-Solver++ samples);
* the share of raw output values outside [−1.1, 1.1] (the data lies in [−1, 1]; the pipeline's final clamp would
  hide the overshoot).

``--samples`` below 1,000 makes the FID biased upwards (compare recipes with each other, not with the floor).

    python bench/training_recipes.py [--cpu-minutes 8] [--points 2] [--samples 200] [--recipes eps v-pred …]

prints the table, writes bench/results/training_recipes.json and training_recipes.png (feature-FID against
CPU-minutes). The run directories (``--runs-dir``, default runs/training-recipes) are kept: a second call with the
same settings reuses the finished runs and resumes the unfinished ones from their last snapshot (``--resume
latest``), so a study may span several sessions; the CPU-minutes count every invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import check_positive, display_path, machine_info, write_results  # noqa: E402
from train.recipes import RECIPES, check_recipe  # noqa: E402
from train.run import SNAPSHOT_DIR  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "training_recipes.json"
RANGE_LIMIT = 1.1
SAMPLERS = {"dpmpp-2m": 20, "ddpm": 100}  # sampler → steps, both at guidance 1
CALIBRATION_STEPS = 4


def training_command(recipe: str, args: argparse.Namespace, steps: int, output_dir: Path, export_every: int):
    return [sys.executable, "-m", "train.diffusion", "--recipe", recipe, "--dataset", "mnist",
            "--image-size", str(args.image_size), "--model", args.model, "--conditional",
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--steps", str(steps),
            "--export-every", str(export_every), "--checkpoint-every", str(export_every), "--keep-checkpoints", "1",
            "--sample-every", "0", "--output-dir", str(output_dir), "--resume", "latest"]


def one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cpu_seconds_by_step(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["cpu_seconds"] for row in map(json.loads, lines)}


def calibrate_step_seconds(args: argparse.Namespace) -> float:
    """CPU seconds of one training step: the median gap between the logged steps of a short ``eps`` run."""
    with tempfile.TemporaryDirectory() as scratch:
        command = training_command("eps", args, CALIBRATION_STEPS, Path(scratch) / "run", CALIBRATION_STEPS)
        subprocess.run(command, check=True, env=one_thread_env(), capture_output=True)
        seconds = cpu_seconds_by_step(Path(scratch) / "run")
    gaps = sorted(seconds[k] - seconds[k - 1] for k in range(2, CALIBRATION_STEPS + 1))
    return gaps[len(gaps) // 2]


def train_recipes(args: argparse.Namespace, steps: int, export_every: int, finished: Callable[[str], None]) -> None:
    """Train every recipe whose run has not finished, ``--parallel`` at a time, calling ``finished(recipe)`` for each
    run once it is done (at once for those an earlier call finished); a failed run raises naming it."""
    pending = []
    for recipe in args.recipes:
        if (args.runs_dir / recipe / SNAPSHOT_DIR / f"step-{steps}").is_dir():
            finished(recipe)
        else:
            pending.append(recipe)
    running: list[tuple[str, subprocess.Popen]] = []
    while pending or running:
        while pending and len(running) < args.parallel:
            recipe = pending.pop(0)
            run_dir = args.runs_dir / recipe  # an unfinished run of an earlier call resumes (--resume latest)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            print(f"training {recipe}: {steps} steps", flush=True)
            with open(args.runs_dir / f"{recipe}.log", "a") as log:  # the child keeps its own handle
                running.append((recipe, subprocess.Popen(training_command(recipe, args, steps, run_dir, export_every),
                                                         env=one_thread_env(), stdout=log, stderr=subprocess.STDOUT)))
        recipe, process = running.pop(0)  # the runs are of equal length: the oldest finishes first
        if process.wait() != 0:
            raise RuntimeError(f"recipe {recipe!r} failed (exit {process.returncode}); see "
                               f"{args.runs_dir / (recipe + '.log')}")
        finished(recipe)


def score_snapshot(snapshot: Path, samples: int, seed: int, with_ddpm: bool) -> dict:
    """The judge's scores of one exported snapshot (runs in a worker process, one torch thread), kept in
    ``SNAPSHOT/study_scores.json`` and read back from there by a later call with the same settings."""
    cache = snapshot / "study_scores.json"
    settings = {"samples": samples, "seed": seed, "with_ddpm": with_ddpm, "samplers": SAMPLERS}
    if cache.exists() and json.loads(cache.read_text())["settings"] == settings:
        return json.loads(cache.read_text())["scores"]
    from evaluation.judge import feature_fid, heldout_digits, judge_accuracy, load_judge
    from evaluation.sampling import class_balanced_labels, sample_images
    from pipelines import DiffusionImagePipeline

    torch.set_num_threads(1)
    pipeline = DiffusionImagePipeline.from_pretrained(snapshot)
    pipeline.set_progress_bar_config(disable=True)
    shipped = dict(pipeline.scheduler.config)
    judge, (heldout, _) = load_judge(), heldout_digits()
    labels = class_balanced_labels(pipeline.num_classes, samples)
    scores = {}
    for sampler, steps in SAMPLERS.items():
        if sampler == "ddpm" and not (with_ddpm and pipeline.config.model_info.get("process") == "vp"):
            continue
        pipeline.set_sampler(sampler, model_scheduler_config=shipped)
        raw = sample_images(pipeline, class_labels=labels, seed=seed, num_inference_steps=steps,
                            guidance_scale=1.0, clamp=False)
        images = raw.clamp(-1, 1)
        scores[sampler] = {"feature_fid": feature_fid(judge, images, heldout),
                           "accuracy": judge_accuracy(judge, images, labels),
                           "outside_range": float((raw.abs() > RANGE_LIMIT).float().mean())}
    write_results(cache, {"settings": settings, "scores": scores})
    return scores


def train_and_score(args: argparse.Namespace, steps: int, export_every: int) -> list[dict]:
    """One row per (recipe, snapshot): its step, CPU-minutes so far and scores. Each run's snapshots are scored
    (``--parallel`` at a time) as soon as it finishes, while the next runs train."""
    jobs = {}
    with ProcessPoolExecutor(args.parallel) as pool:
        def score(recipe: str) -> None:
            cpu = cpu_seconds_by_step(args.runs_dir / recipe)
            for step in range(export_every, steps + 1, export_every):
                snapshot = args.runs_dir / recipe / SNAPSHOT_DIR / f"step-{step}"
                jobs[(recipe, step, cpu[step])] = pool.submit(score_snapshot, snapshot, args.samples, args.seed,
                                                              step == steps)

        train_recipes(args, steps, export_every, score)
        return [{"recipe": recipe, "step": step, "cpu_minutes": round(seconds / 60, 2), **job.result()}
                for (recipe, step, seconds), job in jobs.items()]


def markdown(results: dict) -> str:
    """The table of every scored snapshot and the plot (for docs/benchmarks.md)."""
    settings = results["settings"]
    lines = [f"{settings['model']} at {settings['image_size']}×{settings['image_size']}, batch "
             f"{settings['batch_size']}, {settings['steps']} steps per recipe (a budget of {settings['cpu_minutes']} "
             f"CPU-minutes at {settings['step_cpu_seconds']:.2f} CPU-s a step), {settings['samples']} samples per "
             f"score at guidance 1 (FID from so few samples is biased upwards: compare rows, not the floor 2.0).",
             "", "| recipe | step | CPU-min | FID dpm++2m 20 | accuracy | raw > 1.1 | FID DDPM 100 | raw > 1.1 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in results["rows"]:
        dpm, ddpm = row["dpmpp-2m"], row.get("ddpm")
        ddpm_cells = f"{ddpm['feature_fid']:.1f} | {ddpm['outside_range']:.2%}" if ddpm else "— | —"
        lines.append(f"| {row['recipe']} | {row['step']} | {row['cpu_minutes']:.1f} | {dpm['feature_fid']:.1f} | "
                     f"{dpm['accuracy']:.1%} | {dpm['outside_range']:.2%} | {ddpm_cells} |")
    lines += ["", "![feature-FID against training CPU-minutes per recipe](../bench/results/training_recipes.png)"]
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print(f"{'recipe':18s} {'step':>5s} {'CPU-min':>7s} | {'FID dpm++2m 20':>14s} {'acc':>6s} {'>1.1':>6s} | "
          f"{'FID DDPM 100':>12s} {'>1.1':>6s}")
    for row in rows:
        dpm, ddpm = row["dpmpp-2m"], row.get("ddpm")
        ddpm_cells = f"{ddpm['feature_fid']:12.2f} {ddpm['outside_range']:6.2%}" if ddpm else f"{'—':>12s} {'':6s}"
        print(f"{row['recipe']:18s} {row['step']:5d} {row['cpu_minutes']:7.1f} | {dpm['feature_fid']:14.2f} "
              f"{dpm['accuracy']:6.1%} {dpm['outside_range']:6.2%} | {ddpm_cells}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for recipe in dict.fromkeys(row["recipe"] for row in rows):
        mine = [row for row in rows if row["recipe"] == recipe]
        axis.plot([r["cpu_minutes"] for r in mine], [r["dpmpp-2m"]["feature_fid"] for r in mine], "o-", label=recipe)
    axis.set_xlabel("training CPU-minutes (one core)")
    axis.set_ylabel("feature-FID, DPM-Solver++ 2M, 20 steps")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title("Training recipes at equal CPU time (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"default: all ({', '.join(RECIPES)})")
    parser.add_argument("--cpu-minutes", type=float, default=8.0, help="training budget per recipe")
    parser.add_argument("--points", type=int, default=2, help="snapshots scored per run")
    parser.add_argument("--samples", type=int, default=200, help="digits per score (a multiple of 10)")
    parser.add_argument("--parallel", type=int, default=2, help="runs (and scorers) at once, one thread each")
    parser.add_argument("--model", default="mnist28")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/training-recipes"))
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    check_positive(parser, args, ("points", "samples", "parallel", "batch_size"))
    if not args.cpu_minutes > 0:
        parser.error(f"--cpu-minutes must be positive, got {args.cpu_minutes}")
    if args.samples % 10:
        parser.error(f"--samples must be a multiple of the 10 digits, got {args.samples}")
    try:
        for recipe in args.recipes:
            check_recipe(recipe)
    except ValueError as err:
        parser.error(str(err))
    return args


def study_plan(args: argparse.Namespace) -> tuple[float, int, int]:
    """(step CPU seconds, steps per recipe, steps between snapshots): calibrated on the first call and kept in
    ``RUNS_DIR/study.json``, so the runs a later call resumes keep their length (and learning-rate schedule)."""
    plan_file = args.runs_dir / "study.json"
    settings = {"cpu_minutes": args.cpu_minutes, "points": args.points, "model": args.model,
                "image_size": args.image_size, "batch_size": args.batch_size, "seed": args.seed}
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        if plan["settings"] != settings:
            raise SystemExit(f"{args.runs_dir} holds a study with other settings ({plan['settings']}); pass the "
                             f"same ones or another --runs-dir")
        return plan["step_cpu_seconds"], plan["steps"], plan["export_every"]
    step_seconds = calibrate_step_seconds(args)
    export_every = max(1, round(args.cpu_minutes * 60 / step_seconds / args.points))
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"settings": settings, "step_cpu_seconds": step_seconds,
                                     "steps": export_every * args.points, "export_every": export_every}) + "\n")
    return step_seconds, export_every * args.points, export_every


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    step_seconds, steps, export_every = study_plan(args)
    print(f"a step costs {step_seconds:.2f} CPU-s: {steps} steps per recipe, scored every {export_every}", flush=True)
    rows = train_and_score(args, steps, export_every)
    print_table(rows)
    results = {**machine_info(), "settings": {**{k: display_path(v) if isinstance(v, Path) else v
                                                  for k, v in vars(args).items()},
                                               "steps": steps, "step_cpu_seconds": step_seconds,
                                               "recipe_flags": {r: RECIPES[r] for r in args.recipes}},
               "rows": rows}
    write_results(args.output, results)
    plot(rows, args.output.with_suffix(".png"))
    return results


if __name__ == "__main__":
    main()
