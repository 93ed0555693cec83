"""Guidance: steer a diffusion model toward a condition by changing the network output every sampler consumes.

Every scheduler, ancestral, DDIM, SDE or ODE, reads the network's answer at (x_t, t) and nothing else about the
model, so guidance that rewrites that answer works with all of them through one pipeline argument. With the
network input x_t = ᾱ x0 + β̄ ε (any process, through its ``SigmaProcess``), the score is ∇ log p(x_t) = −ε/β̄,
and Bayes' rule ∇ log p(x_t | y) = ∇ log p(x_t) + ∇ log p(y | x_t) gives the guided noise prediction

    ε̃ = ε_θ(x_t) − β̄_t γ ∇_{x_t} log p(y | x_t)                (Su part 9; Dhariwal & Nichol 2021, Alg. 2)

which is the right drift for the reverse SDE and the probability-flow ODE alike, at any reverse noise level.
(The ancestral mean shift μ + σ_t² γ ∇ log p(y|x_t) of Dhariwal & Nichol's Alg. 1 equals it to first order in
the step's β_t; the ε form is the one that is exact as steps shrink.) The modes:

* ``classifier-free`` (Ho & Salimans 2022): out(∅) + w (out(y) − out(∅)), w = ``guidance_scale``;
* ``classifier``: a noise-conditional classifier p(y | x_t, t) (``models/classifier.py``) in the formula above,
  applied to the model's unconditional output (the null class of a class-conditional model);
* ``classifier-x0``: a clean-data classifier through the denoised estimate, p(y | x_t) ≈ p_o(y | x̂0(x_t)) (Su
  part 9), the gradient taken through the network;
* ``similarity`` (semantic guidance, Liu et al. 2023; Su part 9): log p(y | x_t) replaced by
  cos(E(x_t, t), E(y_ref, 0)) with E the noisy classifier's features, steering toward a reference image.

``guidance_interval = (σ_lo, σ_hi)`` applies guidance only at noise levels in that range (Kynkäänniemi et al.
2024: guidance at high noise costs diversity, at low noise it does little); outside it the model runs plain
conditional (CFG) or unguided (classifier modes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from schedulers.process import convert, expand_to
from schedulers.processes import SigmaProcess, VPProcess

GUIDANCE_MODES = ("none", "classifier-free", "classifier", "classifier-x0", "similarity")
CLASSIFIER_MODES = ("classifier", "classifier-x0", "similarity")


@dataclass
class Guidance:
    """One call's guidance settings; ``reference_features`` are E(y_ref, 0) for similarity guidance and
    ``model_adapter`` the model's map to σ-space (set once per call by the pipeline, when needed)."""

    mode: str
    scale: float
    interval: tuple[float, float] | None = None
    classifier: torch.nn.Module | None = None
    reference_features: torch.Tensor | None = None
    model_adapter: SigmaProcess | None = None

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if not math.isfinite(self.scale):
            raise ValueError(f"guidance_scale must be a finite number, got {self.scale}")
        if self.interval is not None:
            low, high = self.interval
            if not (0 <= low < high and math.isfinite(low)):
                raise ValueError(f"guidance_interval must be (σ_lo, σ_hi) with 0 ≤ σ_lo < σ_hi, got {self.interval}")
        if self.mode in CLASSIFIER_MODES and self.classifier is None:
            raise ValueError(f"guidance_mode {self.mode!r} needs a classifier: load the pipeline with "
                             f"classifier=... (e.g. checkpoints/mnist-noisy-classifier)")

    def active_at(self, adapter: SigmaProcess | None, timestep) -> bool:
        """Whether to guide at the model's ``timestep``: inside ``interval`` (in σ), or always without one."""
        if self.interval is None:
            return True
        sigma = float(adapter.sigma_of_timestep(torch.as_tensor(timestep).reshape(-1)[0].cpu()))
        return self.interval[0] <= sigma <= self.interval[1]

    @cached_property
    def classifier_adapter(self) -> VPProcess:
        """How the noisy classifier sees σ-space: the VP process of its inputs (its ``schedule``)."""
        return VPProcess("epsilon", self.classifier.schedule)


def classifier_input(guidance: Guidance, x_model: torch.Tensor, alpha, beta) -> tuple[torch.Tensor, torch.Tensor]:
    """The noisy classifier's own (x_t, t) for a network state x_model = ᾱ x0 + β̄ ε of any process.

    Both see the same σ = β̄/ᾱ: the classifier's input is s_vp(σ) · x_model/ᾱ at its timestep t(σ), a linear map
    of x_model, so autograd carries the gradient back to it.
    """
    adapter = guidance.classifier_adapter
    sigma = beta / alpha
    scale = adapter.input_scale(sigma) / alpha
    return x_model * expand_to(scale, x_model).to(x_model.dtype), adapter.timestep(sigma).float()


def log_condition(guidance: Guidance, x_model: torch.Tensor, labels, alpha, beta, denoised=None) -> torch.Tensor:
    """log p(y | x_t) (or the similarity) per sample, differentiable in ``x_model`` (or through ``denoised``)."""
    classifier = guidance.classifier
    if guidance.mode == "classifier-x0":
        logits = classifier(denoised.to(next(classifier.parameters()).dtype))
        return torch.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    x_in, t_in = classifier_input(guidance, x_model, alpha, beta)
    x_in = x_in.to(next(classifier.parameters()).dtype)
    if guidance.mode == "classifier":
        logits = classifier(x_in, t_in.expand(len(x_in)) if t_in.ndim else t_in)
        return torch.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    features = classifier.features(x_in, t_in.expand(len(x_in)) if t_in.ndim else t_in).float()
    return torch.nn.functional.cosine_similarity(features, guidance.reference_features.float(), dim=1)


def classifier_guided_output(network, prediction_type: str, guidance: Guidance, x_model: torch.Tensor, timestep,
                             labels) -> torch.Tensor:
    """The network output with ε replaced by ε̃ = ε − β̄ γ ∇ log p(y | x_t), in the model's own parameterization.

    ``network(x)`` is the model's unconditional answer at ``timestep``.
    """
    alpha, beta = (c.to(x_model.device) for c in guidance.model_adapter.coefficients(timestep))
    with torch.enable_grad():
        x = x_model.detach().requires_grad_(True)
        if guidance.mode == "classifier-x0":  # the gradient runs through the network
            output = network(x)
            denoised = convert(output, prediction_type, "sample", x, alpha, beta)
            objective = log_condition(guidance, x, labels, alpha, beta, denoised)
        else:
            output = network(x_model)
            objective = log_condition(guidance, x, labels, alpha, beta)
        (gradient,) = torch.autograd.grad(objective.sum(), x)
    output = output.detach()
    eps = convert(output, prediction_type, "epsilon", x_model, alpha, beta)
    guided = eps - expand_to(beta, eps).to(eps.dtype) * guidance.scale * gradient.to(eps.dtype)
    return convert(guided, "epsilon", prediction_type, x_model, alpha, beta)
