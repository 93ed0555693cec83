"""Tune a sampler for one model: its σ grid and, for ``dpmpp-2m``, its mean-value table, fitted on the model's own
trajectories (issue #17).

What a few-step ODE sampler gets wrong depends on the model: where its trajectories bend, the grid needs its points.
So the grid is chosen the way LD3 (Tong et al. 2024) chooses it, and without data: from a batch of noise, a tight
solution of the model's own probability-flow ODE (``dpmpp-3m`` on fine log-SNR steps) is the target, and the grid's
interior points move, by Nelder–Mead in log σ started from the best of the standard grids (``starting_grids``), to
bring the sampler's end from the same noise closest to it (mean squared error). Align-Your-Steps (Sabour et al.
2024) and GITS (Chen et al. 2024) choose the same kind of grid from other criteria; the anchors are in
docs/samplers.md. For ``dpmpp-2m`` each candidate grid also gets its mean-value table (AMED, Zhou et al. 2024;
``schedulers.ode.fit_mean_value_points_to``) fitted against the tight trajectory, read off it at the grid's σ's;
so grid and table are tuned together, at the cost of one plain run per candidate. The result is a registry
scheduler whose config carries ``tuned_sigmas`` (and ``mean_value_points``): ``set_timesteps(steps)`` then runs
exactly the tuned grid, and ``save_pretrained`` / ``from_pretrained`` keep it.

    tuning = tune_sampler(unet, pipe.scheduler.config, sampler="dpmpp-2m", nfe=5, sample_shape=(1, 28, 28))
    scheduler, steps = tuning                 # unpacks as the pair; tuning.rmse etc. hold the numbers
    scheduler.set_timesteps(steps)            # the standard diffusers loop then calls the model nfe times

The first σ is the model's σ_max (the pipeline's initial noise is drawn there) and the last is 0 (the final
denoise), so a run of NFE n has n − 1 free points for a one-evaluation-per-step solver. With ``final="free"`` such
a solver (``euler``, ``dpmpp-2m``, ``dpmpp-3m``) ends at a tuned σ_end > 0 instead and returns its state there
(the scheduler's ``final_sigma="sigma_min"`` layout, as diffusers' ``final_sigmas_type="sigma_min"``), the
table's last step fitted like the others: n free values. A last step onto 0 returns D(x; σ_last), which shrinks
each direction the data spreads in with variance τ² by τ²/(τ² + σ_last²) where the ODE shrinks it by the square
root of that. At few steps σ_last is large, so on data with thin spread the samples come out too concentrated.
How much noise the free end leaves is decided in those thin directions, which the mean squared error hardly sees,
so after the search σ_end is rescaled until the ends' ``end_spread`` matches the tight solution's
(``_match_end_spread``). On four development mixtures (64 starts) the free end had the lower sliced-W2 at NFE 5
and 10; with the matched spread its NLL gaps on seven are within ±2.4 at NFE 5 on six (the seventh +3.9; the
final 0: −12 to −22) and within 0.5 at NFE 10. On ``mnist-flow`` it gets the lower error against the tight
solution but not the lower feature-FID (NFE 5, 500 samples: 1.37 against 1.29; ``mnist-vp``: 2.08 against 2.12),
so the final 0 stays the default.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.optimize
import torch

from .ode import WEIGHTINGS, dpmpp_multistep, drive_solver, fit_mean_value_points_to, least_squares_metric
from .registry import get_sampler
from .sigmas import log_snr_sigmas, make_sigmas

TUNABLE = ("euler", "heun", "midpoint", "dpmpp-2m", "dpmpp-3m", "flow-heun")  # deterministic fixed-step σ-space
WITH_TABLE = {"dpmpp-2m": "dpmpp-2m-mv"}  # sampler → the entry that runs it with a fitted mean-value table
REFERENCE_STEPS = 200  # log-SNR steps of the tight solution (dpmpp-3m): its error is far below a tuned grid's
START_SCHEDULES = ("log_snr", "karras", "flow")  # standard grids the search may start from (VP models add uniform_t)


class TuningStopped(Exception):
    """Raised inside ``tune_sampler`` when its ``should_stop`` says so; nothing was written."""


@dataclass
class Tuning:
    """A tuned scheduler and what the tuning measured. Unpacks as ``(scheduler, steps)``.

    ``rmse`` / ``stock_rmse``: root-mean-square distance per value between the sampler's end and the tight solution
    from the same noise, on held-out noise (``validation`` starts), for the tuned grid (and table) and for the
    entry's stock grid at the same NFE. ``evaluations``: model calls the tuning spent, per sample."""

    scheduler: object
    steps: int
    sampler: str
    entry: str
    nfe: int
    sigmas: list[float]
    mean_value_points: list[float] | None
    rmse: float
    stock_rmse: float
    train_rmse: float
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)
    final: str = "zero"  # "free" when the run ends at its tuned σ_end (the last of ``sigmas``)

    def __iter__(self):
        return iter((self.scheduler, self.steps))

    def summary(self) -> dict:
        return {key: getattr(self, key) for key in ("sampler", "entry", "nfe", "steps", "final", "sigmas",
                                                    "mean_value_points", "rmse", "stock_rmse", "train_rmse",
                                                    "evaluations", "seconds")}


