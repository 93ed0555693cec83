"""Diffusers' common scheduler tests, ported, over every registered sampler (issue #18, item 1).

The generic checks of diffusers 0.42.1's ``tests/schedulers/test_schedulers.py`` (``SchedulerCommonTest``) and of
its DDIM, DDPM, Euler, Heun and DPM-multistep files, rewritten as one parametrized module: config round trips,
``from_config`` across compatible schedulers, step shapes, ``return_dict`` equivalence, ``scale_model_input``,
``add_noise`` with a batch of grid timesteps, ``set_timesteps`` with any step count and with the scheduler's own
grid (and a ValueError for one out of order), ``trained_betas``, attribute access, deprecated kwargs, seeded
determinism. Stock diffusers schedulers run as controls and pass everything.

Diffusers' full-loop regression sums are replaced by an exact check: for data that is a single point x0 the
denoiser is exactly x0, the probability-flow path from ``add_noise(x0, ε, t_k)`` is ``add_noise(x0, ε, t)`` at
every later grid point, and every deterministic sampler integrates it without error (D is constant along it).
Starting at grid point k, as img2img does, each step must therefore land on ``add_noise`` at the next grid
timestep, and the run on x0; a stochastic sampler must still end on x0.

A sampler skips a check only where its registry entry declares, in ``SamplerSpec.deliberate``, why it differs on
purpose (listed in docs/architecture.md, "Deliberate differences").
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from schedulers import SAMPLERS
from schedulers.process import target_from_x0_and_epsilon
from schedulers.processes import PROCESSES

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_STEPS = 6  # every run's num_inference_steps (dpmpp-2m-mv's table is fitted for it)
T = 100  # training steps: tiny, as a σ-space scheduler traces a grid of all T at construction
CONTROLS = {f"diffusers-{cls.__name__}": cls for cls in (
    diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.EulerDiscreteScheduler,
    diffusers.HeunDiscreteScheduler, diffusers.DPMSolverMultistepScheduler)}
ENTRIES = [*SAMPLERS, *CONTROLS]
TORCH_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # diffusers' tests' torch_device
ADAPTIVE = [name for name, spec in SAMPLERS.items() if spec.adaptive]
# Diffusers' per-scheduler config sweeps (test_timesteps, test_betas, test_schedules, test_prediction_type).
CONFIG_VARIANTS = [{}, {"num_train_timesteps": 50, "beta_start": 0.001, "beta_end": 0.03},
                   {"beta_schedule": "scaled_linear"}]
# The prediction type is the trained model's process's, so only VP models vary it.
PREDICTION_VARIANTS = [{"prediction_type": "v_prediction"}]


# ------------------------------------------------------------------------------------------------ building


def process_of(name: str) -> str:
    return "vp" if name in CONTROLS else SAMPLERS[name].processes[0]


def is_stochastic(name: str) -> bool:
    """Whether the entry draws fresh noise while sampling (of the controls, DDPM)."""
    return name == "diffusers-DDPMScheduler" or name in SAMPLERS and SAMPLERS[name].stochastic


def model_config(name: str, process: str | None = None, **overrides) -> dict:
    """The scheduler config of a model the entry drives, trained on ``process`` (default: the entry's first): the
    process's keys, plus what the entry requires."""
    spec = SAMPLERS[name]
    config = {**PROCESSES[process or spec.processes[0]].config_defaults, "num_train_timesteps": T, **overrides}
    if "eps_second_moment" in spec.requires:
        config["eps_second_moment"] = [0.9] * config["num_train_timesteps"]
    if "mean_value_points" in spec.requires:
        config["mean_value_points"] = [0.5] * NUM_STEPS
    if "consistency_objective" in spec.requires:
        config["consistency_objective"] = "consistency-distillation"
    if "mean_flow_objective" in spec.requires:
        config["mean_flow_objective"] = "mean-flow"
    return config


def make(name: str, process: str | None = None, **overrides):
    """A fresh scheduler for the entry (a registered sampler or a diffusers control, whose process is VP)."""
    if name in CONTROLS:
        return CONTROLS[name](**{"num_train_timesteps": T, **overrides})
    return SAMPLERS[name].create(model_config(name, process, **overrides))


@pytest.fixture(autouse=True)
def deliberate_differences(request):
    """Skip a check (a test's name without ``test_``) for an entry only where its spec's ``deliberate`` says why
    the sampler differs from diffusers there on purpose; controls declare nothing."""
    name = getattr(request.node, "callspec", None) and request.node.callspec.params.get("name")
    check = request.node.originalname.removeprefix("test_")
    why = SAMPLERS[name].deliberate.get(check) if name in SAMPLERS else None
    if why is not None:
        pytest.skip(f"deliberate difference of {name}: {why}")


def dummy_sample(batch: int = 4) -> torch.Tensor:
    return torch.rand((batch, 3, 8, 8), generator=torch.Generator().manual_seed(0))


def dummy_sample_deter() -> torch.Tensor:
    """Diffusers' deterministic sample: 0 … 1 spread over (4, 3, 8, 8)."""
    n = 4 * 3 * 8 * 8
    return (torch.arange(n) / n).reshape(3, 8, 8, 4).permute(3, 0, 1, 2)


def dummy_model(sample: torch.Tensor, t) -> torch.Tensor:
    """Diffusers' dummy model, x t/(t + 1)."""
    t = torch.as_tensor(t, dtype=sample.dtype, device=sample.device)
    return sample * t / (t + 1)


def step_kwargs(scheduler, seed: int | None = 0) -> dict:
    """A seeded generator for ``step`` where it takes one (stochastic schedulers draw from it)."""
    if seed is not None and "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator().manual_seed(seed)}
    return {}


def run_loop(scheduler, model, sample, begin: int = 0, seed: int = 0, each_step=None) -> torch.Tensor:
    """Diffusers' sampling loop from grid index ``begin`` (``set_begin_index`` where it exists, as its img2img
    pipelines do): scale the input, call the model, step. ``each_step(i, prev_sample)`` sees every result."""
    if begin and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    kwargs = step_kwargs(scheduler, seed)
    for i, t in enumerate(scheduler.timesteps[begin:], start=begin):
        output = model(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(output, t, sample, **kwargs).prev_sample
        if each_step is not None:
            each_step(i, sample)
    return sample


def fresh_grid(name: str, process: str | None = None, **overrides):
    scheduler = make(name, process, **overrides)
    scheduler.set_timesteps(NUM_STEPS)
    return scheduler


def case_id(value):
    """Test ids: a config variant as its keys and values ("default" when empty)."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "default"
    return None


def round_trip(scheduler):
    with tempfile.TemporaryDirectory() as directory:
        scheduler.save_pretrained(directory)
        return type(scheduler).from_pretrained(directory)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name, config", [
    (name, config) for name in ENTRIES
    for config in CONFIG_VARIANTS + (PREDICTION_VARIANTS if process_of(name) == "vp" else [])], ids=case_id)
def test_save_load_gives_equal_steps(name, config):
    """check_over_configs / test_from_save_pretrained: a saved and reloaded scheduler steps identically, over
    diffusers' sweeps of training steps, betas, schedules and prediction types."""
    scheduler = make(name, **config)
    reloaded = round_trip(scheduler)
    sample = dummy_sample()
    outputs = []
    for each in (scheduler, reloaded):
        each.set_timesteps(NUM_STEPS)
        t = each.timesteps[0]
        each.scale_model_input(sample, t)
        outputs.append(each.step(0.1 * sample, t, sample, **step_kwargs(each)).prev_sample)
    assert torch.sum(torch.abs(outputs[0] - outputs[1])) < 1e-5


@pytest.mark.parametrize("name", ENTRIES)
def test_from_pretrained_config(name):
    """test_from_pretrained: save_pretrained → from_pretrained keeps the config; from_config rebuilds it."""
    scheduler = make(name)
    reloaded = round_trip(scheduler)
    config = dict(scheduler.config)
    config.pop("_use_default_values", None)
    assert config == reloaded.config
    rebuilt = type(scheduler).from_config(scheduler.config)
    assert {k: v for k, v in rebuilt.config.items() if k != "_use_default_values"} == config


@pytest.mark.parametrize("name", ENTRIES)
def test_compatibles(name):
    """test_compatibles: every compatible class builds from this config, and the config survives the trip back."""
    scheduler = make(name)
    assert len(scheduler.compatibles) > 0, f"{name}: no compatible schedulers"
    assert all(cls is not None for cls in scheduler.compatibles)
    for compatible in scheduler.compatibles:
        if compatible.__module__.startswith("diffusers.utils.dummy_"):
            continue  # a placeholder for a backend that is not installed (torchsde)
        other = compatible.from_config(scheduler.config)
        back = type(scheduler).from_config(other.config)
        same = {k: v for k, v in back.config.items() if k in scheduler.config}
        extra = {k for k in back.config if k not in scheduler.config}
        assert same == dict(scheduler.config), f"{name} → {compatible.__name__} → back changed the config"
        assert not extra & set(inspect.signature(type(scheduler).__init__).parameters)


@pytest.mark.parametrize("name", ENTRIES)
def test_trained_betas_round_trip(name):
    """test_trained_betas: a scheduler built on ``trained_betas`` keeps its betas through save/load."""
    betas = np.linspace(1e-4, 0.02, T)
    scheduler = make(name, trained_betas=betas)
    reloaded = round_trip(scheduler)
    assert torch.as_tensor(scheduler.betas).tolist() == torch.as_tensor(reloaded.betas).tolist()
    assert np.allclose(torch.as_tensor(scheduler.betas, dtype=torch.float64).numpy(), betas, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ public API


@pytest.mark.parametrize("name", ENTRIES)
def test_public_api(name):
    """test_scheduler_public_api: ``init_noise_sigma``, ``order``, ``scale_model_input`` before ``set_timesteps``
    (diffusers calls it at timestep 0, a training timestep), and ``step``."""
    scheduler = make(name)
    for attribute in ("init_noise_sigma", "order", "scale_model_input", "step", "set_timesteps", "add_noise",
                      "timesteps"):
        assert hasattr(scheduler, attribute), f"{name} has no {attribute}"
    sample = dummy_sample()
    assert scheduler.scale_model_input(sample, 0.0).shape == sample.shape


@pytest.mark.parametrize("name", ENTRIES)
def test_step_shape(name):
    """test_step_shape: two steps at two grid timesteps keep the sample's shape."""
    scheduler = fresh_grid(name)
    sample = dummy_sample()
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    output_0 = scheduler.step(0.1 * sample, t0, scheduler.scale_model_input(sample, t0)).prev_sample
    output_1 = scheduler.step(0.1 * sample, t1, scheduler.scale_model_input(sample, t1)).prev_sample
    assert output_0.shape == sample.shape == output_1.shape


@pytest.mark.parametrize("name", ENTRIES)
def test_outputs_equivalence(name):
    """test_scheduler_outputs_equivalence: ``return_dict=False`` gives the dict's values, in order."""
    sample = dummy_sample()
    results = []
    for return_dict in (True, False):
        scheduler = fresh_grid(name)
        t = scheduler.timesteps[0]
        results.append(scheduler.step(0.1 * sample, t, scheduler.scale_model_input(sample, t),
                                      return_dict=return_dict, **step_kwargs(scheduler)))
    as_dict, as_tuple = results
    assert isinstance(as_tuple, tuple)
    for from_tuple, from_dict in zip(as_tuple, as_dict.values()):
        if from_tuple is not None:
            assert torch.allclose(torch.nan_to_num(from_tuple), torch.nan_to_num(from_dict), atol=1e-5)


@pytest.mark.parametrize("name", ENTRIES)
def test_add_noise_batch_of_grid_timesteps(name):
    """test_add_noise_device: ``add_noise`` takes a batch of grid timesteps on the grid's device (diffusers'
    ``torch_device``: the GPU where there is one) and noises samples there."""
    scheduler = make(name)
    scheduler.set_timesteps(NUM_STEPS, device=TORCH_DEVICE)
    sample = dummy_sample().to(TORCH_DEVICE)
    t = scheduler.timesteps[[0, 1, 2, 3]]
    assert t.device.type == TORCH_DEVICE
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)).to(TORCH_DEVICE)
    noised = scheduler.add_noise(sample, noise, t)
    assert noised.shape == sample.shape and noised.device.type == TORCH_DEVICE and torch.isfinite(noised).all()
    # each sample is noised at its own timestep: one at a time gives the same
    for i in range(len(t)):
        alone = scheduler.add_noise(sample[i:i + 1], noise[i:i + 1], t[i:i + 1])
        assert torch.allclose(alone, noised[i:i + 1], rtol=1e-5, atol=1e-6)


def grid_arguments(name: str) -> list[str]:
    """The grids ``set_timesteps`` takes back: a control's where its signature has them; for a project sampler
    ``timesteps`` always, and ``sigmas`` where it has a σ grid (the discrete VP schedulers have none, as diffusers'
    DDIM and DDPM)."""
    cls = CONTROLS[name] if name in CONTROLS else SAMPLERS[name].scheduler_class
    takes = inspect.signature(cls.set_timesteps).parameters
    return [arg for arg in ("timesteps", "sigmas") if arg in takes or arg == "timesteps" and name in SAMPLERS]


@pytest.mark.parametrize("name, argument", [(name, arg) for name in ENTRIES for arg in grid_arguments(name)])
def test_set_timesteps_takes_own_grid(name, argument):
    """set_timesteps(timesteps=…) and (sigmas=…) take back the scheduler's own grid (diffusers' custom timesteps
    and sigmas tests)."""
    scheduler = fresh_grid(name)
    own = grid_timesteps(scheduler) if argument == "timesteps" else scheduler.sigmas.clone()
    other = make(name)
    other.set_timesteps(**{argument: own.tolist()})
    assert other.timesteps.shape == scheduler.timesteps.shape
    # within 0.01 training steps: diffusers' Euler maps σ to t by interpolating log σ over its table
    assert torch.allclose(other.timesteps.double(), scheduler.timesteps.double(), rtol=1e-5, atol=1e-2)
    if argument == "sigmas":
        assert torch.allclose(other.sigmas.double(), own.double(), rtol=1e-5, atol=1e-6)


def grid_timesteps(scheduler) -> torch.Tensor:
    """The timesteps of the grid's points, which ``timesteps=`` takes: a σ-space sampler's at the grid's nonzero σ's
    (its ``timesteps`` also list the points a multi-evaluation solver visits between them); otherwise ``timesteps``
    with the repeats of a two-evaluation scheduler (diffusers' Heun) dropped."""
    process = getattr(scheduler, "process", None)
    if hasattr(process, "timestep") and hasattr(scheduler, "sigmas"):
        sigmas = scheduler.sigmas[scheduler.sigmas > 0]
        return process.timestep(sigmas).to(scheduler.timesteps.dtype)
    return torch.unique_consecutive(scheduler.timesteps)


@pytest.mark.parametrize("name", ENTRIES)
def test_set_timesteps_device(name):
    """test_full_loop_device: ``set_timesteps(device=…)`` puts the grid there and the loop is unchanged."""
    on_device, plain = make(name), make(name)
    on_device.set_timesteps(NUM_STEPS, device="cpu")
    plain.set_timesteps(NUM_STEPS)
    assert on_device.timesteps.device.type == "cpu"
    start = dummy_sample_deter() * float(plain.init_noise_sigma)
    assert torch.equal(run_loop(on_device, dummy_model, start), run_loop(plain, dummy_model, start))


@pytest.mark.parametrize("name", ENTRIES)
def test_seeded_full_loop(name):
    """The full loop with diffusers' dummy model is finite and repeats exactly with the same seed; a stochastic
    sampler's result changes with the seed."""
    results = []
    for seed in (0, 0, 1):
        scheduler = fresh_grid(name)
        start = dummy_sample_deter() * float(scheduler.init_noise_sigma)
        results.append(run_loop(scheduler, dummy_model, start, seed=seed))
    assert torch.isfinite(results[0]).all()
    assert torch.equal(results[0], results[1])
    assert is_stochastic(name) == (not torch.equal(results[0], results[2]))


# ------------------------------------------------------------------------------------------------ exact runs


def coefficients(scheduler, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(ᾱ, β̄) of the network's input x_model = ᾱ x0 + β̄ ε at model time ``t``."""
    process = getattr(scheduler, "process", None)
    if hasattr(process, "coefficients"):
        return process.coefficients(torch.as_tensor(t).cpu())
    if hasattr(scheduler, "schedule"):
        return scheduler.schedule.coefficients(torch.as_tensor(t).cpu())
    if getattr(scheduler, "step_index", None) is not None and hasattr(scheduler, "sigmas"):  # diffusers' σ-space
        sigma = scheduler.sigmas[scheduler.step_index].double()
        return 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()
    acp = scheduler.alphas_cumprod[int(t)].double()
    return acp.sqrt(), (1 - acp).sqrt()


def point_model(scheduler, x0: torch.Tensor):
    """The exact network for data that is the single point ``x0``, in the scheduler's prediction type: with
    x_model = ᾱ x0 + β̄ ε, the noise is ε = (x_model − ᾱ x0)/β̄ and the target follows from (x0, ε)."""

    def model(x_model, t):
        prediction = scheduler.config.prediction_type
        if prediction == "sample":
            return x0
        alpha, beta = (c.to(x_model.dtype) for c in coefficients(scheduler, t))
        if prediction == "edm":  # F = (x0 − c_skip x_ve)/c_out at σ = β̄/ᾱ, x_ve = x_model/ᾱ
            skip, out = (c.to(x_model.dtype) for c in scheduler.process.skip_and_out(beta / alpha))
            return (x0 - skip * x_model / alpha) / out
        return target_from_x0_and_epsilon(prediction, x0, (x_model - alpha * x0) / beta, alpha, beta)

    return model


def exact_cases(name: str) -> list[tuple[str, str | None, dict]]:
    """(name, process, config) for every process whose models the entry drives (UDM: its blur operator, the one
    whose rules all keep the path), and VP models in v-prediction too."""
    if name in CONTROLS:
        processes = ["vp"]
    else:
        spec = SAMPLERS[name]
        processes = list(spec.processes[:1] if spec.family == "udm" else spec.processes)
    return [(name, process, config) for process in processes
            for config in [{}, *(PREDICTION_VARIANTS if process == "vp" else [])]]


@pytest.mark.parametrize("name, process, config", [case for name in ENTRIES for case in exact_cases(name)],
                         ids=case_id)
@pytest.mark.parametrize("start", [0, 2])
def test_exact_run_from_any_grid_point(name, process, config, start):
    """Single-point data, exact network: from ``add_noise(x0, ε, t_k)`` at grid point k = ``start`` · order
    (img2img's start, with ``set_begin_index`` where the scheduler has it), a deterministic sampler steps onto
    ``add_noise(x0, ε, t)`` at each next grid timestep and ends on x0; a stochastic one ends on x0."""
    scheduler = fresh_grid(name, process, **config)
    reference = fresh_grid(name, process, **config)  # add_noise of a scheduler that is not mid-run
    begin = start * scheduler.order
    x0 = dummy_sample() * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    timesteps = scheduler.timesteps
    x = reference.add_noise(x0, eps, timesteps[begin].repeat(len(x0)))

    def on_path(i, prev_sample):
        if is_stochastic(name) or i + 1 == len(timesteps):
            return
        expected = reference.add_noise(x0, eps, timesteps[i + 1].repeat(len(x0)))
        assert torch.allclose(prev_sample, expected, rtol=1e-4, atol=1e-4), (
            f"step {i} (t = {float(timesteps[i]):g}) left the exact path: "
            f"max error {float((prev_sample - expected).abs().max()):.3g}")

    final = run_loop(scheduler, point_model(scheduler, x0), x, begin=begin, each_step=on_path)
    assert torch.allclose(final, x0, atol=0.05), f"ended {float((final - x0).abs().max()):.3g} from the data"


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n.startswith("ddpm")] + ["diffusers-DDPMScheduler"])
def test_ddpm_steps_training_grid_without_set_timesteps(name):
    """test_scheduler_ddpm's step_shape: DDPM steps over the training grid before any ``set_timesteps``."""
    scheduler = make(name)
    sample = dummy_sample()
    for t in (0, 1):
        assert scheduler.step(0.1 * sample, t, sample, **step_kwargs(scheduler)).prev_sample.shape == sample.shape


