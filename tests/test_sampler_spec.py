"""The sampler spec as the one contract: declared knobs (ranges, defaults, where they go), the fit check, the NFE
traced from ``set_timesteps`` — and the pipeline and the app reading all of it from there."""

import inspect

import pytest
import torch

import schedulers
from pipelines.diffusion import MAX_GUIDANCE
from schedulers.registry import KNOBS, MAX_STEPS, NOISE_KNOBS, Knob, step_knobs
from tests.conftest import make_pipeline, seeded, supplied_for
from webui import compare, generate

STEPS = 5
# What a model would supply for the samplers that require it (the values only need the right shape here).
SUPPLIED = {"clip_sample": False, "eps_second_moment": [1.0] * 1000, "mean_value_points": [0.5] * STEPS,
            "udm_prior_mean": [0.0], "udm_prior_std": [1.0], "consistency_objective": "consistency-distillation",
            "mean_flow_objective": "mean-flow"}


def spec_pipeline(mixture, name):
    """A pipeline around the exact model, recording the first process ``name`` drives, with ``name`` set in."""
    spec = schedulers.get_sampler(name)
    pipe = make_pipeline(mixture, schedulers.DDIMScheduler())
    pipe.register_to_config(model_info={"process": spec.processes[0]})
    pipe.set_sampler(name, {}, supplied_for(spec, SUPPLIED))
    return pipe


def counted_calls(pipe) -> list:
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    return calls


# ------------------------------------------------------------------------------------------------ NFE


@pytest.mark.parametrize("name", list(schedulers.SAMPLERS))
def test_traced_nfe_is_the_number_of_model_calls(mixture, name):
    """``spec.nfe(n)`` equals what a run really costs, for every sampler; the adaptive one reports it after."""
    pipe = spec_pipeline(mixture, name)
    calls = counted_calls(pipe)
    spec = schedulers.get_sampler(name)
    steps = max(STEPS, spec.min_steps(SUPPLIED) or STEPS)  # an entry with a min_nfe is refused fewer steps
    out = pipe(batch_size=1, num_inference_steps=steps, generator=seeded(0), output_type="raw")
    expected = spec.nfe(steps, SUPPLIED)
    if spec.adaptive:
        assert expected is None
        expected = pipe.scheduler.nfe_spent
    assert len(calls) == out.nfe == expected


def test_nfe_counts_the_extra_first_and_last_evaluations():
    assert schedulers.get_sampler("dpmpp-3m").nfe(10) == 11  # its first step costs 2
    assert schedulers.get_sampler("heun").nfe(10) == 19  # the last step into σ = 0 is an Euler step
    assert schedulers.get_sampler("ddim").nfe(10) == 10
    assert schedulers.get_sampler("sde-pc").nfe(10) == 2 * 10 - 1  # one corrector move per step but the last


def test_min_nfe_refuses_shorter_runs(mixture):
    """An entry's ``min_nfe`` (Euler–Maruyama's, say) is the fewest evaluations the pipeline runs it at."""
    spec = schedulers.get_sampler("sde-euler-maruyama")
    assert spec.min_nfe == 20 and spec.min_steps() == 20 and schedulers.get_sampler("sde-pc").min_steps() == 21
    with pytest.raises(ValueError, match="needs at least 20 evaluations"):
        spec.steps_within(10)
    pipe = spec_pipeline(mixture, "sde-euler-maruyama")
    with pytest.raises(ValueError, match=r"in \[20, .*sde-euler-maruyama needs at least 20 evaluations"):
        pipe(batch_size=1, num_inference_steps=10)
    pipe.scheduler = spec.create()  # a scheduler set by hand: the caller's choice, not the entry's floor
    assert pipe(batch_size=1, num_inference_steps=10, output_type="raw").nfe == 10


def test_steps_within_a_budget_is_the_longest_run_that_fits():
    assert schedulers.get_sampler("heun").steps_within(10) == (5, 9)
    assert schedulers.get_sampler("dpmpp-3m").steps_within(10) == (9, 10)
    assert schedulers.get_sampler("ddim").steps_within(10) == (10, 10)


# ------------------------------------------------------------------------------------------------ knobs


def test_knob_errors_name_the_knob():
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        schedulers.get_sampler("ddim").settings({"eta": 1.5})
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 1\], got -0.1"):
        schedulers.get_sampler("noise-level").settings({"noise_level": -0.1})
    with pytest.raises(ValueError, match="corrector_steps must be a whole number"):
        schedulers.get_sampler("sde-pc").settings({"corrector_steps": 1.5})
    with pytest.raises(ValueError, match="rtol must be a finite number"):
        schedulers.get_sampler("rk45").settings({"rtol": float("nan")})
    with pytest.raises(ValueError, match="sampler 'heun' has no knob 'eta'"):
        schedulers.get_sampler("heun").settings({"eta": 0.5})
    with pytest.raises(ValueError, match=r"η / noise level must be in \[0, 1\]"):
        KNOBS["eta"].check(2.0, "η / noise level")


def test_settings_split_knobs_by_target():
    assert schedulers.get_sampler("ddim").settings({"eta": 0.3}) == ({}, {"eta": 0.3})
    assert schedulers.get_sampler("sde-pc").settings({"noise_level": 0.5, "corrector_steps": 2}) == (
        {"noise_level": 0.5, "corrector_steps": 2}, {})
    assert schedulers.get_sampler("ddim").settings({"eta": None}) == ({}, {})  # unset: the default