class CountingDenoiser:
    """D(x; σ) of ``model`` through the scheduler's process (its input scale, time input and decoding, and its
    clipping), counting the calls. ``model(sample, timestep)`` returns a tensor or an object with ``.sample``."""

    def __init__(self, model, scheduler, class_labels=None):
        self.model, self.scheduler, self.class_labels = model, scheduler, class_labels
        self.calls = 0

    def model_call(self, sample, timestep):
        timestep = torch.as_tensor(timestep).to(sample.device, torch.float32).expand(len(sample))
        extra = {} if self.class_labels is None else {"class_labels": self.class_labels}
        output = self.model(sample, timestep, **extra)
        return getattr(output, "sample", output)

    def __call__(self, x, sigma):
        self.calls += 1
        with torch.no_grad():
            return self.scheduler.denoise_with(self.model_call, x, sigma).to(x.dtype)


class TightTrajectory:
    """The model's ODE solved tightly from ``x``: ``dpmpp-3m`` on ``steps`` uniform log-SNR steps from σ_max to
    σ_min, then the last step to 0 as an Euler step in the variance s = σ²: x(0) = (x + D(x; σ_min)) / 2.

    The ODE reads dx/ds = (x − D)/(2s) in s; along a direction where the data is locally Gaussian with variance
    τ² that is x/(2(τ² + s)), smooth at s = 0, so the Euler step is exact to O(σ_min⁴/τ⁴): it gives the factor
    1 − σ²/(2τ²) + O(σ⁴) of the exact √(τ²/(τ² + σ²)). The plain denoise D (an Euler step in σ) gives
    τ²/(τ² + σ²) = 1 − σ²/τ², twice the shrinkage. On the development mixtures (thin directions τ² = 1e-3, σ_min
    0.01) the plain denoise leaves an NLL gap of −2.0 to −2.8 and this step 0.04 to 0.13, with the same
    sliced-W2. Along a direction the data does not spread in at all (τ ≪ σ_min: an image's flat background) it
    keeps half of σ_min's noise, 0.005 on a VP model: a third of an 8-bit level.

    ``state_at(σ)`` reads the state at any σ on it by the exact exponential step (σ/σ_k) x_k + (1 − σ/σ_k) D_k
    from the grid point just above, first-order in a step of 1/``steps`` of the log-σ range."""

    def __init__(self, denoise: Callable, x: torch.Tensor, sigma_max: float, sigma_min: float, steps: int):
        fine = torch.cat([log_snr_sigmas(steps, sigma_min, sigma_max), torch.zeros(1, dtype=torch.float64)])
        seen = {}

        def recording(state, sigma):
            seen[float(sigma)] = (state, denoised := denoise(state, sigma))
            return denoised

        drive_solver(dpmpp_multistep(3), recording, x, fine)  # its last step, onto D(x; σ_min), is replaced
        self.sigmas = fine[:-1]
        self.states = [seen[float(sigma)] for sigma in self.sigmas]
        last_state, last_denoised = self.states[-1]
        self.final = (last_state + last_denoised) / 2

    def state_at(self, sigma) -> torch.Tensor:
        sigma = float(sigma)
        if sigma == 0:
            return self.final
        k = max(0, int(torch.searchsorted(-self.sigmas, torch.tensor(-sigma, dtype=torch.float64), right=True)) - 1)
        state, denoised = self.states[k]
        ratio = sigma / float(self.sigmas[k])
        return ratio * state + (1 - ratio) * denoised


