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

    python bench/samplers.py [--samples 2000] [--quick]

prints the table and a best-per-NFE summary, and writes bench/results/samplers.json and samplers.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import schedulers  # noqa: E402
from evaluation.distances import nll_gap, sliced_wasserstein  # noqa: E402
from evaluation.exact import ExactScoreModel, GaussianMixture  # noqa: E402
from pipelines import DiffusionImagePipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NFES = (5, 10, 20, 50)

# (label, class, config, NFE per step, deterministic); every entry is one line of the table.
SPACINGS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}
DIFFUSERS = [("diffusers-ddim/" + s, diffusers.DDIMScheduler, {"timestep_spacing": s, "clip_sample": False}, 1, True)
             for s in ("leading", "trailing", "linspace")]
for name, cls, base, per_step, deterministic in [
    ("euler", diffusers.EulerDiscreteScheduler, {}, 1, True),
    ("heun", diffusers.HeunDiscreteScheduler, {}, 2, True),
    ("lms", diffusers.LMSDiscreteScheduler, {}, 1, True),
    ("deis", diffusers.DEISMultistepScheduler, {}, 1, True),
    ("unipc", diffusers.UniPCMultistepScheduler, {}, 1, True),
    ("dpmpp-2m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 2}, 1, True),
    ("dpmpp-3m", diffusers.DPMSolverMultistepScheduler, {"solver_order": 3}, 1, True),
    ("dpmpp-2s", diffusers.DPMSolverSinglestepScheduler, {"solver_order": 2}, 1, True),
]:
    for spacing, extra in SPACINGS.items():
        DIFFUSERS.append((f"diffusers-{name}/{spacing}", cls, {**base, **extra}, per_step, deterministic))
for order in (2, 3):
    for final in ("zero", "sigma_min"):
        DIFFUSERS.append((f"diffusers-dpmpp-{order}m/logsnr-{final}", diffusers.DPMSolverMultistepScheduler,
                          {"solver_order": order, "use_lu_lambdas": True, "final_sigmas_type": final}, 1, True))
        DIFFUSERS.append((f"diffusers-dpmpp-{order}m/exponential-{final}", diffusers.DPMSolverMultistepScheduler,
                          {"solver_order": order, "use_exponential_sigmas": True, "final_sigmas_type": final}, 1, True))
DIFFUSERS.append(("diffusers-pndm", diffusers.PNDMScheduler, {"skip_prk_steps": True}, 1, True))


def benchmark_mixture(seed: int = 0) -> GaussianMixture:
    return GaussianMixture.random((1, 8, 8), 8, rank=2, mode_var=0.1, iso_var=1e-3, seed=seed)


def project_samplers():
    """(label, factory(steps), NFE per step, deterministic) for every registered sampler that needs nothing
    the exact model cannot give."""
    out = []
    for name, spec in schedulers.SAMPLERS.items():
        if spec.requires or spec.adaptive:  # adaptive solvers do not aim at an NFE; see tests/test_ode_order.py
            continue
        out.append((name, lambda spec=spec: spec.create({"clip_sample": False}), spec.nfe_per_step,
                    not spec.stochastic))
    return out


def run(pipe, scheduler, nfe_target: int, per_step: int, latents, seed: int):
    """Sample with the step count whose NFE is closest to (not above) the target; returns (images, nfe)."""
    pipe.scheduler = scheduler
    steps = max(1, nfe_target // per_step + (1 if per_step == 2 else 0))
    for _ in range(4):  # two-evaluation solvers spend 2·steps − 1: shrink until the budget holds
        out = pipe(batch_size=len(latents), num_inference_steps=steps, latents=latents,
                   generator=torch.Generator().manual_seed(seed), output_type="raw")
        if out.nfe <= nfe_target or steps == 1:
            return out.images, out.nfe
        steps -= 1
    return out.images, out.nfe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="NFE 10 only, a few samplers (smoke run)")
    parser.add_argument("--replot", action="store_true", help="redraw the plot and summary from the saved JSON")
    args = parser.parse_args(argv)
    if args.replot:
        rows = json.loads((RESULTS / "samplers.json").read_text())["rows"]
        summarize(rows)
        plot(rows, RESULTS / "samplers.png")
        return
    torch.set_num_threads(1)  # the exact model's tensors are tiny; a thread pool only adds overhead

    mixture = benchmark_mixture()
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), schedulers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    n = args.samples
    latents = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = mixture.sample(n, torch.Generator().manual_seed(2))
    floor = sliced_wasserstein(mixture.sample(n, torch.Generator().manual_seed(3)), reference)
    ode, _ = run(pipe, schedulers.ProbabilityFlowScheduler(solver="dpmpp-3m", sigma_schedule="log_snr"), 500, 1,
                 latents, 0)

    entries = [(label, factory, per_step, det) for label, factory, per_step, det in project_samplers()]
    entries += [(label, (lambda cls=cls, cfg=cfg: cls(**cfg)), per_step, det)
                for label, cls, cfg, per_step, det in DIFFUSERS]
    nfes = (10,) if args.quick else NFES
    if args.quick:
        entries = [e for e in entries if e[0] in ("ddim", "heun", "dpmpp-2m", "diffusers-dpmpp-2m/default")]

    rows = []
    print(f"sliced-W2 floor (true vs true, {n} samples): {floor:.4f}")
    print(f"{'sampler':42s} {'NFE':>4s} {'sw2_gap':>8s} {'nll_gap':>9s} {'rms_ode':>8s} {'s':>6s}")
    for label, factory, per_step, deterministic in entries:
        for target in nfes:
            try:
                scheduler = factory()
                start = time.perf_counter()
                images, nfe = run(pipe, scheduler, target, per_step, latents, 0)
                seconds = time.perf_counter() - start
            except Exception as error:  # an option a scheduler does not support: record it, go on
                rows.append({"sampler": label, "nfe_target": target, "error": f"{type(error).__name__}: {error}"})
                print(f"{label:42s} {target:4d}  skipped: {error}")
                continue
            images = images.double()
            finite = bool(torch.isfinite(images).all())
            row = {"sampler": label, "nfe_target": target, "nfe": nfe, "seconds": seconds,
                   "sw2_gap": sliced_wasserstein(images, reference) - floor if finite else math.inf,
                   "nll_gap": nll_gap(mixture, images, reference) if finite else math.inf,
                   "rms_ode": float(((images - ode) ** 2).mean().sqrt()) if deterministic and finite else None}
            rows.append(row)
            rms = f"{row['rms_ode']:8.4f}" if row["rms_ode"] is not None else f"{'—':>8s}"
            print(f"{label:42s} {nfe:4d} {row['sw2_gap']:8.4f} {row['nll_gap']:9.2f} {rms} {seconds:6.2f}")

    RESULTS.mkdir(exist_ok=True)
    result = {"benchmark": "samplers", "machine": platform.platform(), "processor": platform.processor(),
              "torch": torch.__version__, "diffusers": diffusers.__version__, "samples": n, "sw2_floor": floor,
              "mixture": "1x8x8, 8 components, rank 2, mode_var 0.1, iso_var 1e-3, seed 0", "rows": rows}
    name = "samplers-quick" if args.quick else "samplers"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    summarize(rows)
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json and .png")