@pytest.mark.parametrize("name", ADAPTIVE)
def test_adaptive_sampler_in_a_step_loop_names_solve(name):
    """An adaptive sampler driven by diffusers' fixed-step loop raises a ValueError naming ``solve()``, instead of
    returning the initial noise."""
    scheduler = make(name)
    with pytest.raises(ValueError, match=r"solve\("):
        scheduler.set_timesteps(NUM_STEPS)
        sample = dummy_sample()
        run_loop(scheduler, dummy_model, sample)


def test_every_deliberate_difference_is_documented():
    """docs/architecture.md's "Deliberate differences" names every sampler that declares one, and each check."""
    docs = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = docs[docs.index("Deliberate differences"):]
    for name, spec in SAMPLERS.items():
        for check in spec.deliberate:
            assert check in section, f"{name}'s deliberate {check!r} is not in docs/architecture.md"
            family = name.split("-")[0]
            assert f"`{name}`" in section or f"`{family}-*`" in section, f"{name} is not in docs/architecture.md"


@pytest.mark.parametrize("name", ENTRIES)
def test_getattr_is_correct(name):
    """test_getattr_is_correct: attributes read plainly, config keys through the config (with diffusers'
    FutureWarning when read as attributes), and an unknown name raises AttributeError naming it."""
    scheduler = make(name)
    scheduler.dummy_attribute = 5
    scheduler.register_to_config(test_attribute=5)
    assert scheduler.dummy_attribute == 5
    with pytest.warns(FutureWarning):
        assert scheduler.test_attribute == 5
    with pytest.raises(AttributeError, match="does_not_exist"):
        scheduler.does_not_exist  # noqa: B018


