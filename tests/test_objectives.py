"""The training objectives: forward process, targets, label dropout, importance sampling, the loss."""

import math

import pytest
import torch

from evaluation.exact import ExactScoreModel
from schedulers import DDPMScheduler
from schedulers.process import target_from_x0_and_epsilon
from train.objectives import (
    OBJECTIVES,
    ImportanceTimesteps,
    TrainingBatch,
    VPObjective,
    make_objective,
)

T = 1000
NULL = 10


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def clean_batch(n: int = 256, seed: int = 0):
    g = seeded(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, NULL, (n,), generator=g)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_noisy_sample_is_the_schedulers_add_noise_of_the_epsilon_target(beta_schedule):
    objective = make_objective("vp-eps", beta_schedule=beta_schedule, null_class_id=NULL)
    x0, labels = clean_batch()
    batch = objective.sample(x0, labels, seeded(1))
    scheduler = DDPMScheduler(**objective.scheduler_config())
    t = batch.model_kwargs["timestep"]
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() < T
    # the ε-objective's target is the noise itself, so x_t must be the scheduler's ᾱ_t x0 + β̄_t ε
    torch.testing.assert_close(batch.noisy, scheduler.add_noise(x0, batch.target, t), rtol=0, atol=1e-6)
    assert torch.all(batch.loss_weight == 1)


@pytest.mark.parametrize("name", ["vp-x0", "vp-v"])
def test_targets_are_the_process_targets_of_the_same_draw(name):
    """Same generator seed ⇒ same (t, ε); the target must be target_from_x0_and_epsilon of that draw."""
    x0, labels = clean_batch()
    eps_batch = make_objective("vp-eps", null_class_id=NULL).sample(x0, labels, seeded(2))
    objective = make_objective(name, null_class_id=NULL)
    batch = objective.sample(x0, labels, seeded(2))
    t = batch.model_kwargs["timestep"]
    torch.testing.assert_close(t, eps_batch.model_kwargs["timestep"], rtol=0, atol=0)
    torch.testing.assert_close(batch.noisy, eps_batch.noisy, rtol=0, atol=0)
    alpha, beta = objective.schedule.coefficients(t)
    expected = target_from_x0_and_epsilon(objective.prediction_type, x0, eps_batch.target, alpha, beta)
    torch.testing.assert_close(batch.target, expected, rtol=0, atol=1e-6)


def test_registry_maps_names_to_prediction_types_and_sampler_configs():
    assert {name: OBJECTIVES[name]().prediction_type for name in ("vp-eps", "vp-x0", "vp-v")} == {
        "vp-eps": "epsilon", "vp-x0": "sample", "vp-v": "v_prediction"}
    objective = make_objective("vp-v", beta_schedule="squaredcos_cap_v2", num_train_timesteps=500)
    config = objective.scheduler_config()
    assert config["prediction_type"] == "v_prediction" and config["clip_sample"] is False  # CFG-safe (see there)
    scheduler = DDPMScheduler(**config)
    torch.testing.assert_close(scheduler.alphas_cumprod, objective.schedule.alphas_cumprod)
    assert objective.model_info() == {"process": "vp", "prediction_type": "v_prediction", "objective": "vp-v",
                                     "timestep_sampling": "uniform", "snr_gamma": None}


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_label_dropout_replaces_labels_by_the_null_class_at_rate_p(p):
    n = 20_000
    labels = torch.randint(0, NULL, (n,), generator=seeded(0))
    objective = make_objective("vp-eps", label_dropout=p, null_class_id=NULL)
    dropped = objective.drop_labels(labels, seeded(3))
    is_null = dropped == NULL
    # the count of dropped labels is Binomial(n, p): within 5 standard deviations
    assert abs(is_null.sum().item() - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9
    assert torch.equal(dropped[~is_null], labels[~is_null])


def test_unconditional_batches_carry_no_labels_and_labels_need_a_null_class():
    x0, labels = clean_batch(8)
    assert make_objective("vp-eps").sample(x0, None, seeded(0)).model_kwargs["class_labels"] is None
    with pytest.raises(ValueError, match="null_class_id"):
        make_objective("vp-eps").sample(x0, labels, seeded(0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prediction_type": "score"}, "predicts one of"),
        ({"beta_schedule": "quadratic"}, "beta_schedule"),
        ({"timestep_sampling": "sorted"}, "timestep_sampling"),
        ({"label_dropout": 1.0}, "label_dropout"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ],
)
def test_bad_options_raise_value_errors_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        VPObjective(**options)


def test_unknown_objective_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="vp-eps"):
        make_objective("flowy")


def test_importance_sampling_is_uniform_until_every_timestep_has_a_full_history():
    sampler = ImportanceTimesteps(4, history=2)
    sampler.observe(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2, 3, 4, 1, 2, 3]))
    assert not sampler.warmed_up
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25, dtype=torch.float64))
    sampler.observe(torch.tensor([3]), torch.tensor([4.0]))
    assert sampler.warmed_up


