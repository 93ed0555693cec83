"""The noise-conditional classifier: its save/load round trip and the shipped checkpoint's accuracy by noise level."""

import pytest
import torch

from data import load_dataset
from models.classifier import NoisyClassifier
from train.classifier import accuracy_per_noise_level, main, noised


def test_noisy_classifier_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    classifier = NoisyClassifier(widths=(8, 16), feature_dim=16, time_dim=16).eval()
    classifier.save_pretrained(tmp_path, safe_serialization=True)
    loaded = NoisyClassifier.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(classifier(x, torch.tensor([0, 500, 999])), loaded(x, torch.tensor([0, 500, 999])))
    assert loaded.features(x, 10).shape == (3, 16)
    assert not any(path.suffix in (".bin", ".pt", ".pkl") for path in tmp_path.iterdir())


def test_noised_inputs_follow_the_classifier_schedule():
    classifier = NoisyClassifier(widths=(8,), feature_dim=8, time_dim=8)
    x0 = torch.ones(2, 1, 4, 4)
    x_t = noised(classifier, x0, torch.tensor([0, 999]), torch.Generator().manual_seed(0))
    alpha, beta = classifier.schedule.coefficients(torch.tensor([0, 999]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x_t, alpha.float()[:, None, None, None] * x0 + beta.float()[:, None, None, None] * noise)


@pytest.mark.parametrize("size", [32, 28])  # trained at 32×32; the 28×28 models guide it at their native size
def test_shipped_classifier_reads_clean_digits_and_knows_nothing_at_full_noise(size):
    torch.set_num_threads(1)
    classifier = NoisyClassifier.from_pretrained("checkpoints/mnist-noisy-classifier").eval()
    images, labels = load_dataset("mnist", image_size=size, split="heldout").tensors()
    accuracy = accuracy_per_noise_level(classifier, images, labels, timesteps=(0, 200, 999))
    assert accuracy[0] >= 0.95 and accuracy[200] >= 0.9  # README: 97.4% / 97.2% at 32×32, 96.8% / 96.6% at 28×28
    assert accuracy[999] <= 0.2  # σ = 157: chance is 10%


def test_training_writes_the_model_and_an_accuracy_table_at_both_sizes(tmp_path):
    torch.set_num_threads(1)
    main(["--out", str(tmp_path), "--steps", "2", "--batch-size", "8", "--cpu"])
    readme = (tmp_path / "README.md").read_text()
    assert "| t | σ | accuracy at 32×32 | accuracy at 28×28 |" in readme
    assert len([line for line in readme.splitlines() if line.startswith("| 999 | 157 |")]) == 1
    assert NoisyClassifier.from_pretrained(tmp_path).config.num_train_timesteps == 1000