@pytest.mark.parametrize("name", ENTRIES)
def test_deprecated_kwargs(name):
    """test_deprecated_kwargs: ``**kwargs`` in ``__init__`` exactly when ``_deprecated_kwargs`` lists some."""
    scheduler = make(name)
    has_kwargs = "kwargs" in inspect.signature(type(scheduler).__init__).parameters
    assert has_kwargs == (len(type(scheduler)._deprecated_kwargs) > 0)


@pytest.mark.parametrize("name, argument", [(name, arg) for name in SAMPLERS for arg in grid_arguments(name)])
def test_set_timesteps_rejects_a_grid_out_of_order(name, argument):
    """test_custom_timesteps_increasing_order: a grid that does not descend is a ValueError naming the argument."""
    scheduler = fresh_grid(name)
    own = grid_timesteps(scheduler) if argument == "timesteps" else scheduler.sigmas[scheduler.sigmas > 0]
    with pytest.raises(ValueError, match=argument):
        make(name).set_timesteps(**{argument: own.flip(0).tolist()})


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_step_rejects_an_unknown_timestep(name):
    """A timestep off the grid is a ValueError naming it, not an IndexError from inside."""
    scheduler = fresh_grid(name)
    sample = dummy_sample()
    unknown = scheduler.timesteps[0] - 1  # between the first two grid points
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(0.1 * sample, unknown, sample)


@pytest.mark.parametrize("name", ENTRIES)
@pytest.mark.parametrize("steps", [1, 2, 10])
def test_inference_steps(name, steps):
    """test_inference_steps: any step count lays out a descending grid, and the exact single-point run on it from
    ``add_noise`` at its first timestep ends on the data."""
    scheduler = make(name)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    assert len(timesteps) >= steps and torch.all(timesteps[1:] <= timesteps[:-1])
    x0 = dummy_sample() * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    x = scheduler.add_noise(x0, eps, timesteps[:1].repeat(len(x0)))
    final = run_loop(scheduler, point_model(scheduler, x0), x)
    assert torch.allclose(final, x0, atol=0.05), f"ended {float((final - x0).abs().max()):.3g} from the data"
