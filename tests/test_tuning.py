"""Tuned samplers (issue #17, parts 1–3): ``schedulers.tuning.tune_sampler`` through its public API only.

Quality is measured on a mixture drawn here, fresh: 32-d (2×4×4), 7 components near 4-D subspaces, τ² = 1e-3
across the rest — another dimension, mode count and rank than the mixtures the tuner was developed on (64-d,
8 modes, rank 2, seeds 0 and 1; 49-d, 6 modes, rank 3, seed 31). Its seed (57), the tuning noise's (67), the
scoring noise's (58, 59) and the references' (60, 61) were not used in development. Scores as in
``tests/test_stochastic_samplers.py``: sliced-W2 gap (to true samples, minus the floor of two true sets) and NLL
gap (mean −log p of the samples minus that of true samples, nats), each the mean over two noise seeds of 4,000
samples. The anchors are diffusers' ``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M) on each of its σ grids
(default, Karras, exponential, Lu's log-SNR), with either final σ. The quality goals are measured with the free
end (``final="free"``), which the mixtures' thin spread needs: on the four development mixtures (64-d seeds 0, 1
and 5, 49-d seed 31) it had the lower sliced-W2 at NFE 5 and 10 on all four, and |NLL gap| ≤ 0.11 at NFE 10
where the final 0 left 1.6 to 3.2.
"""

import contextlib
import json
import math

import diffusers
import pytest
import torch

import schedulers
from evaluation.distances import nll_gap, sliced_wasserstein
from evaluation.exact import ExactScoreModel, GaussianMixture
from pipelines import DiffusionImagePipeline
from schedulers import tune
from schedulers.tuning import (
    END_SEARCH_RUNS,
    CountingDenoiser,
    TightTrajectory,
    TuningStopped,
    end_spread,
    load_tuned,
    save_tuned,
    starting_grids,
    tune_sampler,
    tuned_name,
    tuned_schedulers,
    weights_fingerprint,
)

from .conftest import make_pipeline, seeded

pytestmark = pytest.mark.usefixtures("single_thread")

SHAPE = (2, 4, 4)
N = 4000
SEEDS = (58, 59)
TUNING_SEED = 67
SW2_NOISE = 0.005  # run-to-run spread of the sliced-W2 gap at this size (two noise seeds), as in the SDE tests
CONFIG = dict(diffusers.DDPMScheduler().config)  # the exact model's training process: linear-β VP, 1000 steps
ANCHOR_GRIDS = {"default": {}, "karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True},
                "lu": {"use_lu_lambdas": True}}


@pytest.fixture(scope="module")
def scene():
    mixture = GaussianMixture.random(SHAPE, 7, rank=4, mode_var=0.1, iso_var=1e-3, seed=57)
    reference = mixture.sample(N, seeded(60))
    floor = sliced_wasserstein(mixture.sample(N, seeded(61)), reference)
    return mixture, reference, floor


def score(scene, scheduler, steps: int) -> tuple[float, float]:
    """(sliced-W2 gap, NLL gap) of ``scheduler``'s run of ``steps``, each the mean over ``SEEDS``."""
    mixture, reference, floor = scene
    pipe = make_pipeline(mixture, scheduler)
    scores = []
    for seed in SEEDS:
        latents = torch.randn(N, *SHAPE, generator=seeded(seed), dtype=torch.float64)
        images = pipe(batch_size=N, num_inference_steps=steps, latents=latents, output_type="raw").images
        scores.append((sliced_wasserstein(images, reference) - floor, nll_gap(mixture, images, reference)))
    return tuple(sum(values) / len(values) for values in zip(*scores))


@pytest.fixture(scope="module")
def diffusers_2m(scene) -> dict[int, dict[str, tuple[float, float]]]:
    """Every anchor configuration's score at NFE 5 and 10 (2M spends one evaluation per step)."""
    return {nfe: {f"{grid} / final {final}": score(scene, diffusers.DPMSolverMultistepScheduler(
                      **options, final_sigmas_type=final), nfe)
                  for grid, options in ANCHOR_GRIDS.items() for final in ("zero", "sigma_min")}
            for nfe in (5, 10)}


