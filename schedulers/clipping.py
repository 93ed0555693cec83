"""x̂0 clipping and Imagen's dynamic thresholding, the one place every sampler clips its clean-data estimate.

Data lies in [−1, 1], but a model's x̂0 (the denoiser D(x; σ)) can leave it, most of all under strong classifier-free
guidance. Two rules bring it back, under diffusers' config keys so that its configs carry over:

* ``clip_sample``: clamp x̂0 to ±``clip_sample_range`` (Ho et al. 2020's sampler clips to [−1, 1]);
* ``thresholding``: Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): per sample, s is the
  ``dynamic_thresholding_ratio`` quantile of |x̂0|, held to [1, ``sample_max_value``]; x̂0 is clamped to [−s, s]
  and divided by s. It takes precedence over ``clip_sample``, as in diffusers.

A sampler must then step with the noise the clipped x̂0 implies, not the model's: ε̂ = (x_t − ᾱ x̂0)/β̄ for a VP
state, (x − D)/σ in σ-space. A step that pairs the clipped x̂0 with the unclipped ε̂ moves off the line through x_t
that both estimates lie on (what diffusers' DDIM does without ``use_clipped_model_output``). The VP schedulers
re-derive ε̂ (``VPScheduler.predict_x0_and_epsilon``); the σ-space solvers read only D, so theirs is implied.
"""

from __future__ import annotations

import torch

from .registry import CLIPPING_KNOBS, KNOBS

# The clipping config keys with their defaults (off; diffusers' values for the rest), for a scheduler's signature.
CLIPPING_DEFAULTS = {name: KNOBS[name].default for name in CLIPPING_KNOBS}


def check_clipping(config) -> None:
    """ValueError naming the key, unless every clipping key of ``config`` is in its ``KNOBS`` range."""
    for name in CLIPPING_KNOBS:
        KNOBS[name].check(config[name])


def clips(config) -> bool:
    """Whether ``config`` clips or thresholds x̂0."""
    return config["thresholding"] or config["clip_sample"]


def clip_x0(x0: torch.Tensor, config) -> torch.Tensor:
    """x̂0 thresholded or clipped as ``config`` says (the module docstring); ``x0`` itself when it does neither."""
    if config["thresholding"]:
        return dynamic_threshold(x0, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    if config["clip_sample"]:
        return x0.clamp(-config["clip_sample_range"], config["clip_sample_range"])
    return x0


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): clamp each sample to its ``ratio``
    quantile s of |x0| (at least 1, at most ``max_value``), then divide by s."""
    flat = x0.reshape(x0.shape[0], -1)
    work = flat.float() if flat.dtype not in (torch.float32, torch.float64) else flat
    s = torch.quantile(work.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (work.clamp(-s, s) / s).to(x0.dtype).reshape(x0.shape)
