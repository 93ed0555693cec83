"""Same config, same noise, same model: our DDPM/DDIM trajectories equal diffusers' over a full sampling run.

Three effects are kept apart. (1) Formulas: in float64 our schedulers and diffusers' (given its own ᾱ² table
in float64) agree to the last bit over 1000 steps — every prediction type, spacing, variance, clipping and
thresholding, with the exact model and with a real UNet. (2) Rounding: stock diffusers computes the step
coefficients in float32 — the jump's β_t = 1 − ᾱ²_t/ᾱ²_{t−1} loses three digits at small t — while we use
float64; in float32 DDIM agrees to 1e-5 over a full run, and the larger DDPM gap is diffusers' rounding,
shown against a float64 reference that draws the same noise. With x̂0 clipped, our DDIM always re-derives ε̂ from
the clipped x̂0 (``schedulers/clipping.py``), so it is compared with diffusers' ``use_clipped_model_output=True``;
diffusers' default keeps the model's ε̂ and differs on purpose. (3) Chaos: an untrained UNet makes
deterministic sampling chaotic (a 1e-7 change of x_T moves the 1000-step DDIM result by ~2), so float32
comparisons use the exact model, whose dynamics are tame.
"""

import diffusers
import pytest
import torch

import schedulers
from evaluation.exact import ExactScoreModel

from .conftest import seeded


@torch.no_grad()
def run(scheduler, model, steps, shape=(8, 1, 4, 4), dtype=torch.float64, seed=0, **step_kwargs):
    """A bare sampling loop, the way diffusers' pipelines drive a scheduler; returns the final sample."""
    g = seeded(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=g).to(dtype)
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t).sample, t, x, generator=g, **step_kwargs).prev_sample
    assert torch.isfinite(x).all()
    return x


pytestmark = pytest.mark.usefixtures("single_thread")

def with_float64_table(scheduler):
    """A diffusers scheduler whose coefficients come from its own ᾱ² table held in float64."""
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    return scheduler


def exact_model_for(mixture, scheduler):
    model = ExactScoreModel.from_mixture(mixture, scheduler.config.prediction_type)
    model.schedule = scheduler.schedule  # the model sees the scheduler's process
    return model


