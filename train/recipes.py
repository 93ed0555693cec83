"""Named training recipes: a process's objective with the settings that train it, as ``train.diffusion`` flags.

A recipe is a property of a forward process (``schedulers.processes``): which objective (what the network
predicts, how times are drawn, how the loss is weighted) and which optimiser, warm-up and EMA go with it.
``python -m train.diffusion --recipe NAME …`` starts from the recipe's flags; any flag given after it wins.
``bench/training_recipes.py`` compares them at equal CPU time.

* ``eps``: the project's first recipe, DDPM's ε objective (Ho et al. 2020) with a short warm-up and a constant
  EMA.
* ``diffusers-example``: the defaults of diffusers' ``examples/unconditional_image_generation/
  train_unconditional.py`` — ε, lr 1e-4 with 500 warm-up steps and cosine decay, Adam β1 0.95, weight decay
  1e-6, EMA with warm-up (inv_gamma 1, power 3/4, max decay 0.9999).
* ``v-pred``: v-prediction (Salimans & Ho 2022, §4): x̂0 = ᾱ x − β̄ v̂ stays bounded at high noise, where ε's
  x̂0 = (x − β̄ ε̂)/ᾱ divides the error by ᾱ_T ≈ 0.006 on the linear schedule.
* ``min-snr`` / ``v-min-snr``: ε or v with min-SNR-5 loss weights (Hang et al. 2023).
* ``edm``: EDM's preconditioning and log-normal σ, ln σ ~ N(−1.2, 1.2²) (Karras et al. 2022, Table 1).
* ``flow-logit-normal``: rectified flow with logit-normal t (Esser et al. 2024, SD3 §3.1).
"""

from __future__ import annotations

# The optimiser and EMA every recipe shares unless it says otherwise.
_BASE = {"lr": 5e-4, "warmup": 200, "lr_decay": "cosine", "ema_decay": 0.999}

RECIPES: dict[str, dict[str, object]] = {
    "eps": {**_BASE, "objective": "vp-eps"},
    "diffusers-example": {"objective": "vp-eps", "lr": 1e-4, "warmup": 500, "lr_decay": "cosine",
                          "adam_beta1": 0.95, "weight_decay": 1e-6, "ema_decay": 0.9999, "ema_power": 0.75},
    "v-pred": {**_BASE, "objective": "vp-v"},
    "min-snr": {**_BASE, "objective": "vp-eps", "snr_gamma": 5.0},
    "v-min-snr": {**_BASE, "objective": "vp-v", "snr_gamma": 5.0},
    "edm": {**_BASE, "objective": "edm"},
    "flow-logit-normal": {**_BASE, "objective": "flow", "timestep_sampling": "logit_normal"},
}


def check_recipe(name: str) -> dict[str, object]:
    """The settings of recipe ``name``; a ValueError naming the known ones if there is no such recipe."""
    if name not in RECIPES:
        raise ValueError(f"unknown training recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def recipe_flags(name: str) -> list[str]:
    """Recipe ``name`` as ``train.diffusion`` command-line flags (``--snr-gamma 5.0`` …)."""
    flags = []
    for option, value in check_recipe(name).items():
        flags += [f"--{option.replace('_', '-')}", str(value)]
    return flags
