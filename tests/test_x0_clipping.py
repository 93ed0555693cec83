"""x̂0 clipping and Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) on every sampler
(``schedulers/clipping.py``): declared in every spec, off by default, consistent (the step's ε̂ is the clipped
x̂0's), and working under classifier-free guidance."""

import diffusers
import pytest
import torch

import schedulers
from schedulers.clipping import clip_x0, dynamic_threshold
from schedulers.process import to_x0_and_epsilon
from schedulers.registry import CLIPPING_KNOBS
from tests.conftest import make_pipeline, model_supplies, seeded, supplied_for

STEPS = 5
SUPPLIED = {**model_supplies(STEPS), "udm_prior_mean": [0.0], "udm_prior_std": [1.0]}
RANGE = 0.25  # tighter than the test mixture's data, so that clipping binds on every sampler

pytestmark = pytest.mark.usefixtures("single_thread")


def spec_pipeline(mixture, name, knobs):
    spec = schedulers.get_sampler(name)
    pipe = make_pipeline(mixture, schedulers.DDIMScheduler())
    pipe.register_to_config(model_info={"process": spec.processes[0]})
    step = pipe.set_sampler(name, knobs, supplied_for(spec, SUPPLIED))
    return pipe, step


def x0_estimates(mixture, name, knobs) -> list[torch.Tensor]:
    """Every step's x̂0 of a short run of ``name`` (the adaptive solver's: its final sample, D at σ_min)."""
    pipe, step = spec_pipeline(mixture, name, knobs)
    seen = []
    steps = max(STEPS, schedulers.get_sampler(name).min_steps() or 0)  # the literal Euler–Maruyama entries need more
    out = pipe(batch_size=4, num_inference_steps=steps, generator=seeded(0), output_type="raw", **step,
               callback_on_step_end=lambda p, i, t, kw: seen.append(kw["pred_original_sample"]))
    return seen or [out.images]


# ------------------------------------------------------------------------------------------------ the spec


@pytest.mark.parametrize("name", list(schedulers.SAMPLERS))
def test_every_sampler_declares_clipping_off_by_default(name):
    spec = schedulers.get_sampler(name)
    declared = {knob.name: knob for knob in spec.knobs}
    assert set(CLIPPING_KNOBS) <= set(declared)
    assert all(declared[knob].target == "config" for knob in CLIPPING_KNOBS)
    config = spec.create(SUPPLIED).config
    assert config.clip_sample is False and config.thresholding is False
    assert spec.settings({"clip_sample": True, "clip_sample_range": 2}) == (
        {"clip_sample": True, "clip_sample_range": 2.0}, {})


def test_clipping_is_not_inherited_from_the_model_scheduler():
    """A model shipped with diffusers' default clip_sample=True does not switch clipping on in a registry sampler:
    the knob decides (off until the maintainer measures otherwise)."""
    assert schedulers.get_sampler("ddim").create({"clip_sample": True}).config.clip_sample is False


# ------------------------------------------------------------------------------------------------ the range


@pytest.mark.parametrize("name", list(schedulers.SAMPLERS))
def test_clipped_x0_lies_in_range_on_every_sampler(mixture, name):
    unclipped = torch.stack([x.abs().max() for x in x0_estimates(mixture, name, {})])
    clipped = x0_estimates(mixture, name, {"clip_sample": True, "clip_sample_range": RANGE})
    assert unclipped.max() > RANGE  # clipping binds
    assert all(x.abs().max() <= RANGE for x in clipped)


@pytest.mark.parametrize("name", list(schedulers.SAMPLERS))
def test_thresholded_x0_lies_in_unit_range_on_every_sampler(mixture, name):
    knobs = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 3.0}
    assert all(x.abs().max() <= 1 + 1e-6 for x in x0_estimates(mixture, name, knobs))


