"""The forward processes (``schedulers.processes``): each one's training example decodes back to x0 through its own
σ-space map, the config keys they declare are the ones models have always shipped, and the generated scheduler
signatures keep diffusers' ``from_config`` / ``save_pretrained`` working."""

import inspect

import pytest
import torch

import schedulers
from schedulers.process import VPSchedule, make_betas
from schedulers.processes import (
    CONFIG_KEYS,
    GAUSSIAN_SIGMA_PROCESSES,
    PROCESSES,
    EDMProcess,
    FlowProcess,
    PFGMppProcess,
    SigmaProcess,
    UDMProcess,
    VPProcess,
    sigma_process,
    takes_process_config,
)
from schedulers.processes.flow import flow_time, sigma_of_flow_time
from schedulers.registry import TRAINING_KEYS

from .conftest import seeded

SHAPE = (6, 1, 4, 4)


def test_every_process_is_registered_under_the_name_its_models_record():
    assert list(PROCESSES) == ["vp", "flow", "edm", "pfgmpp", "udm-blur", "udm-mask", "udm-noise"]
    assert all(cls.name == name and cls.label for name, cls in PROCESSES.items())
    assert GAUSSIAN_SIGMA_PROCESSES == ("vp", "flow", "edm")  # PFGM++'s kernel is heavy-tailed


def test_the_inherited_config_keys_are_the_ones_shipped_models_carry():
    assert TRAINING_KEYS == CONFIG_KEYS
    assert set(CONFIG_KEYS) == {
        "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
        "timestep_spacing", "steps_offset", "model_process", "pfgm_D",
        "udm_operator", "udm_noise", "udm_prior_mean", "udm_prior_std", "udm_prior_class_mean", "udm_prior_class_std"}


def vp_process(prediction_type):
    return VPProcess(prediction_type, VPSchedule(make_betas("linear", 1000)))


# (process, the times its training_example takes)
SIGMA_CASES = [
    (vp_process("epsilon"), torch.tensor([0, 10, 500, 999, 999, 3])),
    (vp_process("v_prediction"), torch.tensor([0, 10, 500, 999, 999, 3])),
    (vp_process("sample"), torch.tensor([0, 10, 500, 999, 999, 3])),
    (FlowProcess("velocity", 1000), torch.tensor([0.01, 0.2, 0.5, 0.7, 0.9, 0.99], dtype=torch.float64)),
    (EDMProcess(), torch.tensor([0.002, 0.1, 1.0, 5.0, 40.0, 80.0], dtype=torch.float64)),
    (PFGMppProcess(pfgm_D=16), torch.tensor([0.002, 0.1, 1.0, 5.0, 40.0, 80.0], dtype=torch.float64)),
]


@pytest.mark.parametrize("process, time", SIGMA_CASES, ids=lambda case: getattr(case, "name", ""))
def test_a_training_target_decodes_to_x0_through_the_sigma_space_map(process, time):
    """The Precond + Loss pair agree: D(x_ve; σ) applied to the target at the network's own input is x0."""
    x0 = torch.rand(SHAPE, generator=seeded(0), dtype=torch.float64) * 2 - 1
    if isinstance(process, PFGMppProcess):
        noise = process.noise(SHAPE, time, seeded(1), dtype=torch.float64)
    else:
        noise = torch.randn(SHAPE, generator=seeded(1), dtype=torch.float64)
    example = process.training_example(x0, noise, time)
    sigma = process.sigma_of_timestep(example.time_input.double())
    x_ve = example.network_input / process.input_scale(sigma)[:, None, None, None]
    assert torch.allclose(process.denoised(example.target, x_ve, sigma[:, None, None, None]), x0, atol=1e-7)
    assert torch.equal(example.loss_weight, torch.ones(len(x0), dtype=example.loss_weight.dtype))
    assert torch.allclose(process.timestep(sigma), example.time_input.double(), rtol=1e-6)


def test_flow_time_is_the_inverse_of_its_sigma():
    sigma = torch.tensor([1e-3, 0.5, 1.0, 499.0], dtype=torch.float64)
    assert torch.allclose(flow_time(sigma), sigma / (1 + sigma))
    assert torch.allclose(sigma_of_flow_time(flow_time(sigma)), sigma)


@pytest.mark.parametrize("model_process, cls", [("vp", VPProcess), ("flow", FlowProcess), ("edm", EDMProcess)])
def test_a_scheduler_config_picks_its_models_sigma_space_map(model_process, cls):
    prediction_type = {"vp": "epsilon", "flow": "velocity", "edm": "edm"}[model_process]
    config = {**VPProcess.config_defaults, "model_process": model_process, "prediction_type": prediction_type}
    assert type(sigma_process(config)) is cls and isinstance(sigma_process(config), SigmaProcess)
    with pytest.raises(ValueError, match="unknown model_process"):
        sigma_process({**config, "model_process": "ve"})


def test_a_udm_process_is_built_from_its_scheduler_config():
    scheduler = schedulers.UDMScheduler(udm_operator="mask", num_train_timesteps=16, udm_noise=0.0)
    process = UDMProcess.from_config(scheduler.config)
    x0 = torch.rand(SHAPE, generator=seeded(0))
    t = torch.tensor([1, 4, 8, 12, 16, 16])
    example = process.training_example(x0, torch.zeros_like(x0), t)
    # add_noise takes the scheduler's timesteps' units: the network's time input (issue #18)
    assert torch.equal(example.network_input, scheduler.add_noise(x0, torch.zeros_like(x0), example.time_input))
    assert torch.equal(example.target, x0)


def test_the_process_keys_become_the_schedulers_config_parameters(tmp_path):
    parameters = inspect.signature(schedulers.PFGMppScheduler.__init__).parameters
    assert list(parameters)[1:9] == [*PFGMppProcess.config_defaults]
    assert parameters["prediction_type"].default == "edm" and parameters["pfgm_D"].default == 128
    scheduler = schedulers.ProbabilityFlowScheduler(model_process="flow", prediction_type="velocity", solver="euler")
    assert scheduler.config.model_process == "flow" and scheduler.config.solver == "euler"
    scheduler.save_pretrained(tmp_path)
    loaded = schedulers.ProbabilityFlowScheduler.from_pretrained(tmp_path)
    assert type(loaded.process) is FlowProcess and loaded.config.solver == "euler"
    assert schedulers.DDIMScheduler.from_config(loaded.config).config.prediction_type == "velocity"
    with pytest.raises(TypeError):
        schedulers.DDPMScheduler(not_a_key=1)


def test_takes_process_config_passes_only_a_schedulers_own_arguments():
    seen = {}

    @takes_process_config({"num_train_timesteps": 1000, "prediction_type": "epsilon"})
    def init(self, solver: str = "heun"):
        seen["solver"] = solver

    assert list(inspect.signature(init).parameters) == ["self", "num_train_timesteps", "prediction_type", "solver"]
    init(None, 10, "sample", "euler")
    assert seen == {"solver": "euler"}
    init(None, prediction_type="sample")
    assert seen == {"solver": "heun"}
