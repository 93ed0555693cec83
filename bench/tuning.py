"""Tuned samplers against the stock grid and diffusers' built-ins at the same NFE (issue #17, part 3).

``schedulers.tuning.tune_sampler`` tunes ``dpmpp-2m``'s σ grid and mean-value table at each NFE of ``--nfe``, from
the model's own trajectories, with no data. Two parts:

* **Exact mixtures made fresh** (``MIXTURES``: dimensions, mode counts, ranks and seeds that no one developed the
  tuner on; development ran on 64-d / 8 modes / rank 2, seeds 0, 1 and 5, and 49-d / 6 / 3, seed 31). Each is
  scored as in ``bench/samplers.py`` (``Scene``: sliced-W2 gap over the two-true-sets floor, NLL gap; 4,000
  samples) for the tuned sampler with either end (``final="zero"``, the default, and ``final="free"``), the stock
  ``dpmpp-2m`` and diffusers' DPM-Solver++ 2M on each of its σ grids with either final σ.
* **The shipped model** (``--model``, default the app's default model): feature-FID and judge accuracy at guidance
  1 on ``--samples`` class-balanced digits, for the model's own ``--reference-steps``-step result (``dpmpp-2m``,
  converged), the tuned sampler (the one shipped in ``MODEL_DIR/tuned/`` when there is one, else tuned here on
  ``--tune-samples`` starts), and diffusers' built-in schedulers for the model's process at the same NFE. The
  issue's bar: tuned NFE 5 within 20% and NFE 10 within 10% of the reference's feature-FID.

    python bench/tuning.py [--model checkpoints/mnist-flow] [--samples 1000] [--nfe 5 10] [--reference-steps 1000]
                           [--tune-samples 64] [--skip-model] [--skip-mixtures] [--quick] [--out JSON]

prints the tables and writes bench/results/tuning.json or ``--out`` (rewritten after every row). ``--quick``: 100
samples, a 100-step reference, 16 tuning starts, one mixture (a smoke run, written to tuning-quick.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import schedulers  # noqa: E402
from bench.common import check_positive, display_path, machine_info, write_results  # noqa: E402
from bench.quality_vs_nfe import BIAS_NOTE, sample_and_score  # noqa: E402
from bench.samplers import Scene  # noqa: E402
from evaluation.exact import ExactScoreModel, GaussianMixture  # noqa: E402
from evaluation.judge import heldout_digits, load_judge, real_fid_floor  # noqa: E402
from evaluation.sampling import class_balanced_labels  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402
from schedulers.tuning import load_tuned, tune_sampler, tuned_name, tuned_schedulers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist-flow"
SAMPLER = "dpmpp-2m"
MIXTURE_SAMPLES = 4000
# shape, components, rank, seed: each one new to the tuner (the first is also tests/test_tuning.py's)
MIXTURES = [((2, 4, 4), 7, 4, 57), ((1, 5, 5), 4, 2, 83), ((3, 3, 3), 9, 3, 91)]
REFERENCE_SAMPLER = "dpmpp-2m"
TUNED_FINALS = {f"tuned {SAMPLER}": "zero", f"tuned {SAMPLER}, free end": "free"}  # row label → tune_sampler's final
FINALS = ("zero", "sigma_min")


def vp_builtins(config: dict) -> dict:
    """diffusers' schedulers for a VP model (its training betas from ``config``): DPM-Solver++ 2M on each σ grid
    with either final σ, DDIM (trailing spacing), UniPC, Euler on Karras σ."""
    def dpm(**options):
        return lambda: diffusers.DPMSolverMultistepScheduler.from_config(config, **options)

    grids = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
             "lu": {"use_lu_lambdas": True}}
    found = {f"DPM++2M {grid}, final {final}": dpm(**options, final_sigmas_type=final)
             for grid, options in grids.items() for final in FINALS}
    return {**found,
            "DDIM trailing": lambda: diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing",
                                                                          clip_sample=False),
            "UniPC": lambda: diffusers.UniPCMultistepScheduler.from_config(config),
            "Euler Karras": lambda: diffusers.EulerDiscreteScheduler.from_config(config, use_karras_sigmas=True)}


def flow_builtins(config: dict) -> dict:
    """diffusers' schedulers for a rectified-flow model (velocity ε − x0, time t·1000, unit-noise prior): flow
    matching's Euler on each σ grid, DPM-Solver++ 2M and UniPC on flow σ's."""
    steps = {"num_train_timesteps": config.get("num_train_timesteps", 1000)}

    def euler(**options):
        return lambda: diffusers.FlowMatchEulerDiscreteScheduler(**steps, shift=1.0, **options)

    def flow(cls, **options):
        return lambda: cls(**steps, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=1.0,
                           **options)

    return {"FlowMatch Euler": euler(), "FlowMatch Euler Karras": euler(use_karras_sigmas=True),
            "FlowMatch Euler exponential": euler(use_exponential_sigmas=True),
            **{f"DPM++2M flow, final {final}": flow(diffusers.DPMSolverMultistepScheduler, final_sigmas_type=final)
               for final in FINALS},
            "UniPC flow": flow(diffusers.UniPCMultistepScheduler)}


BUILTINS = {"vp": vp_builtins, "flow": flow_builtins}


def _print_row(row: dict, keys: tuple[str, ...]) -> None:
    cells = "  ".join(f"{key} {row[key]:8.4f}" if isinstance(row[key], float) else f"{key} {row[key]}"
                      for key in keys)
    print(f"{row['sampler']:34s} NFE {row['nfe']:3d}  {cells}", flush=True)


def mixture_rows(shape, components: int, rank: int, seed: int, nfes, tune_samples: int, n: int):
    """Rows of one fresh mixture: tuned, stock, and diffusers' 2M on every grid, at each NFE."""
    mixture = GaussianMixture.random(shape, components, rank=rank, mode_var=0.1, iso_var=1e-3, seed=seed)
    scene = Scene(mixture, n)
    config = dict(diffusers.DDPMScheduler().config)  # the exact model's process: linear-β VP
    model = ExactScoreModel.from_mixture(mixture)
    rows = []
    for nfe in nfes:
        tunings = {label: tune_sampler(model, config, sampler=SAMPLER, nfe=nfe, sample_shape=shape,
                                       samples=tune_samples, seed=seed + 10, final=final)
                   for label, final in TUNED_FINALS.items()}
        candidates = {**{label: tuple(tuning) for label, tuning in tunings.items()},
                      f"stock {SAMPLER}": (schedulers.get_sampler(SAMPLER).create(config), nfe),
                      **{name: (build(), nfe) for name, build in vp_builtins(config).items()
                         if name.startswith("DPM++2M")}}
        for name, (scheduler, steps) in candidates.items():
            scene.pipe.scheduler = scheduler
            images = scene.pipe(batch_size=n, num_inference_steps=steps, latents=scene.latents,
                                output_type="raw").images
            sw2, nll = scene.score(images)
            row = {"mixture": f"{'×'.join(map(str, shape))}, {components} modes, rank {rank}, seed {seed}",
                   "sampler": name, "nfe": nfe, "sw2_gap": sw2, "nll_gap": nll}
            if name in tunings:
                row["tuning_seconds"] = round(tunings[name].seconds, 1)
            rows.append(row)
            _print_row(row, ("sw2_gap", "nll_gap"))
    return rows