def _rmse(a: torch.Tensor, b: torch.Tensor, metric: torch.Tensor | None = None) -> float:
    """The mean over samples of each one's RMS distance per value, in the metric ``metric`` (None: Euclidean)."""
    error = (a - b).double().flatten(1)
    squared = error ** 2 if metric is None else (error @ metric.double()) * error
    return float(squared.mean(1).sqrt().mean())


def _grid(theta: np.ndarray, sigma_max: float, free_end: bool) -> torch.Tensor:
    """σ_max, then each point a softplus(θ_i) step lower in log σ, then 0 unless ``free_end`` (the last point is
    then σ_end): every θ is a valid descending grid."""
    gaps = np.logaddexp(0.0, theta)
    log_sigmas = math.log(sigma_max) - np.concatenate([[0.0], np.cumsum(gaps)])
    grid = torch.tensor(np.exp(log_sigmas), dtype=torch.float64)
    return grid if free_end else torch.cat([grid, torch.zeros(1, dtype=torch.float64)])


def _theta(grid: torch.Tensor) -> np.ndarray:
    """The inverse of ``_grid``: the softplus-inverse of the log-σ gaps between the grid's positive points."""
    gaps = -np.diff(np.log(grid[grid > 0].numpy()))
    return np.log(np.expm1(gaps))


def _free_end_starts(grids: dict[str, torch.Tensor], sigma_min: float) -> dict[str, torch.Tensor]:
    """Each starting grid (ending at 0) with the 0 replaced by a free end's two starting points: σ_end = σ_min
    (diffusers' ``final_sigmas_type="sigma_min"``: nearly the denoise, for data with no spread below σ_min, as an
    image's flat background) and σ_end = σ_last / 2 (half of the last noise kept, for data that spreads thinly)."""
    starts = {}
    for name, grid in grids.items():
        for label, end in (("σ_min", min(sigma_min, float(grid[-2]) / 2)), ("σ_last/2", float(grid[-2]) / 2)):
            starts[f"{name}, end {label}"] = torch.cat([grid[:-1], grid.new_tensor([end])])
    return starts


def starting_grids(scheduler, steps: int, model_process: str) -> dict[str, torch.Tensor]:
    """The standard grids of ``steps`` steps from σ_max to the final 0 that the search starts from the best of.

    Each of ``START_SCHEDULES`` (and, for a VP model, its uniform training-time grid) in two spacings: ``steps``
    points down to σ_min then 0 ("leading", the project's stock layout), and ``steps + 1`` points with σ_min
    replaced by the 0 ("trailing": the last evaluation higher up, as diffusers' trailing spacing and its FlowMatch
    Euler lay it out). Which one is closest to the tight solution depends on the model: on ``mnist-flow`` at NFE 10
    the trailing uniform flow-time grid is 3× closer than the log-SNR grid, and a Nelder–Mead search started at the
    log-SNR grid does not get there in the runs a tune can afford."""
    sigma_min, sigma_max = scheduler.sigma_range()
    zero = torch.zeros(1, dtype=torch.float64)
    grids = {}
    for kind in START_SCHEDULES + (("uniform_t",) if model_process == "vp" else ()):
        for spacing, points in (("leading", steps), ("trailing", steps + 1)):
            grid = make_sigmas(kind, points, scheduler.schedule, sigma_min, sigma_max, scheduler.config.rho)[:steps]
            grid[0] = sigma_max  # the pipeline's initial noise is drawn at σ_max
            if torch.all(grid[1:] < grid[:-1]) and grid[-1] > 0:
                grids[f"{kind} {spacing}"] = torch.cat([grid, zero])
    return grids


FINALS = ("zero", "free")  # the final 0, or a tuned σ_end with no final denoise
SPREAD_TOLERANCE = 0.05  # a free end whose ends' spread is within 5% of the tight solution's stays where it is
END_SEARCH_RUNS = 16  # the most runs the free end's spread match spends (its bounded Brent search, and the start)


def _checked_request(sampler: str, nfe: int, scheduler_config: dict, model_process: str):
    if sampler not in TUNABLE:
        raise ValueError(f"sampler {sampler!r} cannot be tuned: tuning fits a deterministic fixed-step σ-space "
                         f"solver's grid; tunable: {', '.join(TUNABLE)}")
    spec = get_sampler(sampler)
    spec.check_fits(model_process, scheduler_config)
    if int(nfe) != nfe or nfe < max(2, spec.min_nfe):
        raise ValueError(f"nfe must be an integer ≥ {max(2, spec.min_nfe)} for {sampler} (a tuned grid has at least "
                         f"one free point), got {nfe}")
    stock = spec.create(scheduler_config, final_sigma="zero")
    steps, spent = spec.steps_within(int(nfe), scheduler_config)
    if spent != nfe:
        raise ValueError(f"{sampler} cannot spend exactly {nfe} evaluations: {steps} steps spend {spent}; "
                         f"ask for {spent} or for {spec.steps_within(nfe + 1, scheduler_config)[1]}")
    return spec, stock, steps