@pytest.fixture(scope="module")
def tuned(scene):
    """dpmpp-2m with its grid and mean-value table tuned for the exact model at NFE 5 and 10, with either end, and
    the scores: ``tuned[final][nfe] = (tuning, (sliced-W2 gap, NLL gap))``."""
    model = ExactScoreModel.from_mixture(scene[0])
    found = {}
    for final in ("free", "zero"):
        for nfe in (5, 10):
            tuning = tune_sampler(model, CONFIG, sampler="dpmpp-2m", nfe=nfe, sample_shape=SHAPE, seed=TUNING_SEED,
                                  final=final)
            found.setdefault(final, {})[nfe] = (tuning, score(scene, *tuning))
    return found


def test_tuned_nfe_5_beats_the_stock_grid_and_every_diffusers_configuration_on_both_metrics(scene, tuned,
                                                                                             diffusers_2m):
    """Measured: tuned .0057 / +5.7 (final 0: .0105 / −7.8); stock ``dpmpp-2m`` .083 / 177; diffusers' best
    sliced-W2 .022 / 140 (default grid, final σ_min), best NLL .045 / 69 (Lu's grid)."""
    sw2, nll = tuned["free"][5][1]
    stock = score(scene, schedulers.get_sampler("dpmpp-2m").create(CONFIG), 5)
    for name, (their_sw2, their_nll) in {"stock dpmpp-2m": stock, **diffusers_2m[5]}.items():
        assert sw2 < their_sw2 and abs(nll) < abs(their_nll), (name, (sw2, nll), (their_sw2, their_nll))


@pytest.mark.xfail(strict=True, reason="not met yet: the NFE-5 goal (sliced-W2 gap ≤ .008, |NLL gap| ≤ 2)")
def test_tuned_nfe_5_reaches_the_issues_goal(tuned):
    """Measured: .0057 / +5.7 (+6.8 before the free end's spread was matched), too spread where the final 0 was
    too concentrated (.0105 / −7.8): the sliced-W2 half is met. On development mixtures of this shape (seeds 500,
    501) the top 1% of samples, ending far off their component's thin subspace, carry most of the gap
    (docs/samplers.md). Strict: remove the mark once it passes."""
    sw2, nll = tuned["free"][5][1]
    assert sw2 <= 0.008 and abs(nll) <= 2


def test_tuned_nfe_10_is_as_good_as_diffusers_best_sliced_w2(tuned, diffusers_2m):
    """Measured: tuned −.0098 / −0.04; diffusers' best sliced-W2 −.0070 / −3.2 (exponential grid, final 0)."""
    sw2, _ = tuned["free"][10][1]
    best = min(their_sw2 for their_sw2, _ in diffusers_2m[10].values())
    assert sw2 <= best + SW2_NOISE


def test_tuned_nfe_10_is_as_good_as_diffusers_best_nll(tuned, diffusers_2m):
    """Measured: tuned −0.039; diffusers' best −0.048 (Lu's log-SNR grid, final σ_min: it keeps σ_min's noise);
    the two noise seeds' values differ by up to 0.065, so this is a tie that the tuned one wins. With the final 0
    the tuned grid gets −0.56: its last step onto D(x; σ_last) shrinks the thin directions."""
    _, nll = tuned["free"][10][1]
    assert abs(nll) <= min(abs(their_nll) for _, their_nll in diffusers_2m[10].values())


def test_the_free_end_keeps_the_thin_spread_that_a_final_denoise_removes(tuned):
    """At NFE 10 the free end's NLL gap is near 0 and the final 0's clearly negative (measured −0.04 and −0.56)."""
    assert abs(tuned["free"][10][1][1]) <= 0.2 and tuned["zero"][10][1][1] <= -0.3
    for final, by_nfe in tuned.items():
        for nfe, (tuning, _) in by_nfe.items():
            ends_at = tuning.sigmas[-1]
            assert (ends_at > 0) if final == "free" else (ends_at == 0), (final, nfe, tuning.sigmas)