def model_rows(args, results: dict, out: Path) -> None:
    """The shipped model's reference, tuned and built-in rows (appended to ``results['model']``)."""
    pipeline = DiffusionImagePipeline.from_pretrained(args.model)
    pipeline.set_progress_bar_config(disable=True)
    config = dict(pipeline.scheduler.config)
    process = pipeline.config.model_info.get("process", "vp")
    if process not in BUILTINS:
        raise SystemExit(f"{args.model} records process {process!r}; this benchmark knows {', '.join(BUILTINS)}")
    judge = load_judge()
    heldout, _ = heldout_digits()
    labels = class_balanced_labels(pipeline.num_classes, args.samples)
    section = results["model"] = {"model": display_path(args.model), "process": process, "samples": args.samples,
                                  "real_fid_floor": real_fid_floor(judge), "note": BIAS_NOTE, "rows": []}

    def add(name: str, scheduler, steps: int, nfe: int, **extra) -> dict:
        pipeline.scheduler = scheduler
        row = {"sampler": name, "nfe": nfe, "steps": steps,
               **sample_and_score(pipeline, judge, heldout, labels, steps, args.seed), **extra}
        section["rows"].append(row)
        _print_row(row, ("feature_fid", "accuracy"))
        write_results(out, results)
        return row

    reference = add(f"reference {REFERENCE_SAMPLER}", schedulers.get_sampler(REFERENCE_SAMPLER).create(config),
                    args.reference_steps, args.reference_steps)
    tune_labels = torch.arange(2 * args.tune_samples) % pipeline.num_classes
    shipped = tuned_schedulers(args.model)
    for nfe in args.nfe:
        name = tuned_name(SAMPLER, nfe)
        if name in shipped:  # the model's own tuned scheduler (python -m schedulers.tune), as the app runs it
            scheduler, steps = load_tuned(args.model, name)
            record = {key: shipped[name][key] for key in ("seconds", "evaluations")}
        else:
            tuning = tune_sampler(pipeline.unet, config, sampler=SAMPLER, nfe=nfe,
                                  sample_shape=tuple(pipeline.sample_shape), class_labels=tune_labels,
                                  samples=args.tune_samples, seed=args.seed, model_process=process)
            (scheduler, steps), record = tuning, {"seconds": tuning.seconds, "evaluations": tuning.evaluations}
        tuned = add(f"tuned {SAMPLER}", scheduler, steps, nfe, tuning_seconds=round(record["seconds"], 1),
                    tuning_evaluations=record["evaluations"], shipped=name in shipped)
        builtins = [add(name, build(), nfe, nfe) for name, build in BUILTINS[process](config).items()]
        best = min(builtins, key=lambda row: row["feature_fid"])
        section.setdefault("summary", []).append(
            {"nfe": nfe, "tuned_fid": tuned["feature_fid"], "best_builtin": best["sampler"],
             "best_builtin_fid": best["feature_fid"], "reference_fid": reference["feature_fid"],
             "tuned_over_reference": tuned["feature_fid"] / reference["feature_fid"],
             "builtin_over_reference": best["feature_fid"] / reference["feature_fid"]})
        write_results(out, results)


