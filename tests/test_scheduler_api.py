"""The standard diffusers scheduler API on every kind of registered sampler (issue #18, item 2): a grid from
construction on, ``add_noise`` into the scheduler's own state, ``step`` honouring the timestep it is given (img2img
starts mid-grid), the scheduler's own grid given back to ``set_timesteps``, and ValueErrors for bad input."""

import pytest
import torch
from diffusers import EulerDiscreteScheduler

import schedulers
from schedulers.processes import FlowProcess, VPProcess
from schedulers.processes.udm import model_timestep

from .conftest import seeded

ONE_STEP_SOLVERS = ["euler", "heun", "midpoint", "flow-heun", "pfgmpp-euler", "pfgmpp-heun"]
SIGMA_SPACE = [*ONE_STEP_SOLVERS, "dpmpp-2m", "dpmpp-3m", "sde-euler-maruyama", "sde-pc"]


def create(name, **overrides):
    return schedulers.get_sampler(name).create(None, **overrides)


def toy_model(x, t):
    """A deterministic stand-in network output of any parameterization, depending on both x and t."""
    return torch.tanh(x) * 0.5 + torch.as_tensor(t, dtype=x.dtype) / 1000


def run(scheduler, x, timesteps, generator=None):
    """diffusers' loop over ``timesteps``; returns the final sample and the sample before each step."""
    before = []
    for t in timesteps:
        before.append(x)
        output = toy_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x, before


@pytest.mark.parametrize("name", SIGMA_SPACE)
def test_a_new_scheduler_has_a_grid_and_the_standard_attributes(name):
    scheduler = create(name)
    x = torch.ones(2, 1, 4, 4, dtype=torch.float64)
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]).shape == x.shape  # before set_timesteps
    assert scheduler.scale_model_input(x).shape == x.shape
    assert scheduler.init_noise_sigma > 1 and scheduler.order >= 1
    assert "EulerDiscreteScheduler" in [cls.__name__ for cls in scheduler.compatibles]
    assert len(scheduler.betas) == len(scheduler.alphas_cumprod) == scheduler.config.num_train_timesteps
    assert scheduler.step_index is None and scheduler.begin_index is None


@pytest.mark.parametrize("name", ONE_STEP_SOLVERS)
def test_img2img_start_mid_grid_equals_the_tail_of_a_full_run(name):
    scheduler = create(name)
    scheduler.set_timesteps(6)
    x_T = torch.randn(3, 1, 4, 4, generator=seeded(0), dtype=torch.float64) * scheduler.init_noise_sigma
    full, before = run(scheduler, x_T, scheduler.timesteps)
    start = 2 * scheduler.order  # grid step 2, as diffusers' img2img slices: timesteps[t_start * order:]
    # the loop over the tail, step() finding its place from the timestep
    tail, _ = run(scheduler, before[start], scheduler.timesteps[start:])
    torch.testing.assert_close(tail, full, rtol=0, atol=1e-12)
    # diffusers' img2img protocol: set_begin_index, on a fresh grid
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(start)
    assert scheduler.begin_index == start
    tail, _ = run(scheduler, before[start], scheduler.timesteps[start:])
    torch.testing.assert_close(tail, full, rtol=0, atol=1e-12)
    assert scheduler.step_index == len(scheduler.timesteps)