def test_tuning_reports_the_error_against_the_tight_solution_on_held_out_noise(tuned):
    for final, by_nfe in tuned.items():
        for nfe, (tuning, _) in by_nfe.items():
            assert tuning.rmse < 0.5 * tuning.stock_rmse, (final, nfe, tuning.summary())
            assert tuning.entry == "dpmpp-2m-mv" and len(tuning.mean_value_points) == nfe
            assert all(0 <= kappa <= 1 for kappa in tuning.mean_value_points)  # the mean value theorem's range
            assert tuning.sigmas == pytest.approx(tuning.scheduler.sigmas.tolist())


# ---------------------------------------------------------------------------------------------- the diffusers API


class CountingModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, sample, timestep, **kwargs):
        self.calls += 1
        return self.model(sample, timestep, **kwargs)


@pytest.fixture(scope="module")
def small():
    """A small mixture and its exact model, for the API tests (no quality claims)."""
    mixture = GaussianMixture.random((1, 4, 4), 3, rank=2, seed=0)
    return mixture, ExactScoreModel.from_mixture(mixture)


def quick_tune(model, sampler="dpmpp-2m", nfe=4, **options):
    options = {"samples": 8, "max_runs": 20, **options}
    return tune_sampler(model, CONFIG, sampler=sampler, nfe=nfe, sample_shape=(1, 4, 4), **options)