def best_per_nfe(rows, project: bool, max_sw2_gap: float = 0.05):
    """Per NFE target, the configuration with the smallest |NLL gap| among those that place the modes
    (sliced-W2 gap ≤ ``max_sw2_gap``), for the project's samplers or for diffusers'."""
    best = {}
    for r in rows:
        if "error" in r or not math.isfinite(r["nll_gap"]) or r["sampler"].startswith("diffusers") == project:
            continue
        if r["sw2_gap"] <= max_sw2_gap and (r["nfe_target"] not in best
                                           or abs(r["nll_gap"]) < abs(best[r["nfe_target"]]["nll_gap"])):
            best[r["nfe_target"]] = r
    return [best[k] for k in sorted(best)]


def _cell(row, width: int) -> str:
    return f"{(row['sampler'] if row else '—'):{width}s} {(row['nll_gap'] if row else math.nan):8.2f}"


def summarize(rows):
    print("\nbest configuration per NFE (smallest |NLL gap| with modes placed, sliced-W2 gap ≤ 0.05):")
    print(f"{'NFE':>4s}  {'project':40s} {'nll_gap':>8s}   {'diffusers':44s} {'nll_gap':>8s}")
    ours, theirs = best_per_nfe(rows, True), best_per_nfe(rows, False)
    for target in sorted({r["nfe_target"] for r in ours + theirs}):
        a = next((r for r in ours if r["nfe_target"] == target), None)
        b = next((r for r in theirs if r["nfe_target"] == target), None)
        print(f"{target:4d}  {_cell(a, 40)}   {_cell(b, 44)}")


def plot(rows, path: Path):
    """NLL gap vs NFE: every configuration faint, the best of each side (``best_per_nfe``) bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = [r for r in rows if "error" not in r and math.isfinite(r["nll_gap"])]
    for label in dict.fromkeys(r["sampler"] for r in ok):
        mine = [r for r in ok if r["sampler"] == label]
        color = "tab:gray" if label.startswith("diffusers") else "tab:blue"
        ax.plot([r["nfe"] for r in mine], [r["nll_gap"] for r in mine], color=color, alpha=0.15, lw=0.8)
    for project, color, name in [(True, "tab:blue", "project, best"), (False, "black", "diffusers, best")]:
        best = best_per_nfe(rows, project)
        ax.plot([r["nfe"] for r in best], [r["nll_gap"] for r in best], color=color, lw=2.5, marker="o", label=name)
        for r in best:
            ax.annotate(r["sampler"].removeprefix("diffusers-"), (r["nfe"], r["nll_gap"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points", color=color)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xscale="log", yscale="symlog", xlabel="NFE", ylabel="NLL gap (nats, 0 = true spread)",
           title="exact 64-d mixture: within-mode spread vs NFE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)


if __name__ == "__main__":
    main()