def test_importance_sampling_follows_rms_loss_and_stays_unbiased():
    """p_t ∝ sqrt(E[L_t²]) (Nichol & Dhariwal 2021 §3.3); weights 1/(T p_t) keep E[w] = 1, E[w L_t] = mean L."""
    steps = 50
    sampler = ImportanceTimesteps(steps, history=3)
    loss_of_t = torch.linspace(0.05, 2.0, steps) ** 2  # losses that vary strongly with t
    for _ in range(3):
        sampler.observe(torch.arange(steps), loss_of_t)
    p = sampler.probabilities()
    expected = loss_of_t.double() / loss_of_t.sum() * (1 - sampler.uniform_mix) + sampler.uniform_mix / steps
    torch.testing.assert_close(p, expected)

    n = 200_000
    t, w = sampler.sample(n, seeded(0))
    w = w.double()
    # standard errors of the two means, from the samples themselves
    for estimate, values in ((1.0, w), (loss_of_t.double().mean().item(), w * loss_of_t.double()[t])):
        assert abs(values.mean().item() - estimate) <= 5 * values.std().item() / math.sqrt(n)
    # the high-loss timesteps are drawn more often than uniform
    assert (t >= steps // 2).double().mean() > 0.7


def test_importance_state_round_trips_and_is_checked():
    a = make_objective("vp-eps", timestep_sampling="importance")
    a.observe({"timestep": torch.tensor([3, 3, 7])}, torch.tensor([0.5, 0.25, 1.0]))
    b = make_objective("vp-eps", timestep_sampling="importance")
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.timesteps.losses, a.timesteps.losses) and torch.equal(b.timesteps.counts, a.timesteps.counts)
    with pytest.raises(ValueError, match="does not fit"):
        make_objective("vp-eps", timestep_sampling="importance", num_train_timesteps=10).load_state_dict(a.state_dict())


def test_loss_is_the_weighted_mean_over_pixels_then_batch():
    target = torch.zeros(2, 1, 2, 2)
    output = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    batch = TrainingBatch(target, {"timestep": torch.tensor([0, 1]), "class_labels": None}, target,
                          torch.tensor([1.0, 0.5]))
    loss, per_sample = make_objective("vp-eps").loss(output, batch)
    torch.testing.assert_close(per_sample, torch.tensor([1.0, 4.0]))
    torch.testing.assert_close(loss, torch.tensor((1.0 * 1 + 0.5 * 4) / 2))
    with pytest.raises(ValueError, match="does not match"):
        make_objective("vp-eps").loss(output[:, :, :1], batch)


def test_select_takes_a_shard_of_every_field():
    x0, labels = clean_batch(8)
    batch = make_objective("vp-eps", null_class_id=NULL).sample(x0, labels, seeded(0))
    shard = batch.select(slice(2, 6))
    assert shard.noisy.shape[0] == shard.target.shape[0] == shard.loss_weight.shape[0] == 4
    assert torch.equal(shard.model_kwargs["timestep"], batch.model_kwargs["timestep"][2:6])
    assert torch.equal(shard.model_kwargs["class_labels"], batch.model_kwargs["class_labels"][2:6])


@pytest.mark.parametrize("name", ["vp-eps", "vp-x0", "vp-v"])
def test_exact_denoiser_beats_the_zero_predictor(mixture, name):
    """The exact posterior mean E[target | x_t] (the mixture's) minimises the loss; predicting 0 does not."""
    objective = make_objective(name)
    exact = ExactScoreModel.from_mixture(mixture, objective.prediction_type)
    x0 = mixture.sample(4096, seeded(0)).float()
    batch = objective.sample(x0, None, seeded(1))
    exact_loss, _ = objective.loss(exact(batch.noisy, batch.model_kwargs["timestep"]).sample, batch)
    zero_loss, _ = objective.loss(torch.zeros_like(batch.target), batch)
    shrunk_loss, _ = objective.loss(0.7 * exact(batch.noisy, batch.model_kwargs["timestep"]).sample, batch)
    assert exact_loss < 0.5 * zero_loss
    assert exact_loss < shrunk_loss
