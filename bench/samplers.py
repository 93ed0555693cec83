"""Sampler benchmark on an exact-score Gaussian mixture: the project's samplers against diffusers' best.

The mixture lives in 64 dimensions (1×8×8) and concentrates near 2-D planes (τ² = 1e-3 across the other 62
directions), so the end of sampling is hard, as with images. Every sampler is driven by the exact score
through the same pipeline, from the same initial noise, at NFE 5, 10, 20 and 50, and scored by

* ``sw2_gap``: sliced W2 to true samples minus the finite-sample floor (true vs true) — mode placement;
* ``nll_gap``: mean −log p of the samples minus that of true samples, in nats — within-mode spread
  (negative: over-concentrated);
* ``rms_ode``: RMS distance to a tight solution of the probability-flow ODE from the same noise
  (deterministic samplers only).

diffusers' samplers run with each of their step-spacing options (default, Karras, exponential, uniform
log-SNR, and final step to σ_min or to zero) so the comparison is against their best configuration.

Searched grids (``--search``): for diffusers' DPM-Solver++ 2M (the baseline) and for the project's multistep
solvers, the σ grid — σ_min, σ_max, spacing (Karras ρ, or uniform log σ) and whether it ends at 0 or at σ_min —
is chosen per NFE on a *different* mixture (``TUNING_SEED``: another draw of means, bases and spectra, other
initial noise) by the smallest ``|NLL gap| + 100 · sliced-W2 gap`` (1 nat weighs as 0.01 of W2), written to
bench/results/samplers-grids.json, and then scored here like every other entry (``…/searched`` rows).

The mean-value entries (``dpmpp-2m-mv``, ``dpmpp-2m-mvp``) also fit their κ table per grid on the tuning mixture
(``fit_mean_value_points``, Euclidean and precision-weighted least squares).

    python bench/samplers.py --search            # the grid search on the tuning mixture (~15 min, 1 core)
    python bench/samplers.py [--samples 10000] [--quick]   # ~20 min, 1 core

prints the table and a best-per-NFE summary, and writes bench/results/samplers.json and samplers.png (another
--samples writes samplers-nN.*). With 2,000 samples two sets of true samples differ by ~0.3 nats of NLL and
~0.005 of sliced W2, as much as the best samplers differ from each other; the default 10,000 cuts that to about
0.13 nats and 0.002 (the exact ODE itself scores −0.002 and −0.08 there).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import schedulers  # noqa: E402
from bench.common import machine_info, write_results  # noqa: E402
from evaluation.distances import nll_gap, sliced_wasserstein  # noqa: E402
from evaluation.exact import ExactScoreModel, GaussianMixture  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402
from schedulers.process import VPSchedule  # noqa: E402
from schedulers.registry import steps_within  # noqa: E402
from schedulers.sigmas import karras_sigmas, log_snr_sigmas  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GRIDS = RESULTS / "samplers-grids.json"
NFES = (5, 10, 20, 50)
BENCHMARK_SEED, TUNING_SEED = 0, 1
# The grid search space: σ_min × σ_max × spacing (Karras ρ; None: uniform in log σ) × where the grid ends.
SEARCH = {"sigma_min": (0.006, 0.01, 0.015, 0.02, 0.03), "sigma_max": (20.0, 157.4), "rho": (7.0, None),
          "final": ("zero", "sigma_min")}
SEARCH_NFES = (5, 10, 20)

# (label, class, config, deterministic); every entry is one line of the table.
SPACINGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
DIFFUSERS = [("diffusers-ddim/" + s, diffusers.DDIMScheduler, {"timestep_spacing": s, "clip_sample": False}, True)
             for s in ("leading", "trailing", "linspace")]
for name, cls, base, deterministic in [
    ("euler", diffusers.EulerDiscreteScheduler, {}, True),
    ("heun", diffusers.HeunDiscreteScheduler, {}, True),
    ("lms", diffusers.LMSDiscreteScheduler, {}, True),
    ("deis", diffusers.DEISMultistepScheduler, {}, True),
    ("unipc", diffusers.UniPCMultistepScheduler, {}, True),
    ("dpmpp-2m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 2}, True),
    ("dpmpp-3m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}, True),
    ("dpmpp-2s", diffusers.DPMSolverSinglestepScheduler, {"solver_order": 2}, True),
]:
    for spacing, extra in SPACINGS.items():
        DIFFUSERS.append((f"diffusers-{name}/{spacing}", cls, {**base, **extra}, deterministic))
for order in (2, 3):
    for final in ("zero", "sigma_min"):
        DIFFUSERS.append((f"diffusers-dpmpp-{order}m/logsnr-{final}", diffusers.DPMSolverMultistepScheduler,
                          {"solver_order": order, "use_lu_lambdas": True, "final_sigmas_type": final}, True))
        DIFFUSERS.append((f"diffusers-dpmpp-{order}m/exponential-{final}", diffusers.DPMSolverMultistepScheduler,
                          {"solver_order": order, "use_exponential_sigmas": True, "final_sigmas_type": final}, True))
DIFFUSERS.append(("diffusers-pndm", diffusers.PNDMScheduler, {"skip_prk_steps": True}, True))
# The stochastic anchors of the SDE family (issue #17): diffusers' Euler ancestral and DPM-Solver++ 2M SDE.
DIFFUSERS.append(("diffusers-euler-ancestral/default", diffusers.EulerAncestralDiscreteScheduler, {}, False))
for spacing, extra in SPACINGS.items():
    DIFFUSERS.append((f"diffusers-dpmpp-2m-sde/{spacing}", diffusers.DPMSolverMultistepScheduler,
                      {"algorithm_type": "sde-dpmsolver++", **extra}, False))


def benchmark_mixture(seed: int = BENCHMARK_SEED) -> GaussianMixture:
    return GaussianMixture.random((1, 8, 8), 8, rank=2, mode_var=0.1, iso_var=1e-3, seed=seed)


def grid_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float | None) -> torch.Tensor:
    """n noise levels from σ_max down to σ_min: Karras-ρ spacing, or uniform in log σ for ``rho=None``."""
    return log_snr_sigmas(n, sigma_min, sigma_max) if rho is None else karras_sigmas(n, sigma_min, sigma_max, rho)


class GridDPMSolver(diffusers.DPMSolverMultistepScheduler):
    """diffusers' DPM-Solver++ (its own ``step``, lower-order final step included) on an explicit σ grid.

    ``set_timesteps(n)`` lays n steps out by ``grid_sigmas`` and ends at 0 (``grid_final="zero"``: the last step
    lands on the denoised estimate) or at σ_min. The model is asked at the fractional training timestep of
    each σ (``VPSchedule.timestep_of_sigma``), where diffusers would round it to an integer: a slightly
    stronger baseline than diffusers' own grids, whose model σ and solver σ disagree by the rounding.
    """

    def __init__(self, grid_sigma_min: float = 0.01, grid_sigma_max: float = 157.4, grid_rho: float | None = 7.0,
                 grid_final: str = "zero", **config):
        super().__init__(**config)
        self.grid = (grid_sigma_min, grid_sigma_max, grid_rho, grid_final)

    def set_timesteps(self, num_inference_steps: int, device=None, **kwargs):
        super().set_timesteps(num_inference_steps, device)
        low, high, rho, final = self.grid
        sigmas = grid_sigmas(num_inference_steps + (final == "sigma_min"), low, high, rho)
        if final == "zero":
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.timesteps = VPSchedule.from_config(self.config).timestep_of_sigma(sigmas[:-1]).float().to(device)
        self.sigmas = sigmas.float()
        self.num_inference_steps = len(self.timesteps)


def _project(solver: str, lower_order_final: bool = False):
    def make(grid: dict):
        table = {"mean_value_points": grid["mean_value_points"]} if solver == schedulers.ode.MEAN_VALUE else {}
        return schedulers.ProbabilityFlowScheduler(
            solver=solver, sigma_schedule="log_snr" if grid["rho"] is None else "karras", rho=grid["rho"] or 7.0,
            sigma_min=grid["sigma_min"], sigma_max=grid["sigma_max"], final_sigma=grid["final"],
            lower_order_final=lower_order_final, **table)

    return make


# The mean-value entries: label → how ``fit_mean_value_points`` weights its least squares.
MEAN_VALUE_ENTRIES = {"dpmpp-2m-mv/searched": "euclidean", "dpmpp-2m-mvp/searched": "precision"}
# Searched entries: label → (factory(grid) → scheduler, evaluations beyond one per step).
SEARCHED = {
    "diffusers-dpmpp-2m/searched": (lambda g: GridDPMSolver(g["sigma_min"], g["sigma_max"], g["rho"], g["final"]), 0),
    "dpmpp-2m/searched": (_project("dpmpp-2m"), 0),
    "dpmpp-2m-lof/searched": (_project("dpmpp-2m", lower_order_final=True), 0),
    "dpmpp-3m-lof/searched": (_project("dpmpp-3m", lower_order_final=True), 1),
    **{label: (_project(schedulers.ode.MEAN_VALUE), 0) for label in MEAN_VALUE_ENTRIES},
}


def searched_run(label: str, grid: dict, nfe: int):
    """(scheduler, num_inference_steps) of a searched entry whose run costs exactly ``nfe`` evaluations."""
    factory, extra = SEARCHED[label]
    scheduler = factory(grid)
    if label.startswith("diffusers"):  # n steps, each one evaluation, whatever the final σ
        return scheduler, nfe
    # the project's schedulers take n grid points: n − 1 steps, plus the final denoise when ending at 0
    return scheduler, nfe - extra + (grid["final"] == "sigma_min")


def fitted_mean_value_points(mixture: GaussianMixture, grid: dict, nfe: int, samples: int,
                             weighting: str) -> list[float]:
    """``fit_mean_value_points`` for the grid of ``grid`` at ``nfe``, on ``mixture`` from noise (seed 11) that
    is neither the benchmark's nor the scored run's."""
    probe, steps = searched_run("dpmpp-2m/searched", grid, nfe)  # the same grid and step count
    probe.set_timesteps(steps)
    sigmas = probe.sigmas
    starts = torch.randn(samples, *mixture.sample_shape, generator=torch.Generator().manual_seed(11),
                         dtype=torch.float64) * (1 + sigmas[0] ** 2).sqrt()
    return schedulers.ode.fit_mean_value_points(mixture.denoise, starts, sigmas, weighting=weighting)


class Scene:
    """A mixture with its pipeline, initial noise, true reference samples and sliced-W2 floor."""

    def __init__(self, mixture: GaussianMixture, n: int):
        self.mixture = mixture
        self.pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(self.mixture), schedulers.DDIMScheduler())
        self.pipe.set_progress_bar_config(disable=True)
        self.latents = torch.randn(n, *mixture.sample_shape, generator=torch.Generator().manual_seed(1),
                                   dtype=torch.float64)
        self.reference = self.mixture.sample(n, torch.Generator().manual_seed(2))
        self.floor = sliced_wasserstein(self.mixture.sample(n, torch.Generator().manual_seed(3)), self.reference)

    def score(self, images: torch.Tensor) -> tuple[float, float]:
        """(sliced-W2 gap over the floor, NLL gap)."""
        return (sliced_wasserstein(images, self.reference) - self.floor,
                nll_gap(self.mixture, images, self.reference))


def search_grids(samples: int) -> dict:
    """Per searched entry and NFE, the grid with the smallest ``|NLL gap| + 100 · sliced-W2 gap`` on the tuning
    mixture (``TUNING_SEED``), never on the benchmark's."""
    from tqdm.auto import tqdm

    scene = Scene(benchmark_mixture(TUNING_SEED), samples)
    keys = list(SEARCH)
    space = [dict(zip(keys, values)) for values in itertools.product(*SEARCH.values())]
    best = {}
    for label, target, grid in tqdm(list(itertools.product(SEARCHED, SEARCH_NFES, space)), desc="grid search"):
        if label in MEAN_VALUE_ENTRIES:  # fit the table for this grid, on the tuning mixture
            grid = {**grid, "mean_value_points": fitted_mean_value_points(scene.mixture, grid, target, samples,
                                                                          MEAN_VALUE_ENTRIES[label])}
        scheduler, steps = searched_run(label, grid, target)
        scene.pipe.scheduler = scheduler
        out = scene.pipe(batch_size=samples, num_inference_steps=steps, latents=scene.latents, output_type="raw")
        if out.nfe != target:
            raise RuntimeError(f"{label} with {grid} spent {out.nfe} evaluations, not {target}")
        images = out.images.double()
        if not torch.isfinite(images).all():
            continue
        sw2, nll = scene.score(images)
        objective = abs(nll) + 100 * sw2
        key = f"{label}@{target}"
        if key not in best or objective < best[key]["objective"]:
            best[key] = {**grid, "tuning_sw2_gap": sw2, "tuning_nll_gap": nll, "objective": objective}
    result = {"tuning_mixture_seed": TUNING_SEED, "samples": samples, "space": SEARCH,
              "objective": "|nll_gap| + 100 * sw2_gap", "grids": best}
    GRIDS.write_text(json.dumps(result, indent=1))
    return result


