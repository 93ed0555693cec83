"""Quality against NFE on a shipped MNIST model: feature-FID of each sampler family at NFE ≈ 5, 10, 20, 50.

Every registered sampler named in ``--samplers`` drives ``--model`` (default ``checkpoints/mnist-vp``, a VP model;
``checkpoints/mnist-flow``, the app's default, is a flow model) class-conditionally at guidance scale 1 (plain
conditional: one UNet call per step), with the same per-digit labels and the same seeds for every row, and the
MNIST judge scores the samples:

* ``feature_fid``: the Fréchet distance of judge features to the 500 held-out digits (``evaluation.judge``);
* ``accuracy``: the judge's accuracy on the intended digits.

NFE counts network evaluations honestly: each row takes the most steps whose run costs at most the target
(``len(scheduler.timesteps)`` after ``set_timesteps``, one UNet call each), so Heun and the predictor–corrector
SDE get about half the steps of a one-evaluation solver, and the table shows the NFE actually spent. Two lines
frame the rows: DDPM with all 1,000 training steps (the sampler the model was trained for, at its most
expensive: the reference; on a flow model its ancestral counterpart, Euler ancestral with η = 1, which is DDPM's
step in σ-space) and ``real_fid_floor`` (250 real held-out digits against the other 250).

The default samplers are one per family and order: ``ddpm`` (ancestral; its own curve runs into the reference),
``ddim`` (η = 0, the shipped scheduler, which is also the exponential-integrator Euler step), ``analytic-ddpm``
(DDPM with Analytic-DPM's optimal variance, Bao et al. 2022: the fix for few-step ancestral sampling; the model
ships no E‖ε_θ‖²/d table, so it is estimated here on the train split as ``python -m evaluation.analytic_table``
does, and the seconds it took are recorded), ``heun`` (second-order probability-flow ODE, two evaluations per
step), ``dpmpp-2m`` (multistep DPM-Solver++, Lu et al. 2022) and ``sde-euler-maruyama`` (the reverse SDE,
Song et al. 2021). Euler and DPM-Solver++ 3M are left out by default: Euler is DDIM on another σ grid, 3M a
higher-order 2M; ``--samplers`` adds them or any other registered sampler of the model's process that needs no
fitted table. On a flow model the defaults are ``euler-ancestral`` (the ancestral row), ``euler`` (DDIM's step on
that process), ``heun``, ``dpmpp-2m``, ``dpmpp-2m-sde`` and ``sde-euler-maruyama``.

Feature-FID from N samples is biased upward, more the smaller N is (the 128-d covariance is estimated from N
points), so rows are comparable only at equal N, within one run, not with FIDs from other sample counts.

    python bench/quality_vs_nfe.py [--samples 200] [--nfe 5 10 20 50] [--samplers ddim heun ...] [--quick]

prints the table and writes bench/results/quality_vs_nfe.json (with the machine it ran on; rewritten after every
row) and quality_vs_nfe.png (feature-FID against NFE, log axes). ``--quick`` is a smoke run: 20 samples, two NFE,
three samplers, a 50-step reference, a coarse table, written to quality_vs_nfe-quick.json. The full run costs
about samples × (ΣNFE + 1000) UNet evaluations: 50 CPU-minutes at 200 samples (1 h 45 min on two shared cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import schedulers  # noqa: E402
from bench.common import display_path, machine_info, model_process, write_results  # noqa: E402
from evaluation.analytic_table import pipeline_eps_second_moment  # noqa: E402
from evaluation.judge import DEFAULT_JUDGE_PATH, heldout_digits, load_judge, real_fid_floor  # noqa: E402
from evaluation.metrics import compute_metrics  # noqa: E402
from evaluation.sampling import class_balanced_labels, sample_images  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402
from schedulers.registry import steps_within  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
# per process: the default samplers (one per family and order) and the ancestral reference
SAMPLERS = {"vp": ("ddpm", "ddim", "analytic-ddpm", "heun", "dpmpp-2m", "sde-euler-maruyama"),
            "flow": ("euler-ancestral", "euler", "heun", "dpmpp-2m", "dpmpp-2m-sde", "sde-euler-maruyama")}
REFERENCE_SAMPLERS = {"vp": "ddpm", "flow": "euler-ancestral"}
NFES = (5, 10, 20, 50)
REFERENCE_STEPS = 1000
# E‖ε_θ‖²/d: measured timesteps × images per timestep (python -m evaluation.analytic_table's defaults; --quick: coarse)
ANALYTIC_TABLE, QUICK_ANALYTIC_TABLE = (100, 160), (10, 20)
QUICK = {"samples": 20, "nfe": [5, 10], "reference_steps": 50}
QUICK_SAMPLERS = {"vp": ["ddim", "analytic-ddpm", "heun"], "flow": ["euler", "euler-ancestral", "heun"]}
BIAS_NOTE = ("feature-FID from N samples is biased upward, more for smaller N: rows are comparable only at equal N "
             "(this run's), not with FIDs from other sample counts")


def covered_process(model_dir: Path) -> str:
    """The process the exported model was trained on, if this benchmark covers it."""
    process = model_process(model_dir)
    if process not in SAMPLERS:
        raise ValueError(f"{model_dir} is a {process!r} model; this benchmark covers {', '.join(SAMPLERS)} models")
    return process


def benchmarked_spec(name: str, process: str) -> schedulers.SamplerSpec:
    """The registry entry ``name``, if this benchmark can run it: a sampler of ``process`` at a fixed step count that
    needs no fitted value but the E‖ε_θ‖²/d table, which the benchmark estimates."""
    spec = schedulers.get_sampler(name)
    if spec.adaptive or not spec.drives(process) or set(spec.requires) - {"eps_second_moment"}:
        raise ValueError(f"sampler {name!r} does not fit this benchmark: it must drive a {process} model at a fixed "
                         f"step count and need no fitted value other than eps_second_moment")
    return spec


def make_scheduler(spec: schedulers.SamplerSpec, model_config, table: list[float] | None):
    """The sampler for the model, with the estimated table where it requires one."""
    return spec.create(model_config, **({"eps_second_moment": table} if spec.requires else {}))


def sample_and_score(pipeline, judge, heldout, labels, steps: int, seed: int) -> dict:
    started = time.perf_counter()
    images = sample_images(pipeline, class_labels=labels, seed=seed, num_inference_steps=steps, guidance_scale=1.0)
    scores = compute_metrics(images, heldout, ["feature_fid", "accuracy"], labels=labels, judge=judge)
    return {"feature_fid": scores["feature_fid"], "accuracy": scores["accuracy"],
            "seconds": round(time.perf_counter() - started, 1)}


def run(args, process: str, out: Path) -> dict:
    pipeline = DiffusionImagePipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    model_config = pipeline.scheduler.config
    judge = load_judge(args.judge)
    heldout, _ = heldout_digits()
    labels = class_balanced_labels(pipeline.num_classes, args.samples)
    results = {"benchmark": "quality_vs_nfe", **machine_info(), "model": display_path(args.model),
               "process": process, "samples": args.samples, "seed": args.seed, "guidance_scale": 1.0,
               "nfe_targets": args.nfe,
               "samplers": args.samplers, "plot": out.with_suffix(".png").name, "note": BIAS_NOTE,
               "real_fid_floor": real_fid_floor(judge),
               "reference": None, "analytic_table": None, "rows": []}

    table = None
    if any(schedulers.get_sampler(name).requires for name in args.samplers):
        timesteps, per_timestep = QUICK_ANALYTIC_TABLE if args.quick else ANALYTIC_TABLE
        started = time.perf_counter()
        table = pipeline_eps_second_moment(pipeline, "mnist", timesteps, per_timestep, args.seed)
        results["analytic_table"] = {"measured_timesteps": timesteps, "images_per_timestep": per_timestep,
                                     "split": "train", "seconds": round(time.perf_counter() - started, 1),
                                     "first": table[0], "last": table[-1]}
        print(f"E‖ε‖²/d table: {table[0]:.3f} (t=0) … {table[-1]:.3f} (t=T−1), "
              f"{results['analytic_table']['seconds']:.0f} s", flush=True)

    reference = REFERENCE_SAMPLERS[process]
    pipeline.scheduler = schedulers.get_sampler(reference).create(model_config)
    results["reference"] = {"sampler": reference, "steps": args.reference_steps, "nfe": args.reference_steps,
                            **sample_and_score(pipeline, judge, heldout, labels, args.reference_steps, args.seed)}
    print(f"reference {reference} {args.reference_steps} steps: feature-FID "
          f"{results['reference']['feature_fid']:.2f} ({results['reference']['seconds']:.0f} s)", flush=True)
    write_results(out, results)

    for name in args.samplers:
        spec = benchmarked_spec(name, process)
        scheduler = pipeline.scheduler = make_scheduler(spec, model_config, table)
        for target in args.nfe:
            steps, nfe = steps_within(scheduler, target)
            row = {"sampler": name, "family": spec.family, "stochastic": spec.stochastic, "nfe_target": target,
                   "steps": steps, "nfe": nfe, **sample_and_score(pipeline, judge, heldout, labels, steps, args.seed)}
            results["rows"].append(row)
            print(f"{name:>20s} NFE {nfe:3d} ({steps:3d} steps)  feature-FID {row['feature_fid']:7.2f}  "
                  f"accuracy {row['accuracy']:.1%}  ({row['seconds']:.0f} s)", flush=True)
            write_results(out, results)
    return results


def markdown(results: dict) -> str:
    """A table with one row per sampler and one column per NFE target (feature-FID, the NFE spent where it is
    below the target), the reference and the floor beneath, and the plot."""
    targets = results["nfe_targets"]
    lines = [f"{results['samples']} samples ({results['samples'] // 10} per digit), seed {results['seed']}, "
             f"guidance 1; feature-FID against the 500 held-out digits (lower is better). {results['note']}.", "",
             "| sampler | family | " + " | ".join(f"NFE {t}" for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for name in results["samplers"]:
        rows = {r["nfe_target"]: r for r in results["rows"] if r["sampler"] == name}
        if not rows:
            continue
        family = next(iter(rows.values()))["family"]
        cells = [_fid_cell(rows.get(t)) for t in targets]
        lines.append(f"| `{name}` | {family} | " + " | ".join(cells) + " |")
    reference = results["reference"]
    if reference:
        lines.append(f"| **reference**: `{reference['sampler']}`, {reference['steps']} steps (NFE {reference['nfe']}) "
                     f"| ancestral | {reference['feature_fid']:.2f} |" + " |" * (len(targets) - 1))
    lines.append(f"| real held-out halves (floor) | — | {results['real_fid_floor']:.2f} |" + " |" * (len(targets) - 1))
    if results.get("analytic_table"):
        table = results["analytic_table"]
        lines += ["", f"`analytic-ddpm` uses an E‖ε_θ‖²/d table estimated in the run ({table['measured_timesteps']} "
                  f"timesteps × {table['images_per_timestep']} {table['split']} images, {table['seconds']:.0f} s)."]
    lines += ["", f"![feature-FID against NFE](../bench/results/{results.get('plot', 'quality_vs_nfe.png')})"]
    return "\n".join(lines)


def _fid_cell(row: dict | None) -> str:
    if row is None:
        return "—"
    spent = "" if row["nfe"] == row["nfe_target"] else f" (NFE {row['nfe']})"
    return f"{row['feature_fid']:.2f}{spent}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.8))
    for name in results["samplers"]:
        rows = [r for r in results["rows"] if r["sampler"] == name]
        if rows:
            axis.plot([r["nfe"] for r in rows], [r["feature_fid"] for r in rows], marker="o",
                      linestyle="--" if rows[0]["stochastic"] else "-", label=name)
    reference = results["reference"]
    if reference:
        axis.axhline(reference["feature_fid"], color="black", linewidth=1,
                     label=f"{reference['sampler']} {reference['steps']} steps (reference)")
    axis.axhline(results["real_fid_floor"], color="grey", linestyle=":", label="real vs real (floor)")
    axis.set(xscale="log", yscale="log", xlabel="NFE (network evaluations per image)",
             ylabel="feature-FID vs held-out digits",
             title=f"{Path(results['model']).name}, {results['samples']} samples per point (stochastic: dashed)")
    axis.set_xticks(results["nfe_targets"], [str(t) for t in results["nfe_targets"]])
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python bench/quality_vs_nfe.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints/mnist-vp")
    parser.add_argument("--judge", type=Path, default=ROOT / DEFAULT_JUDGE_PATH)
    parser.add_argument("--samples", type=int, default=200, help="samples per point, equal per digit")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(NFES), help="NFE targets")
    parser.add_argument("--samplers", nargs="+", default=None,
                        help="registered sampler names (default: one per family for the model's process)")
    parser.add_argument("--reference-steps", type=int, default=REFERENCE_STEPS,
                        help="steps of the ancestral reference (DDPM; Euler ancestral on a flow model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: " + ", ".join(
        f"{key.replace('_', '-')} {value}" for key, value in QUICK.items()) + ", three samplers")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/quality_vs_nfe.json, -quick.json with --quick)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    if args.samples < 20 or args.samples % 10:
        parser.error("--samples must be a multiple of 10 (equal per digit), at least 20")
    if min(args.nfe) < 1:
        parser.error("--nfe targets must be positive")
    try:
        process = covered_process(args.model)
        if args.quick:
            args.samplers = QUICK_SAMPLERS[process]
        args.samplers = args.samplers or list(SAMPLERS[process])
        for name in args.samplers:
            benchmarked_spec(name, process)
    except ValueError as error:
        parser.error(str(error))
    out = args.out or RESULTS / ("quality_vs_nfe-quick.json" if args.quick else "quality_vs_nfe.json")
    diffusers_logging.disable_progress_bar()

    results = run(args, process, out)
    print()
    print(markdown(results))
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