def test_dynamic_threshold_by_hand():
    """Per sample: s = the ratio quantile of |x̂0|, at least 1 and at most sample_max_value; clamp to ±s, divide by s."""
    x0 = torch.tensor([[0.5, -3.0, 2.0, 1.0], [0.1, -0.2, 0.3, 0.4]], dtype=torch.float64).reshape(2, 1, 2, 2)
    # sorted |x̂0| [0.5, 1, 2, 3] and [0.1, 0.2, 0.3, 0.4]: the 2/3 quantile is the third value, 2 and 0.3 → s = 2, 1
    expected = torch.tensor([[0.25, -1.0, 1.0, 0.5], [0.1, -0.2, 0.3, 0.4]], dtype=torch.float64).reshape(2, 1, 2, 2)
    assert torch.allclose(dynamic_threshold(x0, 2 / 3, 10.0), expected)
    capped = torch.tensor([0.5, -1.5, 1.5, 1.0], dtype=torch.float64).reshape(1, 2, 2) / 1.5  # s = 2 capped at 1.5
    assert torch.allclose(dynamic_threshold(x0, 2 / 3, 1.5)[0], capped)
    config = {"clip_sample": True, "clip_sample_range": 0.1, "thresholding": True,
              "dynamic_thresholding_ratio": 2 / 3, "sample_max_value": 10.0}
    assert torch.allclose(clip_x0(x0, config), expected)  # thresholding takes precedence over clip_sample

    # each scheduler family's step thresholds x̂0 the same way (an x0-predicting model answers x̂0 itself)
    knobs = {key: value for key, value in config.items() if key != "clip_sample"} | {"prediction_type": "sample"}
    ddim = schedulers.DDIMScheduler(**knobs)
    ddim.set_timesteps(STEPS)
    t = ddim.timesteps[0]
    assert torch.allclose(ddim.step(x0, t, torch.zeros_like(x0)).pred_original_sample, expected)
    udm = schedulers.UDMScheduler(udm_operator="noise", **knobs)
    assert torch.allclose(udm.step(x0, udm.timesteps[0], torch.zeros_like(x0)).pred_original_sample, expected)
    euler = schedulers.get_sampler("euler").create(**knobs)
    euler.set_timesteps(STEPS)
    assert torch.allclose(euler.step(x0, euler.timesteps[0], torch.zeros_like(x0)).pred_original_sample, expected)


# ------------------------------------------------------------------------------------------------ consistency


def test_ddim_steps_with_the_clipped_x0s_epsilon():
    """Deterministic DDIM with clipping: x' = ᾱ' x̂0_c + β̄' ε̂_c with ε̂_c = (x − ᾱ x̂0_c)/β̄, which is diffusers'
    DDIM with ``use_clipped_model_output=True`` (and not its default, which keeps the model's ε̂)."""
    x, eps = torch.randn(2, 2, 1, 4, 4, generator=seeded(1), dtype=torch.float64) * 2
    ours = schedulers.DDIMScheduler(clip_sample=True, clip_sample_range=0.5)
    ours.set_timesteps(10)
    t, t_next = ours.timesteps[2], ours.timesteps[3]
    out = ours.step(eps, t, x)
    (alpha, beta), (alpha_next, beta_next) = ours.coefficients_at(int(t)), ours.coefficients_at(int(t_next))
    x0 = ((x - beta * eps) / alpha).clamp(-0.5, 0.5)
    assert out.pred_original_sample.abs().max() <= 0.5 and torch.allclose(out.pred_original_sample, x0)
    assert torch.allclose((x - alpha * x0) / beta, (out.prev_sample - alpha_next * x0) / beta_next)
    assert torch.allclose(out.prev_sample, alpha_next * x0 + beta_next * (x - alpha * x0) / beta)

    theirs = diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=0.5)
    theirs.set_timesteps(10)
    consistent = theirs.step(eps, t, x, use_clipped_model_output=True).prev_sample
    assert torch.allclose(out.prev_sample, consistent, atol=1e-6)
    assert not torch.allclose(out.prev_sample, theirs.step(eps, t, x).prev_sample, atol=1e-2)
    # the argument diffusers' DDIMPipeline passes changes nothing
    assert torch.equal(ours.step(eps, t, x, use_clipped_model_output=False).prev_sample, out.prev_sample)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_steps_with_the_clipped_denoiser(prediction_type):
    """Euler in σ with clipping: x' = x + (σ' − σ)(x − D_c)/σ, so the implied ε̂ = (x' − x)/(σ' − σ) is
    (x − D_c)/σ with D_c the clipped decoding of the model output."""
    euler = schedulers.get_sampler("euler").create(prediction_type=prediction_type, clip_sample=True,
                                                   clip_sample_range=0.5)
    euler.set_timesteps(10)
    sigma, sigma_next = euler.sigmas[3], euler.sigmas[4]
    x, output = torch.randn(2, 2, 1, 4, 4, generator=seeded(2), dtype=torch.float64) * 2
    x = x * sigma
    out = euler.step(output, euler.timesteps[3], x)
    denoised = euler.process.denoised(output, x, sigma).clamp(-0.5, 0.5)
    assert torch.allclose(out.pred_original_sample, denoised)
    assert torch.allclose((out.prev_sample - x) / (sigma_next - sigma), (x - denoised) / sigma)


def test_off_leaves_every_decoding_bit_identical():
    """Off (the default, or said explicitly), x̂0 and ε̂ are the model's own, to the bit."""
    x, output = torch.randn(2, 2, 1, 4, 4, generator=seeded(3)) * 3
    for scheduler in (schedulers.DDIMScheduler(clip_sample=False), schedulers.DDPMScheduler(clip_sample=False)):
        t = int(scheduler.timesteps[500])
        alpha, beta = scheduler.coefficients_at(t)
        for got, want in zip(scheduler.predict_x0_and_epsilon(output, t, x),
                             to_x0_and_epsilon("epsilon", output, x, alpha, beta)):
            assert torch.equal(got, want)
    for name in ("euler", "heun", "dpmpp-2m", "sde-euler-maruyama"):
        default, explicit = (schedulers.get_sampler(name).create(**knobs) for knobs in ({}, {"clip_sample": False}))
        for scheduler in (default, explicit):
            scheduler.set_timesteps(STEPS)
        t = default.timesteps[1]
        sigma = default.evaluation_sigmas[1]
        assert torch.equal(default.denoised(output, x, sigma), default.process.denoised(output, x, sigma))
        steps = [s.step(output, t, x, generator=seeded(4)).prev_sample for s in (default, explicit)]
        assert torch.equal(*steps)