@pytest.fixture(scope="module")
def random_unet():
    """A real (untrained) UNet in float64: O(1) outputs everywhere, so clipping and thresholding engage."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).double().eval()


FORMULA_TOLERANCE = 1e-9  # float64; measured ≤ 1e-12

DDPM_CASES = [
    dict(),
    dict(prediction_type="sample", timestep_spacing="trailing"),
    dict(prediction_type="v_prediction", timestep_spacing="linspace"),
    dict(variance_type="fixed_large", prediction_type="v_prediction"),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, thresholding=True, sample_max_value=1.5),
]


@pytest.mark.parametrize("config", DDPM_CASES, ids=str)
@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_formulas_equal_diffusers(mixture, config, steps):
    model = exact_model_for(mixture, schedulers.DDPMScheduler(**config))
    ours = run(schedulers.DDPMScheduler(**config), model, steps)
    theirs = run(with_float64_table(diffusers.DDPMScheduler(**config)), model, steps)
    assert (ours - theirs).abs().max() <= FORMULA_TOLERANCE


DDIM_CASES = [
    (0.0, dict()),
    (0.0, dict(prediction_type="v_prediction", timestep_spacing="trailing", clip_sample=False)),
    (1.0, dict(prediction_type="sample")),
    (0.5, dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2")),
    (0.3, dict(set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction")),
]


@pytest.mark.parametrize("eta, config", DDIM_CASES, ids=str)
@pytest.mark.parametrize("steps", [1000, 50, 10])
def test_ddim_formulas_equal_diffusers(mixture, eta, config, steps):
    if config.get("steps_offset") and steps == 1000:  # timestep 1000 does not exist (diffusers: IndexError)
        with pytest.raises(ValueError, match="steps_offset"):
            schedulers.DDIMScheduler(**config).set_timesteps(steps)
        return
    model = exact_model_for(mixture, schedulers.DDIMScheduler(**config))
    ours = run(schedulers.DDIMScheduler(**config), model, steps, eta=eta)
    theirs = run(with_float64_table(diffusers.DDIMScheduler(**config)), model, steps, eta=eta,
                 use_clipped_model_output=True)
    assert (ours - theirs).abs().max() <= FORMULA_TOLERANCE


@pytest.mark.parametrize("config", [dict(), dict(thresholding=True, sample_max_value=1.5), dict(clip_sample=False)],
                         ids=str)
def test_ddpm_formulas_equal_diffusers_with_a_unet(random_unet, config):
    for steps in [1000, 50]:
        ours = run(schedulers.DDPMScheduler(**config), random_unet, steps, (4, 1, 8, 8))
        theirs = run(with_float64_table(diffusers.DDPMScheduler(**config)), random_unet, steps, (4, 1, 8, 8))
        assert (ours - theirs).abs().max() <= FORMULA_TOLERANCE


@pytest.mark.parametrize("eta", [0.0, 1.0, 0.7])
def test_ddim_formulas_equal_diffusers_with_a_unet(random_unet, eta):
    for steps in [1000, 50]:
        ours = run(schedulers.DDIMScheduler(), random_unet, steps, (4, 1, 8, 8), eta=eta)
        theirs = run(with_float64_table(diffusers.DDIMScheduler()), random_unet, steps, (4, 1, 8, 8), eta=eta,
                     use_clipped_model_output=True)
        assert (ours - theirs).abs().max() <= FORMULA_TOLERANCE


def test_clipped_ddim_differs_from_diffusers_default_on_purpose(random_unet):
    """Diffusers' default steps with the clipped x̂0 and the model's ε̂; ours never does, whatever it is passed."""
    theirs = run(with_float64_table(diffusers.DDIMScheduler()), random_unet, 50, (4, 1, 8, 8))
    for use_clipped in (None, False, True):
        ours = run(schedulers.DDIMScheduler(), random_unet, 50, (4, 1, 8, 8), use_clipped_model_output=use_clipped)
        assert (ours - theirs).abs().max() > 1e-3


STOCK_TOLERANCE = 1e-5  # float32, stock diffusers, a full run; measured ≤ 6e-6


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_stock_float32_diffusers(mixture, eta):
    model = ExactScoreModel.from_mixture(mixture)
    for steps in [1000, 50]:
        ours = run(schedulers.DDIMScheduler(), model, steps, dtype=torch.float32, eta=eta)
        theirs = run(diffusers.DDIMScheduler(), model, steps, dtype=torch.float32, eta=eta,
                     use_clipped_model_output=True)
        assert (ours - theirs).abs().max() <= STOCK_TOLERANCE


def test_ddpm_gap_to_stock_diffusers_is_diffusers_float32_rounding(mixture):
    """With the exact model, float32 stock diffusers drifts ~2e-5 from float64 math; ours stays within 1e-6."""
    model = ExactScoreModel.from_mixture(mixture)

    def float32_outputs(x, t):  # float64 states, float32 outputs: the same noise draws as a float32 run
        return type("Output", (), {"sample": model(x, t).sample.float()})

    reference = run(schedulers.DDPMScheduler(), float32_outputs, 1000)
    ours = run(schedulers.DDPMScheduler(), model, 1000, dtype=torch.float32)
    stock = run(diffusers.DDPMScheduler(), model, 1000, dtype=torch.float32)
    assert (ours - reference).abs().max() <= 1e-6
    assert (stock - reference).abs().max() > 10 * (ours - reference).abs().max()
    assert (ours - stock).abs().max() <= 5e-5


def public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def test_our_scheduler_loads_a_diffusers_config_and_back(tmp_path):
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ours = schedulers.DDIMScheduler.from_config(theirs.config)
    assert ours.config.beta_schedule == "squaredcos_cap_v2" and ours.config.prediction_type == "v_prediction"
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    ours.save_pretrained(tmp_path)
    assert public(schedulers.DDIMScheduler.from_pretrained(tmp_path).config) == public(ours.config)
    assert diffusers.DDIMScheduler.from_config(ours.config).config.prediction_type == "v_prediction"


def test_add_noise_and_velocity_equal_diffusers():
    x0, noise, t = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 10, 500, 998, 999])
    ours, theirs = schedulers.DDPMScheduler(), diffusers.DDPMScheduler()
    assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t), atol=1e-6)