def markdown(results: dict) -> str:
    """The tables for docs/benchmarks.md."""
    lines = ["| mixture | NFE | tuned dpmpp-2m, final 0 | tuned, free end | stock dpmpp-2m | "
             "diffusers 2M, best sliced-W2 |",
             "|---|---|---|---|---|---|"] if results["mixtures"] else []  # none with --skip-mixtures
    cell = "{sw2_gap:.4f} / {nll_gap:+.1f}".format
    keyed = {}
    for row in results["mixtures"]:
        keyed.setdefault((row["mixture"], row["nfe"]), []).append(row)
    for (mixture, nfe), rows in keyed.items():
        by_name = {row["sampler"]: row for row in rows}
        tuned = " | ".join(cell(**by_name[label]) for label in TUNED_FINALS)
        best = min((row for row in rows if row["sampler"].startswith("DPM++2M")), key=lambda row: row["sw2_gap"])
        lines.append(f"| {mixture} | {nfe} | {tuned} | {cell(**by_name[f'stock {SAMPLER}'])} | {cell(**best)} "
                     f"({best['sampler'].removeprefix('DPM++2M ')}) |")
    model = results.get("model")
    if model and model.get("summary"):
        lines += [""] if lines else []
        lines += [f"{model['model']}, {model['samples']} samples, guidance 1 (floor "
                  f"{model['real_fid_floor']:.2f}):", "",
                  f"| NFE | tuned feature-FID | best built-in | its feature-FID | reference: {REFERENCE_SAMPLER}, "
                  f"{model['rows'][0]['steps']} steps |",
                  "|---|---|---|---|---|"]
        for row in model["summary"]:
            lines.append(f"| {row['nfe']} | {row['tuned_fid']:.2f} ({row['tuned_over_reference']:.2f}×) | "
                         f"{row['best_builtin']} | {row['best_builtin_fid']:.2f} "
                         f"({row['builtin_over_reference']:.2f}×) | {row['reference_fid']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--samples", type=int, default=1000, help="digits per row (a multiple of the classes)")
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--reference-steps", type=int, default=1000)
    parser.add_argument("--tune-samples", type=int, default=64, help="noise starts the tuner fits on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-model", action="store_true", help="only the exact mixtures")
    parser.add_argument("--skip-mixtures", action="store_true", help="only the shipped model")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default bench/results/tuning.json, tuning-quick.json with --quick)")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("samples", "reference_steps", "tune_samples"))
    if args.quick:
        args.samples, args.reference_steps, args.tune_samples = 100, 100, 16
    diffusers_logging.disable_progress_bar()
    out = args.out or RESULTS / ("tuning-quick.json" if args.quick else "tuning.json")
    results = {"benchmark": "tuning", **machine_info(), "sampler": SAMPLER, "nfe": args.nfe,
               "mixture_samples": MIXTURE_SAMPLES, "mixtures": []}
    started = time.perf_counter()
    if not args.skip_mixtures:
        for shape, components, rank, seed in MIXTURES[:1] if args.quick else MIXTURES:
            results["mixtures"] += mixture_rows(shape, components, rank, seed, args.nfe, args.tune_samples,
                                                MIXTURE_SAMPLES)
            write_results(out, results)
    if not args.skip_model:
        model_rows(args, results, out)
    results["seconds"] = round(time.perf_counter() - started, 1)
    write_results(out, results)
    print("\n" + markdown(results))
    return results


if __name__ == "__main__":
    main()
