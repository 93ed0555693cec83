"""Guidance on the class-conditional exact mixture, where every guided answer has a closed form.

With the exact noisy classifier p(y | x_t), classifier guidance at γ = 1 turns the exact unconditional score
into the exact conditional one, so it must reproduce conditional sampling for every registered sampler —
the same samples, since the noise draws are the same. Larger γ sharpens toward the class's dominant mode.
"""

import pytest
import torch

import schedulers
from evaluation.exact import ExactNoisyClassifier, ExactScoreModel
from pipelines import DiffusionImagePipeline
from pipelines.guidance import Guidance

from .conftest import seeded

pytestmark = pytest.mark.usefixtures("single_thread")

N, STEPS, TARGET = 200, 12, 1
SAMPLERS = [name for name in schedulers.samplers_for("vp", {"clip_sample": False})]


@pytest.fixture(scope="module")
def classifier(class_mixture):
    return ExactNoisyClassifier.from_mixture(class_mixture)


def pipeline(mixture, classifier, sampler="ddim", model_process="vp", prediction_type="epsilon", **overrides):
    model = ExactScoreModel.from_mixture(mixture, prediction_type, model_process=model_process)
    config = {"clip_sample": False, "prediction_type": prediction_type, "model_process": model_process}
    pipe = DiffusionImagePipeline(model, schedulers.get_sampler(sampler).create(config, **overrides),
                                  classifier=classifier)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kwargs):
    return pipe(batch_size=N, num_inference_steps=STEPS, class_labels=TARGET, generator=seeded(0),
                output_type="raw", **kwargs).images


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_exact_classifier_guidance_at_scale_one_is_conditional_sampling(class_mixture, classifier, sampler):
    pipe = pipeline(class_mixture, classifier, sampler)
    guided = sample(pipe, guidance_mode="classifier", guidance_scale=1.0)
    conditional = sample(pipe, guidance_mode="classifier-free", guidance_scale=1.0)
    assert torch.allclose(guided, conditional, atol=1e-4)
    # few-step stochastic samplers leave some noise, which may land a sample nearer another class's mode
    assert (class_mixture.classes[class_mixture.component_of(guided)] == TARGET).float().mean() >= 0.9


def test_classifier_guidance_drives_a_flow_model_through_its_own_coordinates(class_mixture, classifier):
    """The VP-trained classifier sees a flow model's state through the σ-space map: γ = 1 is still exact."""
    # σ_max = 80: within the classifier's VP range (σ ≤ 157), unlike the flow model's default 500
    pipe = pipeline(class_mixture, classifier, "heun", model_process="flow", prediction_type="velocity",
                    sigma_max=80.0)
    guided = sample(pipe, guidance_mode="classifier", guidance_scale=1.0)
    conditional = sample(pipe, guidance_mode="classifier-free", guidance_scale=1.0)
    assert torch.allclose(guided, conditional, atol=1e-4)


def test_larger_scales_sharpen_toward_the_dominant_mode(class_mixture, classifier):
    pipe = pipeline(class_mixture, classifier)
    modes = [component for component in range(6) if class_mixture.classes[component] == TARGET]
    dominant = max(modes, key=lambda component: class_mixture.weights[component])

    def dominant_share(scale):
        return (class_mixture.component_of(sample(pipe, guidance_mode="classifier", guidance_scale=scale))
                == dominant).float().mean().item()

    shares = [dominant_share(scale) for scale in (1.0, 3.0, 8.0)]
    assert shares[0] + 0.05 < shares[1] < shares[2]
    for scale in (3.0, 8.0):
        cfg = sample(pipe, guidance_mode="classifier-free", guidance_scale=scale)
        assert (class_mixture.component_of(cfg) == dominant).float().mean() > shares[0] + 0.05