def test_knob_defaults_make_the_entry():
    assert schedulers.get_sampler("ddim-eta1").create().config.eta == 1.0
    assert schedulers.get_sampler("ddim").create().config.eta == 0.0
    pc = schedulers.get_sampler("sde-pc").create()
    assert (pc.config.noise_level, pc.config.corrector_steps) == (1.0, 1)
    assert schedulers.get_sampler("noise-level").create(noise_level=0.2).config.noise_level == 0.2


@pytest.mark.parametrize("name", list(schedulers.SAMPLERS))
def test_declared_knobs_are_what_the_scheduler_takes(name):
    """A config knob is a constructor argument, a step knob a ``step`` argument; each default is in range, and a
    sampler has at most one noise knob."""
    spec = schedulers.get_sampler(name)
    for knob in spec.knobs:
        assert isinstance(knob, Knob) and knob.low <= knob.default <= knob.high
        method = spec.scheduler_class.__init__ if knob.target == "config" else spec.scheduler_class.step
        assert knob.name in inspect.signature(method).parameters, (name, knob.name)
        assert (knob.low, knob.high, knob.target) == (KNOBS[knob.name].low, KNOBS[knob.name].high,
                                                      KNOBS[knob.name].target)
    assert sum(knob.name in NOISE_KNOBS for knob in spec.knobs) <= 1


def test_every_entry_of_a_class_declares_the_same_step_knobs():
    assert set(step_knobs(schedulers.DDIMScheduler())) == {"eta"}
    assert step_knobs(schedulers.DDPMScheduler()) == {}
    with pytest.raises(ValueError, match="other step knobs"):
        schedulers.register("ddim-without-eta", family="ddim", stochastic=False)(schedulers.DDIMScheduler)
    assert "ddim-without-eta" not in schedulers.SAMPLERS


# ------------------------------------------------------------------------------------------------ fit


def test_one_fit_check_says_why():
    analytic = schedulers.get_sampler("analytic-ddpm")
    assert analytic.unfit_reason("vp", {}).startswith("it needs eps_second_moment from the model: run")
    assert analytic.unfit_reason("vp", {"eps_second_moment": [1.0]}) is None
    with pytest.raises(ValueError, match="sampler ddim does not fit m: it cannot drive a model trained on the 'flow'"):
        schedulers.get_sampler("ddim").check_fits("flow", {}, "m")
    assert analytic.available_for("vp", {"eps_second_moment": [1.0]}) and not analytic.available_for("vp", {})
    with pytest.raises(ValueError, match="sampler 'analytic-ddpm' needs eps_second_moment"):
        analytic.create({})


# ------------------------------------------------------------------------------------------------ the pipeline


def test_pipeline_validates_a_request_against_the_spec(mixture):
    pipe = make_pipeline(mixture, schedulers.DDIMScheduler())
    pipe.register_to_config(model_info={"process": "vp"})
    assert pipe.set_sampler("ddim-eta1", {"eta": 0.5}) == {"eta": 0.5}
    assert type(pipe.scheduler) is schedulers.DDIMScheduler and pipe.scheduler.config.eta == 1.0
    assert pipe.set_sampler("noise-level", {"noise_level": 0.25}) == {}
    assert pipe.scheduler.config.noise_level == 0.25
    with pytest.raises(ValueError, match="noise_level must be in"):
        pipe.set_sampler("noise-level", {"noise_level": 3})
    with pytest.raises(ValueError, match="cannot drive a model trained on the 'vp' process"):
        pipe.set_sampler("pfgmpp-heun")
    with pytest.raises(ValueError, match="needs eps_second_moment"):
        pipe.set_sampler("analytic-ddim")
    with pytest.raises(ValueError, match=rf"num_inference_steps must be in \[1, {MAX_STEPS}\]"):
        pipe(num_inference_steps=MAX_STEPS + 1)
    with pytest.raises(ValueError, match=rf"guidance_scale must be in \[-{MAX_GUIDANCE:g}, {MAX_GUIDANCE:g}\]"):
        pipe(num_inference_steps=2, guidance_scale=2 * MAX_GUIDANCE)


def test_a_step_knob_reaches_step(mixture):
    """η through the call or through set_sampler's returned step knobs: the same samples."""
    pipe = make_pipeline(mixture, schedulers.DDIMScheduler())
    step = pipe.set_sampler("ddim", {"eta": 0.7}, {"clip_sample": False})
    a = pipe(batch_size=2, num_inference_steps=4, generator=seeded(0), output_type="raw", **step).images
    pipe.scheduler = schedulers.DDIMScheduler(clip_sample=False, eta=0.7)
    b = pipe(batch_size=2, num_inference_steps=4, generator=seeded(0), output_type="raw").images
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ the app


def test_the_noise_slider_comes_from_the_spec():
    eta1 = generate.noise_settings("ddim-eta1")
    knob = schedulers.get_sampler("ddim-eta1").noise_knob
    assert eta1 == {"visible": True, "label": knob.label, "minimum": knob.low, "maximum": knob.high, "value": 1.0}
    assert generate.noise_settings("noise-level")["value"] == 0.5
    assert generate.noise_settings("noise-level")["label"] == KNOBS["noise_level"].label
    assert generate.noise_settings("heun")["visible"] is False and generate.noise_settings(None)["visible"] is False


def test_the_ui_limits_are_the_declared_ones():
    assert compare.AXES["steps"][2] == (1, MAX_STEPS)
    assert compare.AXES["guidance scale"][2] == (-MAX_GUIDANCE, MAX_GUIDANCE)
    assert compare.AXES["η / noise level"][2] == (0.0, 1.0)