def tune_sampler(model, scheduler_config: dict, sampler: str = "dpmpp-2m", nfe: int = 5,
                 sample_shape: tuple[int, ...] = (1, 28, 28), class_labels=None, samples: int = 64, seed: int = 0,
                 validation: int | None = None, max_runs: int | None = None, table: bool | None = None,
                 weighting: str = "euclidean", final: str = "zero",
                 reference_steps: int = REFERENCE_STEPS, model_process: str = "vp", dtype=torch.float32,
                 device=None, progress: Callable[[int, int, float], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> Tuning:
    """Tune ``sampler``'s σ grid (and for ``dpmpp-2m`` its mean-value table) for ``model`` at ``nfe`` evaluations.

    ``scheduler_config``: the model's scheduler config (any diffusers or project scheduler's), which gives the
    training process; ``model_process``: the process the model records (``vp``, ``flow``, ``edm``).
    ``samples`` starts of seeded noise (``seed``) tune it, ``validation`` more (default as many, seed + 1) score
    it. ``class_labels``: one label per start, or None. ``max_runs``: candidate grids to try, the standard starting
    grids included (default 40 per free point). ``table``: fit a mean-value table too (default: for the samplers
    that have one, ``dpmpp-2m``); ``weighting``: its least-squares metric (``fit_mean_value_points``).
    ``final``: ``"zero"`` ends the grid at 0 (a final denoise); ``"free"`` tunes where the run ends, σ_end > 0
    with no final denoise, for a solver of one evaluation per step (the others end at 0 regardless; the module's
    docstring says when it helps); the searched σ_end is then rescaled to leave the tight solution's spread.
    ``progress(done, total, best_rmse)`` after each candidate; ``should_stop()`` stops it (``TuningStopped``).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if samples < 2 or (validation is not None and validation < 1):
        raise ValueError(f"need at least 2 tuning starts and 1 validation start, got {samples} and {validation}")
    if final not in FINALS:
        raise ValueError(f"final must be one of {', '.join(FINALS)}; got {final!r}")
    spec, stock, steps = _checked_request(sampler, nfe, scheduler_config, model_process)
    free_end = final == "free" and stock.order == 1  # a step onto σ_end > 0 costs a two-stage solver another call
    if final == "free" and not free_end:
        warnings.warn(f"final='free' is for solvers of one evaluation per step; {sampler} spends two, so its tuned "
                      "grid ends at 0 (Tuning.final is 'zero')", stacklevel=2)
    started = time.perf_counter()
    validation = samples if validation is None else validation
    denoise = CountingDenoiser(model, stock, None)
    sigma_min, sigma_max = stock.sigma_range()
    scale = math.sqrt(1 + sigma_max ** 2)  # the pipeline's init_noise_sigma: x_T at σ_max

    def starts(count, offset):
        generator = torch.Generator().manual_seed(seed + offset)
        return (torch.randn(count, *sample_shape, generator=generator, dtype=torch.float64) * scale).to(device, dtype)

    labels = None if class_labels is None else torch.as_tensor(class_labels).to(device)
    if labels is not None and len(labels) != samples + validation:
        raise ValueError(f"class_labels holds {len(labels)} labels; give one per start ({samples} tuning + "
                         f"{validation} validation)")
    batches = {}
    for name, (count, offset) in {"train": (samples, 0), "validation": (validation, 1)}.items():
        denoise.class_labels = None if labels is None else (labels[:samples] if name == "train" else labels[samples:])
        x = starts(count, offset)
        batches[name] = (x, TightTrajectory(denoise, x, sigma_max, sigma_min, reference_steps), denoise.class_labels)

    with_table = sampler in WITH_TABLE if table is None else bool(table)
    if with_table and sampler not in WITH_TABLE:
        raise ValueError(f"{sampler} has no mean-value table to fit; table=True goes with {', '.join(WITH_TABLE)}")

    def run(grid, batch):
        """The sampler's end on ``grid`` from ``batch``'s starts, and its table (fitted there) when it has one."""
        x, tight, denoise.class_labels = batch
        if with_table:
            targets = [tight.state_at(sigma) for sigma in grid[1:-1]] + [tight.final]  # the run's end: the sample
            points, end = fit_mean_value_points_to(targets, denoise, x, grid, not free_end, weighting,
                                                   within_step=True)
            return end, points
        return drive_solver(stock.solver, denoise, x, grid)[0], None

    final = batches["train"][1].final
    metric = None if weighting == "euclidean" else least_squares_metric(final, weighting).to(final.device)
    stock.set_timesteps(steps)
    stock_grid = stock.sigmas.clone()
    history = []
    start_grids = starting_grids(stock, steps, model_process)
    if free_end:
        start_grids = _free_end_starts(start_grids, sigma_min)
    free = len(stock_grid) - 2 + free_end
    grid_runs = max(max_runs or 40 * free, len(start_grids) + free + 1)  # at least the starts and one simplex
    total = grid_runs + (END_SEARCH_RUNS if free_end else 0)
    runs = 0

    def train_end(grid):
        """The run's end on the tuning starts; where ``should_stop`` says so, nothing more is run."""
        nonlocal runs
        if should_stop is not None and should_stop():
            raise TuningStopped(f"tuning {sampler} at NFE {nfe} stopped after {runs} of {total} grids")
        runs += 1
        return run(grid, batches["train"])[0]

    def report():
        if progress is not None:
            progress(runs, total, min(history))

    def loss(theta):
        end = train_end(_grid(theta, sigma_max, free_end))
        history.append(_rmse(end, batches["train"][1].final, metric))
        report()
        return history[-1]

    def end_search_run(grid):
        end = train_end(grid)
        report()
        return end

    theta0 = min((_theta(grid) for grid in start_grids.values()), key=loss)
    simplex = np.vstack([theta0, theta0 + 0.5 * np.eye(len(theta0))])
    result = scipy.optimize.minimize(loss, theta0, method="Nelder-Mead",
                                     options={"maxfev": max(grid_runs - len(history), len(theta0) + 1),
                                              "initial_simplex": simplex, "xatol": 1e-3, "fatol": 1e-7})
    grid = _grid(result.x, sigma_max, free_end)
    if free_end:
        grid = _match_end_spread(grid, end_search_run, denoise, batches["train"][1].final, sigma_min)
        runs = total  # the match may stop early: the bar ends full
        report()
    _, points = run(grid, batches["train"])
    entry = WITH_TABLE[sampler] if with_table else sampler
    table = {} if points is None else {"mean_value_points": points}
    scheduler = get_sampler(entry).create(scheduler_config, final_sigma="sigma_min" if free_end else "zero",
                                          tuned_sigmas=grid.tolist(), **table)
    rmse, stock_rmse = (_end_error(candidate, denoise, batches["validation"]) for candidate in (scheduler, stock))
    return Tuning(scheduler, steps, sampler, entry, int(nfe), grid.tolist(), points, rmse, stock_rmse,
                  float(result.fun), denoise.calls, time.perf_counter() - started, history,
                  "free" if free_end else "zero")


def end_spread(x: torch.Tensor, denoise: Callable, sigma_min: float) -> float:
    """The mean over samples of ‖x − D(x; σ_min)‖²: what the model would still remove at its smallest noise level.
    Along a direction of data variance τ² that is (σ_min²/(τ² + σ_min²))² of the sample's spread there, so the
    directions the data are thin in (τ ≲ σ_min), where a sample's likelihood is decided, dominate it; leftover
    noise raises it, over-shrinking lowers it."""
    return float(((x - denoise(x, torch.tensor(sigma_min, dtype=torch.float64))) ** 2).flatten(1).sum(1).mean())


def _match_end_spread(grid: torch.Tensor, end_of: Callable, denoise: Callable, target: torch.Tensor,
                      sigma_min: float) -> torch.Tensor:
    """``grid`` with its σ_end rescaled (within [1/4, 4]×, below the last step's start) so that the run's ends
    have the tight solution's ``end_spread``: the least |log ratio| by a bounded Brent search in log σ_end (at
    most ``END_SEARCH_RUNS`` runs of ``end_of``), or the grid as it is when that is no closer, or when its spread
    is already within ``SPREAD_TOLERANCE`` (|log ratio|) of the target's: a 64-sample estimate is not finer than
    that.

    The grid search's mean squared error is ruled by the wide directions, but how much noise the free end leaves
    is decided in the thin ones, and there a sample's likelihood swings by nats: on the development mixtures at
    NFE 5, ±15% of σ_end moved the NLL gap by 2 to 10 nats at nearly the same sliced-W2 and error."""
    wanted = end_spread(target, denoise, sigma_min)

    def rescaled(log_factor: float) -> torch.Tensor:
        candidate = grid.clone()
        candidate[-1] *= math.exp(log_factor)
        return candidate

    def mismatch(log_factor: float) -> float:
        return abs(math.log(end_spread(end_of(rescaled(log_factor)), denoise, sigma_min) / wanted))

    if (unmatched := mismatch(0.0)) <= SPREAD_TOLERANCE:
        return grid
    highest = min(math.log(4.0), math.log(0.99 * float(grid[-2] / grid[-1])))
    found = scipy.optimize.minimize_scalar(mismatch, bounds=(-math.log(4.0), highest), method="bounded",
                                           options={"xatol": 0.01, "maxiter": END_SEARCH_RUNS - 1})
    return rescaled(found.x) if found.fun < unmatched else grid


def _end_error(scheduler, denoise, batch) -> float:
    """RMS distance from the tight solution of ``scheduler``'s own run of its current grid from ``batch``'s starts."""
    x, tight, denoise.class_labels = batch
    return _rmse(drive_solver(scheduler.solver, denoise, x, scheduler.sigmas)[0], tight.final)


# ------------------------------------------------------------------------------ tuned schedulers in a model directory

TUNED_DIR = "tuned"  # MODEL_DIR/tuned/NAME/{scheduler_config.json, tuning.json}, NAME from ``tuned_name``
RECORD = "tuning.json"


def tuned_name(sampler: str, nfe: int, final: str = "zero") -> str:
    """``SAMPLER-nfeN``, and ``-free`` for a run that ends at its tuned σ_end: both can live in one model."""
    return f"{sampler}-nfe{nfe}" + ("-free" if final == "free" else "")


def weights_fingerprint(model_dir: Path) -> str:
    """SHA-256 over the denoiser's safetensors files (``unet/``): which weights a tuned scheduler belongs to."""
    files = sorted((Path(model_dir) / "unet").glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} has no unet/*.safetensors weights to tune for")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as weights:
            for block in iter(lambda: weights.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def save_tuned(model_dir, tuning: Tuning) -> Path:
    """Write ``tuning``'s scheduler into ``MODEL_DIR/tuned/SAMPLER-nfeN`` with its record (the numbers and the
    weights' fingerprint). Written in a temporary directory and renamed into place: a crash leaves the old one or
    none, never half of one."""
    model_dir = Path(model_dir)
    target = model_dir / TUNED_DIR / tuned_name(tuning.sampler, tuning.nfe, tuning.final)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tuning.scheduler.save_pretrained(staging)
        record = {**tuning.summary(), "weights_sha256": weights_fingerprint(model_dir)}
        (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if target.exists():
            retired = target.with_name(f".{target.name}-retired")
            shutil.rmtree(retired, ignore_errors=True)
            target.rename(retired)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tuned_schedulers(model_dir) -> dict[str, dict]:
    """The tuned schedulers saved in ``model_dir``, by name (``SAMPLER-nfeN``): each one's record."""
    found = {}
    for record in sorted((Path(model_dir) / TUNED_DIR).glob(f"*/{RECORD}")):
        if not record.parent.name.startswith("."):
            found[record.parent.name] = json.loads(record.read_text())
    return found


def load_tuned(model_dir, name: str):
    """The tuned scheduler ``name`` of ``model_dir`` and its steps; a ValueError when there is none by that name or
    when the model's weights changed since it was tuned (it belongs to other weights)."""
    found = tuned_schedulers(model_dir)
    if name not in found:
        raise ValueError(f"{model_dir} has no tuned scheduler {name!r}; tuned: {', '.join(found) or 'none'} "
                         "(python -m schedulers.tune MODEL_DIR --sampler S --nfe N)")
    record = found[name]
    if record.get("weights_sha256") != weights_fingerprint(model_dir):
        raise ValueError(f"tuned scheduler {name!r} was tuned for other weights than {model_dir}'s (they changed "
                         "since); tune it again")
    scheduler = get_sampler(record["entry"]).scheduler_class.from_pretrained(Path(model_dir) / TUNED_DIR / name)
    return scheduler, record["steps"]