def test_guidance_outside_its_interval_is_unguided_sampling(class_mixture, classifier):
    pipe = pipeline(class_mixture, classifier)
    nowhere = sample(pipe, guidance_mode="classifier", guidance_scale=4.0, guidance_interval=(1e3, 1e4))
    unguided = sample(pipe, guidance_mode="classifier", guidance_scale=0.0)
    everywhere = sample(pipe, guidance_mode="classifier", guidance_scale=4.0, guidance_interval=(0.0, 1e4))
    full = sample(pipe, guidance_mode="classifier", guidance_scale=4.0)
    assert torch.allclose(nowhere, unguided) and torch.allclose(everywhere, full)
    assert not torch.allclose(full, unguided, atol=1e-2)
    # an interval at low noise only guides the last steps: the class is fixed earlier, so it guides less
    late = sample(pipe, guidance_mode="classifier", guidance_scale=4.0, guidance_interval=(0.0, 0.1))
    on_target = [(class_mixture.classes[class_mixture.component_of(x)] == TARGET).float().mean()
                 for x in (unguided, late, full)]
    assert on_target[0] < 0.6 and on_target[2] == 1.0 and on_target[1] < on_target[2]


def test_similarity_guidance_steers_toward_the_reference_class(class_mixture, classifier):
    pipe = pipeline(class_mixture, classifier)
    reference = class_mixture.sample(1, seeded(5), class_labels=torch.tensor([TARGET])).float()
    steered = pipe(batch_size=N, num_inference_steps=STEPS, guidance_mode="similarity",  # no class_labels needed
                   guidance_scale=30.0, reference_image=reference[0], generator=seeded(0), output_type="raw").images
    unguided = sample(pipe, guidance_mode="classifier", guidance_scale=0.0)

    def on_target(x):
        return (class_mixture.classes[class_mixture.component_of(x)] == TARGET).float().mean()

    assert on_target(steered) > on_target(unguided) + 0.3


def test_clean_classifier_guidance_through_the_denoised_estimate(class_mixture, classifier):
    """p(y | x_t) ≈ p_o(y | x̂0(x_t)) with p_o the exact clean classifier: steers to the class, not exactly."""
    pipe = pipeline(class_mixture, classifier)

    class CleanClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.precision = torch.nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

        def forward(self, x0):
            return class_mixture.class_log_posterior(x0.double(), 0.05)

    guided = sample(pipe, guidance_mode="classifier-x0", guidance_scale=1.0, classifier=CleanClassifier())
    unguided = sample(pipe, guidance_mode="classifier", guidance_scale=0.0)
    hits = [(class_mixture.classes[class_mixture.component_of(x)] == TARGET).float().mean() for x in (guided, unguided)]
    assert hits[0] > hits[1] + 0.3


def test_guidance_modes_reflect_the_components(class_mixture, classifier):
    assert pipeline(class_mixture, classifier).guidance_modes == ["none", "classifier-free", "classifier",
                                                                  "similarity"]
    assert pipeline(class_mixture, None).guidance_modes == ["none", "classifier-free"]


@pytest.mark.parametrize("kwargs, message", [
    ({"guidance_mode": "clasifier"}, "guidance_mode must be one of"),
    ({"guidance_mode": "classifier", "classifier": None, "_no_classifier": True}, "needs a classifier"),
    ({"guidance_mode": "similarity"}, "needs a reference_image"),
    ({"guidance_mode": "classifier", "guidance_interval": (2.0, 1.0)}, "guidance_interval"),
    ({"guidance_mode": "classifier", "class_labels": 7}, "class labels must be in"),
    ({"guidance_mode": "classifier", "class_labels": None}, "needs class_labels"),
    ({"guidance_mode": "similarity", "reference_image": torch.zeros(1, 3, 3)}, "reference_image must be"),
])
def test_bad_guidance_requests_name_the_problem(class_mixture, classifier, kwargs, message):
    kwargs = dict(kwargs)
    pipe = pipeline(class_mixture, None if kwargs.pop("_no_classifier", False) else classifier)
    kwargs.setdefault("class_labels", TARGET)
    with pytest.raises(ValueError, match=message):
        pipe(batch_size=2, num_inference_steps=2, guidance_scale=2.0, **kwargs)


def test_classifier_free_guidance_needs_a_conditional_model(mixture):
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), schedulers.DDIMScheduler())
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(batch_size=2, num_inference_steps=2, guidance_mode="classifier-free", guidance_scale=2.0)
    with pytest.raises(ValueError, match="finite"):
        Guidance("classifier-free", float("nan"))
