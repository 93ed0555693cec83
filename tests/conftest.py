"""Shared fixtures: small exact-score mixtures and pipelines around them."""

import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from evaluation.exact import ExactScoreModel, GaussianMixture
from pipelines import DiffusionImagePipeline
from schedulers.registry import EXCLUSIVE_REQUIREMENTS

diffusers_logging.disable_progress_bar()


@pytest.fixture(scope="module")
def single_thread():
    """Run a module on one intra-op thread: the exact model's tensors are tiny, and a thread pool's
    synchronisation costs more than their arithmetic (4× slower on 2 cores, far worse when they are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mixture():
    """Image-shaped (1×4×4) mixture of 4 thin components near 2-D planes: an easy start, a hard end."""
    return GaussianMixture.random((1, 4, 4), 4, rank=2, seed=3)


@pytest.fixture(scope="session")
def class_mixture():
    """Six components in three classes (two per class), image-shaped."""
    return GaussianMixture.random((1, 4, 4), 6, rank=2, num_classes=3, seed=1)


def make_pipeline(mixture, scheduler, prediction_type="epsilon"):
    """A pipeline whose "UNet" is the mixture's exact score, answering in ``prediction_type``."""
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture, prediction_type), scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def model_supplies(num_inference_steps: int) -> dict:
    """What a model supplies to the samplers that ``require`` more than its scheduler config: a flat Analytic-DPM
    table E‖ε_θ‖²/d, one mean-value point per step (the interval's midpoint), the consistency sampler's mark of
    a model trained as a consistency function and the mean-flow sampler's of a MeanFlow model."""
    return {"eps_second_moment": [0.5] * 1000, "mean_value_points": [0.5] * num_inference_steps,
            "consistency_objective": "consistency-distillation", "mean_flow_objective": "mean-flow"}


def supplied_for(spec, supplied: dict) -> dict:
    """``supplied`` less the values that mark another kind of model than ``spec`` drives (a consistency model's
    ``consistency_objective`` for an ODE solver: ``schedulers.registry.EXCLUSIVE_REQUIREMENTS``)."""
    return {key: value for key, value in supplied.items()
            if key not in EXCLUSIVE_REQUIREMENTS or key in spec.requires}


def step_defaults(spec) -> dict:
    """A registry entry's ``step`` knobs at their defaults (DDIM's η), for pipelines that pass them to ``step``."""
    return {knob.name: knob.default for knob in spec.knobs if knob.target == "step"}