def test_a_multistep_solver_started_mid_grid_is_a_fresh_run_on_the_rest_of_the_grid():
    scheduler = create("dpmpp-2m")
    scheduler.set_timesteps(6)
    x = torch.randn(3, 1, 4, 4, generator=seeded(1), dtype=torch.float64)
    mid, _ = run(scheduler, x, scheduler.timesteps[2:])
    fresh = create("dpmpp-2m")
    fresh.set_timesteps(sigmas=scheduler.sigmas[2:])
    torch.testing.assert_close(mid, run(fresh, x, fresh.timesteps)[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dpmpp-3m", "dpmpp-2m-mv"])
def test_multistep_solvers_start_mid_grid_on_the_grids_own_evaluation_points(name):
    """3M restarts without its extra midpoint evaluation (first order, then 2M, then 3M, as diffusers restarts);
    the mean-value solver goes on with its table's entries from there."""
    table = {"mean_value_points": [0.5] * 6} if name == "dpmpp-2m-mv" else None
    scheduler = schedulers.get_sampler(name).create(table)
    scheduler.set_timesteps(6)
    x = torch.randn(2, 1, 4, 4, generator=seeded(1), dtype=torch.float64)
    begin = len(scheduler.timesteps) - 4  # grid step 2
    scheduler.set_begin_index(begin)
    out, before = run(scheduler, x, scheduler.timesteps[begin:])
    assert len(before) == 4 and torch.isfinite(out).all()
    # inside a grid step (3M's first-step midpoint) no run can start
    if name == "dpmpp-3m":
        with pytest.raises(ValueError, match="start"):
            scheduler.set_begin_index(1)


@pytest.mark.parametrize("name", SIGMA_SPACE)
def test_set_timesteps_takes_back_the_schedulers_own_grid(name):
    scheduler = create(name)
    scheduler.set_timesteps(7)
    sigmas, timesteps = scheduler.sigmas.clone(), scheduler.timesteps.clone()
    assert sigmas[-1] == 0
    scheduler.set_timesteps(sigmas=sigmas)
    assert torch.equal(scheduler.timesteps, timesteps) and torch.equal(scheduler.sigmas, sigmas)
    scheduler.set_timesteps(timesteps=timesteps)
    assert torch.equal(scheduler.timesteps, timesteps) and torch.equal(scheduler.sigmas, sigmas)


def test_timesteps_are_the_grid_points_time_inputs_as_for_diffusers_euler():
    ours, theirs = create("euler"), EulerDiscreteScheduler()
    theirs.set_timesteps(timesteps=[900, 500, 100])
    ours.set_timesteps(timesteps=[900, 500, 100])
    torch.testing.assert_close(ours.sigmas.float(), theirs.sigmas, rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_add_noise_is_the_sigma_space_state_of_the_vp_marginal(t):
    scheduler, ddpm = create("heun"), create("ddpm")
    x0 = torch.randn(4, 1, 4, 4, generator=seeded(2), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=seeded(3), dtype=torch.float64)
    timesteps = torch.full((4,), t)
    x_ve = scheduler.add_noise(x0, noise, timesteps)
    alpha, _ = scheduler.schedule.coefficients(timesteps)
    torch.testing.assert_close(alpha[:, None, None, None] * x_ve, ddpm.add_noise(x0, noise, timesteps))
    torch.testing.assert_close(scheduler.get_velocity(x0, noise, timesteps), ddpm.get_velocity(x0, noise, timesteps))


def test_add_noise_of_a_flow_model_is_the_straight_path_in_sigma_space():
    scheduler = create("flow-heun", model_process="flow", prediction_type="velocity")
    x0 = torch.randn(3, 1, 4, 4, generator=seeded(4), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=seeded(5), dtype=torch.float64)
    time = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    path = FlowProcess("velocity", 1000).training_example(x0, noise, time).network_input
    x_ve = scheduler.add_noise(x0, noise, time * 1000)
    torch.testing.assert_close((1 - time)[:, None, None, None] * x_ve, path)
    with pytest.raises(ValueError, match="VP"):
        scheduler.get_velocity(x0, noise, time * 1000)


def test_add_noise_at_a_grid_timestep_is_what_step_takes_there():
    scheduler = create("euler")
    scheduler.set_timesteps(5)
    x0, noise = torch.zeros(1, 1, 2, 2, dtype=torch.float64), torch.ones(1, 1, 2, 2, dtype=torch.float64)
    for t, sigma in zip(scheduler.timesteps, scheduler.evaluation_sigmas):
        assert torch.equal(scheduler.add_noise(x0, noise, t.reshape(1)), x0 + sigma)


def test_bad_input_gets_a_value_error_naming_it():
    scheduler = create("euler")
    scheduler.set_timesteps(5)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="timestep 123.5 is not"):
        scheduler.step(x, 123.5, x)
    with pytest.raises(ValueError, match="sigmas must be a strictly descending"):
        scheduler.set_timesteps(sigmas=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="timesteps must be"):
        scheduler.set_timesteps(timesteps=[100, 500])
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(5, sigmas=[2.0, 1.0])
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(2)
        scheduler.step(x, scheduler.timesteps[0], x)


def test_rk45_in_a_fixed_step_loop_names_solve():
    scheduler = create("rk45")
    scheduler.set_timesteps(10)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"solve\(model_call, x\)"):
        for t in scheduler.timesteps:  # holds the start only: the loop fails at once instead of returning x
            scheduler.step(toy_model(scheduler.scale_model_input(x, t), t), t, x)
    with pytest.raises(ValueError, match="solve"):
        scheduler.set_timesteps(sigmas=[2.0, 1.0])


def test_ddpm_steps_over_the_training_grid_without_set_timesteps():
    x = torch.randn(2, 1, 4, 4, generator=seeded(6))
    fresh, planned = create("ddpm"), create("ddpm")
    planned.set_timesteps(1000)
    assert torch.equal(fresh.timesteps, planned.timesteps)
    for t in (999, 500, 0):
        a = fresh.step(toy_model(x, t), t, x, generator=seeded(7)).prev_sample
        b = planned.step(toy_model(x, t), t, x, generator=seeded(7)).prev_sample
        assert torch.equal(a, b)


def test_udm_timesteps_and_add_noise_agree_about_units():
    scheduler = create("udm-invertible", udm_operator="noise", num_train_timesteps=200)
    scheduler.set_timesteps(4)
    x0 = torch.randn(2, 1, 4, 4, generator=seeded(8), dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=seeded(9), dtype=torch.float64)
    for t, step in zip(scheduler.timesteps, scheduler.steps):
        torch.testing.assert_close(scheduler.add_noise(x0, noise, t), scheduler.operator.forward(x0, noise, step))
    assert torch.equal(scheduler.timesteps, model_timestep(scheduler.steps[:-1], 200))
    # an oracle x̂0 started mid-grid from add_noise lands on x0 (the invertible noise rule is DDIM)
    x = scheduler.add_noise(x0, noise, scheduler.timesteps[2])
    for t in scheduler.timesteps[2:]:
        x = scheduler.step(x0, t, x).prev_sample
    torch.testing.assert_close(x, x0)
    with pytest.raises(ValueError, match="not time inputs of UDM steps"):
        scheduler.add_noise(x0, noise, 2.5)
    with pytest.raises(ValueError, match="not in this scheduler's timesteps"):
        scheduler.step(x0, 7.0, x0)
    scheduler.set_timesteps(timesteps=scheduler.timesteps)
    assert scheduler.num_inference_steps == 4
    with pytest.raises(ValueError, match="timesteps must descend"):
        scheduler.set_timesteps(timesteps=scheduler.timesteps.flip(0))


def test_vp_process_marginal_is_the_ddpm_add_noise():
    """The one forward process both adapters read: ``VPProcess`` noising equals the DDPM scheduler's add_noise."""
    ddpm = create("ddpm")
    process = VPProcess.from_config(ddpm.config)
    x0, noise, t = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.tensor([5, 400, 990])
    torch.testing.assert_close(process.training_example(x0, noise, t).network_input, ddpm.add_noise(x0, noise, t))


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_vp_schedulers_record_the_step_they_took(name):
    scheduler = create(name)
    scheduler.set_timesteps(10)
    assert scheduler.step_index is None and scheduler.begin_index is None
    scheduler.set_begin_index(4)
    x = torch.randn(1, 1, 4, 4, generator=seeded(10))
    t = scheduler.timesteps[4]
    scheduler.step(toy_model(x, t), t, x, generator=seeded(11))
    assert scheduler.step_index == 5 and scheduler.begin_index == 4
    with pytest.raises(ValueError, match="begin_index"):
        scheduler.set_begin_index(10)
    with pytest.raises(ValueError, match="not in this scheduler's grid"):
        scheduler.step(x, 3, x)