@pytest.mark.parametrize("final", ["zero", "free"])
@pytest.mark.parametrize("sampler, nfe", [("dpmpp-2m", 4), ("euler", 3), ("heun", 5), ("dpmpp-3m", 4)])
def test_the_standard_diffusers_loop_calls_the_model_exactly_nfe_times(small, sampler, nfe, final):
    """With ``final="free"`` a one-evaluation-per-step solver ends at its tuned σ_end > 0; Heun, whose step onto a
    σ > 0 would cost another evaluation, keeps the final 0 and warns so."""
    _, model = small
    keeps_zero = final == "free" and sampler == "heun"
    with pytest.warns(UserWarning, match="one evaluation per step") if keeps_zero else contextlib.nullcontext():
        scheduler, steps = quick_tune(model, sampler, nfe, final=final)
    assert (scheduler.sigmas[-1] > 0) == (final == "free" and not keeps_zero)
    counting = CountingModel(model)
    scheduler.set_timesteps(steps)
    x = torch.randn(16, 1, 4, 4, generator=seeded(0), dtype=torch.float64) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        output = counting(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(output, t, x).prev_sample
    assert counting.calls == nfe
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("final", ["zero", "free"])
def test_a_tuned_scheduler_saves_and_loads_with_diffusers(small, tmp_path, final):
    mixture, model = small
    scheduler, steps = quick_tune(model, final=final)
    scheduler.save_pretrained(tmp_path)
    loaded = type(scheduler).from_pretrained(tmp_path)
    loaded.set_timesteps(steps)
    scheduler.set_timesteps(steps)
    assert torch.equal(loaded.sigmas, scheduler.sigmas)
    assert loaded.config.mean_value_points == scheduler.config.mean_value_points
    latents = torch.randn(8, 1, 4, 4, generator=seeded(1), dtype=torch.float64)
    ours, theirs = (make_pipeline(mixture, s)(batch_size=8, num_inference_steps=steps, latents=latents,
                                              output_type="raw").images for s in (scheduler, loaded))
    assert torch.equal(ours, theirs)


def test_a_tuned_grid_refuses_another_step_count(small):
    scheduler, steps = quick_tune(small[1])
    with pytest.raises(ValueError, match=f"tuned for {steps} steps, not {steps + 1}"):
        scheduler.set_timesteps(steps + 1)


def test_progress_and_stop(small):
    reports = []
    quick_tune(small[1], progress=lambda done, total, best: reports.append((done, total, best)))
    assert [done for done, _, _ in reports] == list(range(1, len(reports) + 1)) and reports[0][1] == 20
    assert all(later <= earlier for (_, _, earlier), (_, _, later) in zip(reports, reports[1:]))
    free = []
    tuning = quick_tune(small[1], final="free", progress=lambda done, total, best: free.append((done, total)))
    counts = [done for done, _ in free]
    (total,) = {total for _, total in free}
    assert total - END_SEARCH_RUNS >= 20 and counts[-1] == total  # the end's spread match is in the total
    # one report per run, the grid search's and then the spread match's, and the bar ends full
    assert counts[:-1] == list(range(1, len(counts))) and len(counts) - 1 > len(tuning.history), counts
    done = []
    with pytest.raises(TuningStopped, match="stopped after 2 of 20"):
        quick_tune(small[1], progress=lambda count, *_: done.append(count), should_stop=lambda: len(done) >= 2)


def test_the_search_starts_from_the_best_standard_grid(small):
    """Each standard grid is a valid start (σ_max first, one σ per step, descending, the final 0); the search scores
    every one of them first and ends no worse than the best."""
    tuning = quick_tune(small[1])
    stock = schedulers.get_sampler("dpmpp-2m").create(CONFIG, final_sigma="zero")
    grids = starting_grids(stock, tuning.steps, "vp")
    assert {"log_snr leading", "karras trailing", "flow leading", "uniform_t trailing"} <= set(grids)
    assert "uniform_t leading" not in starting_grids(stock, tuning.steps, "flow")  # a VP model's own time only
    for name, grid in grids.items():
        assert len(grid) == tuning.steps + 1 and grid[0] == stock.sigma_range()[1] and grid[-1] == 0, name
        assert torch.all(grid[1:] < grid[:-1]), name
    assert tuning.train_rmse <= min(tuning.history[:len(grids)])
    assert len(tuning.history) > len(grids)  # and then searched on from there


@pytest.mark.parametrize("request_options, message", [
    ({"sampler": "ddim"}, "cannot be tuned"),
    ({"sampler": "euler-ancestral"}, "cannot be tuned"),
    ({"nfe": 1}, "nfe must be an integer ≥ 2"),
    ({"nfe": 2.5}, "nfe must be an integer"),
    ({"sampler": "heun", "nfe": 4}, "heun cannot spend exactly 4 evaluations"),
    ({"sampler": "euler", "table": True}, "euler has no mean-value table"),
    ({"weighting": "cosine"}, "weighting must be one of"),
    ({"final": "sigma_min"}, "final must be one of zero, free"),
    ({"samples": 1}, "at least 2 tuning starts"),
    ({"class_labels": [0, 1, 2]}, "class_labels holds 3 labels"),
    ({"model_process": "udm"}, "does not fit"),
])
def test_bad_requests_name_the_problem(small, request_options, message):
    with pytest.raises(ValueError, match=message):
        quick_tune(small[1], **request_options)


def test_the_tight_solutions_last_step_keeps_a_thin_directions_spread():
    """The tight solution's step from σ_min to 0, an Euler step in σ², against the exact ODE on N(0, τ²I): off by
    O(σ_min⁴/τ⁴) of the exact end, where the plain denoise D(x; σ_min) is off by σ_min²/(2τ²). Measured relative
    errors: 0.0011 against 0.047 at τ² = 1e-3 (σ_min = 0.01), 1.4e-5 against 0.005 at τ² = 1e-2."""
    stock = schedulers.get_sampler("dpmpp-2m").create(CONFIG)
    sigma_min, sigma_max = stock.sigma_range()
    for variance, ours, denoised in ((1e-3, 0.003, 0.04), (1e-2, 1e-4, 0.004)):
        gaussian = GaussianMixture(torch.zeros(1, 4), [1.0], torch.eye(4)[:, :1].reshape(1, 4, 1), [[0.0]], variance)
        x = torch.randn(64, 4, generator=seeded(1), dtype=torch.float64) * (1 + sigma_max ** 2) ** 0.5
        tight = TightTrajectory(CountingDenoiser(ExactScoreModel.from_mixture(gaussian), stock), x, sigma_max,
                                sigma_min, 200)
        exact = x * (variance / (variance + sigma_max ** 2)) ** 0.5  # the flow of N(0, (τ² + σ²) I) down to τ²
        ours_error, denoised_error = ((end - exact).norm() / exact.norm() for end in (tight.final, tight.states[-1][1]))
        assert ours_error < ours and denoised_error > denoised, (variance, ours_error, denoised_error)


def test_end_spread_weighs_a_direction_by_how_thin_the_data_are_in_it():
    """On N(0, diag(τ²)) with samples of variance v, E‖x − D(x; σ)‖² = Σ v (σ²/(τ² + σ²))²: a thin direction
    (τ² = 1e-4) counts about 2,500 times as much as a wide one (τ² = 0.1) at σ = 0.01."""
    variances = torch.tensor([1e-4, 0.1], dtype=torch.float64)
    x = torch.randn(20000, 2, generator=seeded(2), dtype=torch.float64) * variances.sqrt()
    sigma = 0.01
    expected = float((variances * (sigma ** 2 / (variances + sigma ** 2)) ** 2).sum())
    assert end_spread(x, lambda y, s: y * variances / (variances + s ** 2), sigma) == pytest.approx(expected, rel=0.03)


def test_the_free_end_leaves_the_tight_solutions_spread():
    """The free end's σ_end is matched to the tight solution's ``end_spread`` (5% on the tuning starts); on other
    starts the ends' spread stays within 15% of the tight solution's. A development mixture (36-d, 7 modes, rank
    4, seed 300), where the error-tuned end alone leaves 29% more (and an NLL gap of +5.3 where the matched end
    gets +0.75)."""
    mixture = GaussianMixture.random((1, 6, 6), 7, rank=4, mode_var=0.1, iso_var=1e-3, seed=300)
    model = ExactScoreModel.from_mixture(mixture)
    scheduler, steps = tune_sampler(model, CONFIG, sampler="dpmpp-2m", nfe=5, sample_shape=(1, 6, 6), seed=800,
                                    final="free")
    denoise = CountingDenoiser(model, scheduler)
    sigma_min, sigma_max = scheduler.sigma_range()
    x = torch.randn(256, 1, 6, 6, generator=seeded(1200), dtype=torch.float64) * (1 + sigma_max ** 2) ** 0.5
    tight = TightTrajectory(denoise, x, sigma_max, sigma_min, 200)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    ratio = end_spread(x, denoise, sigma_min) / end_spread(tight.final, denoise, sigma_min)
    assert abs(math.log(ratio)) <= 0.15, ratio


# ------------------------------------------------------------------------------ tuned schedulers in a model folder


@pytest.fixture
def model_dir(small, tmp_path):
    """A pipeline directory of the small exact model (its weights in unet/*.safetensors)."""
    pipe = DiffusionImagePipeline(small[1], schedulers.DDIMScheduler(), {"process": "vp"})
    pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    return tmp_path / "model"


def test_save_and_load_a_tuned_scheduler_in_its_model_directory(small, model_dir):
    tuning = quick_tune(small[1])
    target = save_tuned(model_dir, tuning)
    assert target == model_dir / "tuned" / tuned_name("dpmpp-2m", 4)
    record = tuned_schedulers(model_dir)["dpmpp-2m-nfe4"]
    assert record["weights_sha256"] == weights_fingerprint(model_dir) and record["steps"] == tuning.steps
    scheduler, steps = load_tuned(model_dir, "dpmpp-2m-nfe4")
    scheduler.set_timesteps(steps)
    assert scheduler.sigmas.tolist() == pytest.approx(tuning.sigmas)
    save_tuned(model_dir, tuning)  # a second tune replaces the first, leaving nothing else behind
    assert [p.name for p in (model_dir / "tuned").iterdir()] == ["dpmpp-2m-nfe4"]


def test_a_free_end_tune_lives_next_to_the_final_zero_one(small, model_dir):
    save_tuned(model_dir, quick_tune(small[1]))
    free = quick_tune(small[1], final="free")
    assert save_tuned(model_dir, free).name == tuned_name("dpmpp-2m", 4, "free") == "dpmpp-2m-nfe4-free"
    assert set(tuned_schedulers(model_dir)) == {"dpmpp-2m-nfe4", "dpmpp-2m-nfe4-free"}
    scheduler, steps = load_tuned(model_dir, "dpmpp-2m-nfe4-free")
    scheduler.set_timesteps(steps)
    assert scheduler.sigmas.tolist() == pytest.approx(free.sigmas) and free.sigmas[-1] > 0
    assert tuned_schedulers(model_dir)["dpmpp-2m-nfe4-free"]["final"] == "free"


def test_a_tuned_scheduler_of_other_weights_or_none_is_refused(small, model_dir):
    save_tuned(model_dir, quick_tune(small[1]))
    with pytest.raises(ValueError, match="no tuned scheduler 'euler-nfe3'; tuned: dpmpp-2m-nfe4"):
        load_tuned(model_dir, "euler-nfe3")
    weights = next((model_dir / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    with pytest.raises(ValueError, match="tuned for other weights"):
        load_tuned(model_dir, "dpmpp-2m-nfe4")


def test_a_save_that_fails_midway_leaves_no_tuned_scheduler(small, model_dir, monkeypatch):
    tuning = quick_tune(small[1])

    def crash(directory, **_):
        (directory / "scheduler_config.json").write_text("{ half")
        raise OSError("disk full")

    monkeypatch.setattr(tuning.scheduler, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_tuned(model_dir, tuning)
    assert tuned_schedulers(model_dir) == {} and list((model_dir / "tuned").iterdir()) == []


# ---------------------------------------------------------------------------------------------- the command line


@pytest.fixture
def unet_dir(tmp_path):
    """A pipeline directory with a tiny random class-conditional diffusers UNet (3 classes, 1×8×8)."""
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                 layers_per_block=1, norm_num_groups=4, num_class_embeds=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    pipe = DiffusionImagePipeline(unet, schedulers.DDIMScheduler(), {"process": "vp", "num_classes": 3})
    pipe.save_pretrained(tmp_path / "unet-model", safe_serialization=True)
    return tmp_path / "unet-model"


def test_the_command_line_writes_the_tuned_scheduler_into_the_model_directory(unet_dir, capsys):
    code = tune.main([str(unet_dir), "--sampler", "euler", "--nfe", "3", "--samples", "3", "--max-runs", "3"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((unet_dir / "tuned" / "euler-nfe3" / "tuning.json").read_text())
    assert record["nfe"] == 3 and record["entry"] == "euler" and record["evaluations"] > 0
    scheduler, steps = load_tuned(unet_dir, "euler-nfe3")
    assert steps == 3 and "RMS error against the tight solution" in capsys.readouterr().out


def test_the_command_line_names_bad_input(unet_dir, small, tmp_path, capsys):
    assert tune.main([str(tmp_path / "nowhere")]) == 2
    assert "not a pipeline directory" in capsys.readouterr().err
    assert tune.main([str(unet_dir), "--nfe", "1"]) == 2
    assert "nfe must be an integer ≥ 2" in capsys.readouterr().err
    exact = tmp_path / "exact"
    DiffusionImagePipeline(small[1], schedulers.DDIMScheduler(), {}).save_pretrained(exact, safe_serialization=True)
    assert tune.main([str(exact)]) == 2
    assert "tuning loads diffusers models only" in capsys.readouterr().err
    assert not (unet_dir / "tuned").exists()
