"""The shipped MNIST judge (checkpoints/mnist-judge) and the scores built on it."""

from pathlib import Path

import pytest
import torch

from data import load_dataset
from evaluation.judge import (
    feature_fid,
    heldout_digits,
    judge_accuracy,
    judge_features,
    load_judge,
    real_fid_floor,
)
from models.judge import MNISTJudge

SHIPPED_JUDGE = Path(__file__).resolve().parents[1] / "checkpoints" / "mnist-judge"


@pytest.fixture(scope="module")
def judge():
    return load_judge(SHIPPED_JUDGE)


@pytest.fixture(scope="module")
def heldout():
    return load_dataset("mnist", image_size=32, split="heldout").tensors()


@pytest.fixture(scope="module")
def shuffled_pixels(heldout):
    """Each held-out digit with its pixels permuted: the same intensities, none of the strokes."""
    images, _ = heldout
    generator = torch.Generator().manual_seed(0)
    flat = images.reshape(len(images), -1)
    order = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(len(images))])
    return flat.gather(1, order).reshape(images.shape)


def test_shipped_checkpoint_is_small_safetensors():
    weights = list(SHIPPED_JUDGE.glob("*.safetensors"))
    assert len(weights) == 1 and weights[0].stat().st_size < 2_000_000
    assert not list(SHIPPED_JUDGE.glob("*.bin")) and not list(SHIPPED_JUDGE.glob("*.pt"))
    assert (SHIPPED_JUDGE / "README.md").is_file()


def test_shipped_judge_is_at_least_97_percent_accurate_on_heldout(judge, heldout):
    assert not judge.training
    assert judge_accuracy(judge, *heldout) >= 0.97


def test_judge_pads_native_28_pixel_digits(judge, heldout):
    images, _ = heldout
    native, _ = load_dataset("mnist", image_size=28, split="heldout").tensors()
    with torch.no_grad():
        assert torch.allclose(judge(native[:16]), judge(images[:16]))


def test_features_are_128_dimensional(judge, heldout):
    images, _ = heldout
    features = judge_features(judge, images[:300], batch_size=128)
    assert features.shape == (300, 128)
    assert torch.allclose(features[:10], judge_features(judge, images[:10]), atol=1e-5)


def test_feature_fid_of_a_set_with_itself_is_zero(judge, heldout):
    images, _ = heldout
    assert feature_fid(judge, images, images) == pytest.approx(0.0, abs=1e-3 * real_fid_floor(judge))


def test_feature_fid_is_symmetric_and_nonnegative(judge, heldout):
    images, _ = heldout
    forward, backward = feature_fid(judge, images[:200], images[200:]), feature_fid(judge, images[200:], images[:200])
    assert forward >= 0 and backward >= 0
    assert forward == pytest.approx(backward, rel=1e-3)


def test_real_digits_are_far_closer_to_each_other_than_to_shuffled_pixels(judge, heldout, shuffled_pixels):
    images, _ = heldout
    floor = real_fid_floor(judge)
    assert floor > 0
    assert feature_fid(judge, images, shuffled_pixels) > 10 * floor


def test_load_judge_without_a_path_is_the_shipped_judge_from_any_directory(judge, heldout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images, _ = heldout
    with torch.no_grad():
        assert torch.equal(load_judge()(images[:8]), judge(images[:8]))


def test_heldout_digits_are_fifty_of_each_digit_in_the_data_range(heldout):
    images, labels = heldout_digits()
    assert torch.equal(images, heldout[0]) and torch.equal(labels, heldout[1])
    assert images.shape == (500, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert torch.equal(torch.bincount(labels), torch.full((10,), 50))


def test_load_judge_names_a_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no MNIST judge checkpoint"):
        load_judge(tmp_path)


def test_judge_round_trips_through_save_pretrained(tmp_path, heldout):
    images, _ = heldout
    fresh = MNISTJudge().eval()
    fresh.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = load_judge(tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(images[:8]), reloaded(images[:8]))


def test_bad_inputs_are_errors(judge, heldout):
    images, labels = heldout
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        judge_features(judge, (images[:4] + 1) * 127.5)
    with pytest.raises(ValueError, match="N×1×32×32"):
        judge_features(judge, images[:4].repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="one label per image"):
        judge_accuracy(judge, images[:4], labels[:3])
    with pytest.raises(ValueError, match="at least 2 images"):
        feature_fid(judge, images[:1], images[:8])
    training_judge = MNISTJudge().train()
    with pytest.raises(ValueError, match="training mode"):
        judge_features(training_judge, images[:4])