def project_samplers():
    """(label, factory(), deterministic) for every registered sampler that needs nothing the exact model cannot
    give."""
    out = []
    for name, spec in schedulers.SAMPLERS.items():
        if spec.requires or spec.adaptive:  # adaptive solvers do not aim at an NFE; see tests/test_ode_order.py
            continue
        out.append((name, lambda spec=spec: spec.create({"clip_sample": False}), not spec.stochastic))
    return out


def run(pipe, scheduler, nfe_target: int, latents, seed: int, steps: int | None = None):
    """Sample with ``steps``, or else the most steps whose traced NFE is at most the target (``steps_within``);
    returns (images, nfe)."""
    pipe.scheduler = scheduler
    if steps is None:
        steps, _ = steps_within(scheduler, nfe_target)
    out = pipe(batch_size=len(latents), num_inference_steps=steps, latents=latents,
               generator=torch.Generator().manual_seed(seed), output_type="raw")
    return out.images, out.nfe


def exact_ode_samples(mixture: GaussianMixture, latents: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE solved tightly all the way to σ = 1e-5 ≈ 0 with the exact denoiser (3M, 800
    log-σ steps): what every deterministic sampler converges to, so its scores are the benchmark's noise."""
    sigmas = log_snr_sigmas(800, 1e-5, 157.4)
    return schedulers.ode.drive_solver(schedulers.ode.dpmpp_multistep(3), mixture.denoise,
                                       latents * (1 + sigmas[0] ** 2).sqrt(), sigmas)[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="NFE 10 only, a few samplers (smoke run)")
    parser.add_argument("--replot", action="store_true", help="redraw the plot and summary from the saved JSON")
    parser.add_argument("--search", action="store_true", help="search the grids of the …/searched entries on the "
                        "tuning mixture and write bench/results/samplers-grids.json")
    parser.add_argument("--search-samples", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.replot:
        rows = json.loads((RESULTS / "samplers.json").read_text())["rows"]
        summarize(rows)
        plot(rows, RESULTS / "samplers.png")
        return
    torch.set_num_threads(1)  # the exact model's tensors are tiny; a thread pool only adds overhead
    RESULTS.mkdir(exist_ok=True)
    if args.search:
        for key, grid in search_grids(args.search_samples)["grids"].items():
            print(f"{key:36s} {grid}")
        return

    n = args.samples
    scene = Scene(benchmark_mixture(BENCHMARK_SEED), n)
    pipe, latents = scene.pipe, scene.latents
    ode, _ = run(pipe, schedulers.ProbabilityFlowScheduler(solver="dpmpp-3m", sigma_schedule="log_snr"), 500,
                 latents, 0)
    exact_sw2, exact_nll = scene.score(exact_ode_samples(scene.mixture, latents))

    # (label, make(NFE target) → (scheduler, steps or None: chosen by ``run``), deterministic)
    entries = [(label, (lambda target, factory=factory: (factory(), None)), det)
               for label, factory, det in project_samplers()]
    entries += [(label, (lambda target, cls=cls, cfg=cfg: (cls(**cfg), None)), det)
                for label, cls, cfg, det in DIFFUSERS]
    grids = json.loads(GRIDS.read_text())["grids"] if GRIDS.exists() else {}
    entries += [(label, (lambda target, label=label: searched_run(label, grids[f"{label}@{target}"], target)),
                 True) for label in SEARCHED]
    nfes = (10,) if args.quick else NFES
    if args.quick:
        entries = [e for e in entries if e[0] in ("ddim", "heun", "dpmpp-2m", "diffusers-dpmpp-2m/default",
                                                  "dpmpp-2m-lof/searched", "diffusers-dpmpp-2m/searched")]

    rows = []
    print(f"sliced-W2 floor (true vs true, {n} samples): {scene.floor:.4f}; the exact ODE's own gaps: "
          f"sliced-W2 {exact_sw2:.4f}, NLL {exact_nll:.2f}")
    print(f"{'sampler':42s} {'NFE':>4s} {'sw2_gap':>8s} {'nll_gap':>9s} {'rms_ode':>8s} {'s':>6s}")
    for label, make, deterministic in entries:
        for target in nfes:
            if label in SEARCHED and f"{label}@{target}" not in grids:
                continue  # no grid searched at this NFE (run --search)
            try:
                scheduler, steps = make(target)
                start = time.perf_counter()
                images, nfe = run(pipe, scheduler, target, latents, 0, steps)
                seconds = time.perf_counter() - start
            except Exception as error:  # an option a scheduler does not support: record it, go on
                rows.append({"sampler": label, "nfe_target": target, "error": f"{type(error).__name__}: {error}"})
                print(f"{label:42s} {target:4d}  skipped: {error}")
                continue
            images = images.double()
            finite = bool(torch.isfinite(images).all())
            sw2, nll = scene.score(images) if finite else (math.inf, math.inf)
            row = {"sampler": label, "nfe_target": target, "nfe": nfe, "seconds": seconds, "sw2_gap": sw2,
                   "nll_gap": nll,
                   "rms_ode": float(((images - ode) ** 2).mean().sqrt()) if deterministic and finite else None}
            if label in SEARCHED:
                row["grid"] = grids[f"{label}@{target}"]
            rows.append(row)
            rms = f"{row['rms_ode']:8.4f}" if row["rms_ode"] is not None else f"{'—':>8s}"
            print(f"{label:42s} {nfe:4d} {row['sw2_gap']:8.4f} {row['nll_gap']:9.2f} {rms} {seconds:6.2f}")

    result = {"benchmark": "samplers", **machine_info(), "samples": n, "sw2_floor": scene.floor,
              "exact_ode": {"sw2_gap": exact_sw2, "nll_gap": exact_nll},
              "mixture": f"1x8x8, 8 components, rank 2, mode_var 0.1, iso_var 1e-3, seed {BENCHMARK_SEED}",
              "rows": rows}
    name = "samplers-quick" if args.quick else "samplers" if n == parser.get_default("samples") else f"samplers-n{n}"
    write_results(RESULTS / f"{name}.json", result)
    summarize(rows)
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


BASELINE = "diffusers-dpmpp-2m/searched"
SIDES = {"project": "project", "diffusers": "diffusers, built-in", "searched": "diffusers 2M, searched grid"}


def side_of(label: str) -> str:
    if label == BASELINE:
        return "searched"
    return "diffusers" if label.startswith("diffusers") else "project"


def best_per_nfe(rows, side: str, max_sw2_gap: float = 0.05):
    """Per NFE target, the configuration with the smallest |NLL gap| among those that place the modes
    (sliced-W2 gap ≤ ``max_sw2_gap``), for one side: the project's samplers, diffusers' built-in
    configurations, or the searched-grid baseline."""
    best = {}
    for r in rows:
        if "error" in r or not math.isfinite(r["nll_gap"]) or side_of(r["sampler"]) != side:
            continue
        if r["sw2_gap"] <= max_sw2_gap and (r["nfe_target"] not in best
                                           or abs(r["nll_gap"]) < abs(best[r["nfe_target"]]["nll_gap"])):
            best[r["nfe_target"]] = r
    return [best[k] for k in sorted(best)]


def _cell(row, width: int) -> str:
    if row is None:
        return f"{'—':{width}s} {'':8s} {'':8s}"
    return f"{row['sampler']:{width}s} {row['sw2_gap']:8.4f} {row['nll_gap']:8.2f}"


def summarize(rows):
    print("\nbest configuration per NFE (smallest |NLL gap| with modes placed, sliced-W2 gap ≤ 0.05):")
    header = "   ".join(f"{name:30s} {'sw2_gap':>8s} {'nll_gap':>8s}" for name in SIDES.values())
    print(f"{'NFE':>4s}  {header}")
    best = {side: best_per_nfe(rows, side) for side in SIDES}
    for target in sorted({r["nfe_target"] for rs in best.values() for r in rs}):
        cells = [_cell(next((r for r in best[side] if r["nfe_target"] == target), None), 30) for side in SIDES]
        print(f"{target:4d}  {'   '.join(cells)}")
    print("\nproject configurations at least as good as the diffusers side's best on both metrics at once:")
    for side in ("diffusers", "searched"):
        for theirs in best[side]:
            ours = [r for r in rows if "error" not in r and side_of(r["sampler"]) == "project"
                    and r["nfe_target"] == theirs["nfe_target"] and r["sw2_gap"] <= theirs["sw2_gap"]
                    and abs(r["nll_gap"]) <= abs(theirs["nll_gap"])]
            names = ", ".join(f"{r['sampler']} ({r['sw2_gap']:.4f}, {r['nll_gap']:.2f})" for r in ours) or "none"
            print(f"{theirs['nfe_target']:4d}  vs {theirs['sampler']}: {names}")


def markdown(results: dict) -> str:
    """The best configuration of each side per NFE, then every project entry at every NFE, and the plot."""
    rows = [r for r in results["rows"] if "error" not in r]
    targets = sorted({r["nfe_target"] for r in rows})
    best = {side: {r["nfe_target"]: r for r in best_per_nfe(rows, side)} for side in SIDES}
    exact = results["exact_ode"]
    lines = [f"{results['samples']} samples of the mixture ({results['mixture']}). Cells: sliced-W2 gap over the "
             f"finite-sample floor ({results['sw2_floor']:.4f}) / NLL gap in nats (0 = the true spread); the exact "
             f"ODE itself scores {exact['sw2_gap']:.4f} / {exact['nll_gap']:.2f} at this sample count.", "",
             "Best configuration per NFE (smallest |NLL gap| among those with sliced-W2 gap ≤ 0.05):", "",
             "| NFE | " + " | ".join(SIDES.values()) + " |", "|---|" + "---|" * len(SIDES)]
    for target in targets:
        cells = [_markdown_best(best[side].get(target)) for side in SIDES]
        lines.append(f"| {target} | " + " | ".join(cells) + " |")
    lines += ["", "Every project entry:", "", "| sampler | " + " | ".join(f"NFE {t}" for t in targets) + " |",
              "|---|" + "---|" * len(targets)]
    for sampler in dict.fromkeys(r["sampler"] for r in rows if side_of(r["sampler"]) == "project"):
        by_target = {r["nfe_target"]: r for r in rows if r["sampler"] == sampler}
        cells = [_markdown_gaps(by_target[t]) if t in by_target else "—" for t in targets]
        lines.append(f"| `{sampler}` | " + " | ".join(cells) + " |")
    lines += ["", "![sampler benchmark](../bench/results/samplers.png)"]
    return "\n".join(lines)


def _markdown_gaps(row: dict) -> str:
    return f"{row['sw2_gap']:.3g} / {row['nll_gap']:.3g}"


def _markdown_best(row: dict | None) -> str:
    return "—" if row is None else f"`{row['sampler']}` {_markdown_gaps(row)}"


def plot(rows, path: Path):
    """NLL gap and sliced-W2 gap vs NFE: every configuration faint, the best of each side (``best_per_nfe``)
    bold, and the project's mean-value entry dashed (the one that beats the searched baseline on both at NFE 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ok = [r for r in rows if "error" not in r and math.isfinite(r["nll_gap"])]
    for ax, metric, label, limits in [(axes[0], "nll_gap", "NLL gap (nats, 0 = true spread)", (-300, 300)),
                                      (axes[1], "sw2_gap", "sliced-W2 gap over the floor", (0.0, 0.06))]:
        for sampler in dict.fromkeys(r["sampler"] for r in ok):
            mine = [r for r in ok if r["sampler"] == sampler]
            color = "tab:gray" if sampler.startswith("diffusers") else "tab:blue"
            ax.plot([r["nfe"] for r in mine], [r[metric] for r in mine], color=color, alpha=0.12, lw=0.8)
        for side, color in [("project", "tab:blue"), ("diffusers", "black"), ("searched", "tab:red")]:
            best = best_per_nfe(rows, side)
            ax.plot([r["nfe"] for r in best], [r[metric] for r in best], color=color, lw=2.2, marker="o",
                    label=SIDES[side] + ", best by |NLL gap|")
        for entry, color in zip(MEAN_VALUE_ENTRIES, ("tab:green", "tab:purple")):
            mean_value = [r for r in ok if r["sampler"] == entry]
            ax.plot([r["nfe"] for r in mean_value], [r[metric] for r in mean_value], color=color, lw=2, ls="--",
                    marker="s", label=entry)
        ax.set(xscale="log", xlabel="NFE", ylabel=label, ylim=limits)
        if metric == "nll_gap":
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=7)
    fig.suptitle("exact 64-d mixture: the project's samplers (blue) and diffusers' (gray)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
