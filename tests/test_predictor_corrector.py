"""The predictor–corrector sampler improves on its predictor alone at equal predictor steps (Song et al. 2021,
§4.2 and Alg. 2–3).

Where it shows: few predictor steps, and a corrector strong enough to move samples. Ten Euler–Maruyama steps
of the reverse SDE on a geometric σ grid, stopped at σ = 0.3, leave samples 17 nats too spread under the exact
p_σ; one Langevin step per level with target signal-to-noise ratio r = 0.5 pulls them back toward p_σ.
Song et al.'s r = 0.16 (tuned for CIFAR-10's 3,072 dimensions) moves them too little to matter here, and at
20 predictor steps or more, or on the way down to σ_min on a thin mixture, the corrector's own O(δ) bias (it
targets p_σ only as δ → 0) eats the gain (docs/samplers.md has the measurements).
"""

import pytest
import torch

import schedulers
from evaluation.distances import sliced_wasserstein

from .conftest import make_pipeline, seeded

pytestmark = pytest.mark.usefixtures("single_thread")
N = 2000
SIGMA_END = 0.3
PREDICTOR_STEPS = 10


def sample(mixture, corrector_steps: int, seed: int) -> torch.Tensor:
    scheduler = schedulers.ReverseSDEScheduler(noise_level=1.0, corrector_steps=corrector_steps, snr=0.5,
                                               sigma_schedule="log_snr", sigma_min=SIGMA_END, final_sigma="sigma_min")
    pipe = make_pipeline(mixture, scheduler)
    out = pipe(batch_size=N, num_inference_steps=PREDICTOR_STEPS + 1, generator=seeded(seed), output_type="raw")
    assert out.nfe == PREDICTOR_STEPS * (1 + corrector_steps)  # equal predictor steps; NFE counted honestly
    return out.images.double()


def test_langevin_corrector_improves_on_the_predictor(mixture):
    """Measured (seeds 0, 1): sliced W2 0.178, 0.180 → 0.151, 0.142 (ratio 0.82); NLL gap 17.2 → 13.0 nats
    (ratio 0.76). Two true sample sets differ by ~0.04 in sliced W2 and ~0.2 nats."""
    truth = mixture.sample(N, seeded(5)) + SIGMA_END * torch.randn(N, 1, 4, 4, generator=seeded(6),
                                                                   dtype=torch.float64)
    log_p_truth = mixture.log_prob(truth, SIGMA_END).mean()
    sw2, nll = {}, {}
    for corrector_steps in (0, 1):
        runs = [sample(mixture, corrector_steps, seed) for seed in (0, 1)]
        sw2[corrector_steps] = sum(sliced_wasserstein(x, truth) for x in runs) / len(runs)
        nll[corrector_steps] = sum(float(log_p_truth - mixture.log_prob(x, SIGMA_END).mean()) for x in runs) / 2
    assert nll[0] >= 10  # the predictor alone is far off: there is something to correct
    assert sw2[1] <= 0.9 * sw2[0]
    assert nll[1] <= 0.85 * nll[0]