# ------------------------------------------------------------------------------------------------ with CFG


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "heun", "dpmpp-2m", "sde-euler-maruyama"])
def test_clipping_with_classifier_free_guidance(class_mixture, name):
    """At guidance 3 the guided x̂0 leaves [−1, 1]; clipped, every step's x̂0 and the raw output stay inside it."""
    def run(knobs):
        pipe = make_pipeline(class_mixture, schedulers.DDIMScheduler())
        pipe.register_to_config(model_info={"process": "vp"})
        step = pipe.set_sampler(name, knobs)
        seen = []
        steps = max(10, schedulers.get_sampler(name).min_steps() or 0)
        out = pipe(batch_size=6, num_inference_steps=steps, class_labels=[0, 1, 2, 0, 1, 2], guidance_scale=3.0,
                   generator=seeded(5), output_type="raw", **step,
                   callback_on_step_end=lambda p, i, t, kw: seen.append(kw["pred_original_sample"]))
        return out.images, torch.stack(seen)

    images, x0s = run({})
    assert x0s.abs().max() > 1
    images, x0s = run({"clip_sample": True})
    assert x0s.abs().max() <= 1 and images.abs().max() <= 1 + 1e-6
    images, x0s = run({"thresholding": True, "sample_max_value": 10.0})
    assert x0s.abs().max() <= 1 + 1e-6 and images.abs().max() <= 1 + 1e-6


def test_ddim_with_guidance_is_one_hand_computed_step(class_mixture):
    """A clipped DDIM step under CFG: the guided ε̂ = ε_u + w (ε_c − ε_u) decodes to x̂0, which is clipped, and the
    step uses ε̂ recomputed from the clipped x̂0."""
    pipe = make_pipeline(class_mixture, schedulers.DDIMScheduler())
    pipe.register_to_config(model_info={"process": "vp"})
    pipe.set_sampler("ddim", {"clip_sample": True})
    steps, original_step = [], pipe.scheduler.step

    def recorded_step(output, t, x, **kwargs):
        steps.append((output, t, x, original_step(output, t, x, **kwargs)))
        return steps[-1][3]

    pipe.scheduler.step = recorded_step
    labels = torch.tensor([0, 1, 2])
    pipe(batch_size=3, num_inference_steps=4, class_labels=labels, guidance_scale=3.0, generator=seeded(6),
         output_type="raw")
    output, t, x, out = steps[1]
    model = pipe.unet
    cond = model(x, t, class_labels=labels).sample
    uncond = model(x, t, class_labels=torch.full_like(labels, pipe.null_class_id)).sample
    assert torch.allclose(output, uncond + 3.0 * (cond - uncond), atol=1e-6)
    alpha, beta = pipe.scheduler.coefficients_at(int(t))
    alpha_next, beta_next = pipe.scheduler.coefficients_at(int(steps[2][1]))
    x0 = ((x - beta * output) / alpha).clamp(-1, 1)
    assert (x - beta * output).div(alpha).abs().max() > 1  # guidance pushed x̂0 out: clipping acted
    assert torch.allclose(out.prev_sample, alpha_next * x0 + beta_next * (x - alpha * x0) / beta, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad values


BAD = [({"clip_sample": "dynamic"}, "clip_sample must be True or False"),
       ({"thresholding": 1}, "thresholding must be True or False"),
       ({"clip_sample_range": 0.0}, r"clip_sample_range must be in \(0, inf\), got 0"),
       ({"clip_sample_range": -1.0}, r"clip_sample_range must be in \(0, inf\)"),
       ({"dynamic_thresholding_ratio": 1.0}, r"dynamic_thresholding_ratio must be in \(0, 1\), got 1"),
       ({"dynamic_thresholding_ratio": 0.0}, r"dynamic_thresholding_ratio must be in \(0, 1\)"),
       ({"sample_max_value": 0.5}, r"sample_max_value must be in \[1, inf\]")]


@pytest.mark.parametrize("knobs, message", BAD)
@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "rk45", "sde-pc", "pfgmpp-heun", "udm-improved"])
def test_a_bad_value_names_the_option(name, knobs, message):
    spec = schedulers.get_sampler(name)
    with pytest.raises(ValueError, match=message):
        spec.settings(knobs)
    with pytest.raises(ValueError, match=message):
        spec.scheduler_class(**({"udm_operator": "noise", "prediction_type": "sample"} if name.startswith("udm")
                                else {}), **knobs)
