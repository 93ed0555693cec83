"""The VP process math: schedules, σ-space maps and conversions between parameterizations."""

import diffusers
import pytest
import torch

from schedulers.process import (
    PREDICTION_TYPES,
    VPSchedule,
    convert,
    make_betas,
    spaced_timesteps,
    target_from_x0_and_epsilon,
    to_x0_and_epsilon,
)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedules_equal_diffusers(name):
    theirs = diffusers.DDPMScheduler(beta_schedule=name, beta_start=0.00085 if name == "scaled_linear" else 1e-4,
                                     beta_end=0.012 if name == "scaled_linear" else 0.02)
    ours = make_betas(name, 1000, theirs.config.beta_start, theirs.config.beta_end)
    assert torch.equal(ours, theirs.betas)


def test_cosine_is_an_alias_of_squaredcos_cap_v2():
    assert torch.equal(make_betas("cosine", 1000), make_betas("squaredcos_cap_v2", 1000))


def test_su_schedule_matches_the_spec_table():
    """Su's per-step α_t = sqrt(1 − 0.02 t/T): ᾱ_t (his notation, = sqrt(alphas_cumprod)) from the spec's table."""
    alpha_bar, _ = VPSchedule(make_betas("su", 1000)).coefficients(torch.arange(1000))
    table = {1: 0.999990, 10: 0.99945, 100: 0.95072, 200: 0.81769, 500: 0.28459, 900: 0.01692, 1000: 0.006482}
    for t, value in table.items():
        assert alpha_bar[t - 1].item() == pytest.approx(value, rel=2e-4, abs=2e-6)
    # Su's continuous approximation ᾱ(s) = exp(−5 s²), maximum error 1.9e-3 (spec §1.1).
    s = torch.arange(1, 1001, dtype=torch.float64) / 1000
    assert (alpha_bar - torch.exp(-5 * s**2)).abs().max().item() == pytest.approx(1.9e-3, abs=2e-4)


def test_fractional_timesteps_interpolate_monotonically_and_invert():
    schedule = VPSchedule(make_betas("linear", 1000))
    t = torch.linspace(0, 999, 5001, dtype=torch.float64)
    sigma = schedule.sigma(t)
    assert torch.all(sigma[1:] > sigma[:-1])
    integer = torch.arange(1000)
    assert torch.allclose(schedule.alpha_cumprod(integer.double()), schedule.alphas_cumprod.double())
    assert torch.allclose(schedule.timestep_of_sigma(sigma), t, atol=1e-8)
    # Between integer steps log σ is linear in t (k-diffusion's and diffusers' convention).
    mid = schedule.sigma(torch.tensor([10.5, 700.25], dtype=torch.float64)).log()
    ends = schedule.sigma(torch.tensor([10.0, 11.0, 700.0, 701.0], dtype=torch.float64)).log()
    assert torch.allclose(mid, torch.stack([0.5 * (ends[0] + ends[1]), 0.75 * ends[2] + 0.25 * ends[3]]))
    # log-SNR is −2 log σ and crosses 0 where ᾱ² = ½.
    crossing = schedule.timestep_of_sigma(torch.tensor(1.0))
    assert schedule.alpha_cumprod(crossing).item() == pytest.approx(0.5, rel=1e-9)
    assert schedule.log_snr(crossing).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("from_type", PREDICTION_TYPES)
@pytest.mark.parametrize("to_type", PREDICTION_TYPES)
def test_every_parameterization_converts_to_every_other(from_type, to_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, 5, generator=g,
                                                                                 dtype=torch.float64)
    for alpha, beta in [(torch.tensor([0.9, 0.3, 0.05]), torch.tensor([0.44, 0.95, 0.999])),  # VP-like
                        (torch.tensor(1.0), torch.tensor(7.0)),  # VE
                        (torch.tensor(0.75), torch.tensor(0.25))]:  # flow, t = 0.25
        x = alpha.reshape(-1, 1, 1, 1) * x0 + beta.reshape(-1, 1, 1, 1) * eps
        source = target_from_x0_and_epsilon(from_type, x0, eps, alpha, beta)
        expected = target_from_x0_and_epsilon(to_type, x0, eps, alpha, beta)
        assert torch.allclose(convert(source, from_type, to_type, x, alpha, beta), expected, atol=1e-9)
        back_x0, back_eps = to_x0_and_epsilon(from_type, source, x, alpha, beta)
        assert torch.allclose(back_x0, x0, atol=1e-9) and torch.allclose(back_eps, eps, atol=1e-9)


def test_v_prediction_and_velocity_have_their_textbook_forms():
    """VP: v = ᾱ ε − β̄ x0 (diffusers' get_velocity); flow (ᾱ = 1 − t, β̄ = t): u = ε − x0, x0 = x − t u."""
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    acp = torch.tensor(0.3)
    v = target_from_x0_and_epsilon("v_prediction", x0, eps, acp.sqrt(), (1 - acp).sqrt())
    assert torch.allclose(v, acp.sqrt() * eps - (1 - acp).sqrt() * x0, atol=1e-6)
    t = torch.tensor(0.25)
    x_flow = (1 - t) * x0 + t * eps
    u = eps - x0
    rec_x0, _ = to_x0_and_epsilon("velocity", u, x_flow, 1 - t, t)
    assert torch.allclose(rec_x0, x_flow - t * u, atol=1e-6)


def test_unknown_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown beta_schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        convert(torch.zeros(1), "epsilon", "noise", torch.zeros(1), 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown timestep_spacing"):
        spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="num_inference_steps"):
        spaced_timesteps(1000, 1001, "leading")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 1000])
def test_timestep_spacings_equal_diffusers(spacing, steps):
    offset = 1 if spacing == "leading" and steps < 1000 else 0  # an offset past step 999 is an error (tested)
    theirs = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    theirs.set_timesteps(steps)
    offset = theirs.config.steps_offset
    assert torch.equal(spaced_timesteps(1000, steps, spacing, offset), theirs.timesteps)
