"""GAN/VAE pipelines (arguments, outputs, save/load round trip, shipped checkpoints) and the sample metrics."""

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline

import pipelines
from data import load_dataset
from evaluation.judge import judge_accuracy, load_judge
from evaluation.metrics import class_coverage, judge_predictions, precision_recall
from models.gan import Critic, Generator
from models.vae import ConvVAE, HierarchicalVAE
from pipelines import GANPipeline, VAEPipeline

REPO = Path(__file__).resolve().parents[1]
SIZE = dict(image_size=16, num_classes=3)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def make(kind: str):
    torch.manual_seed(0)
    if kind == "gan":
        pipe = GANPipeline(Generator(latent_dim=8, base_channels=8, **SIZE).eval(),
                           Critic(latent_dim=8, base_channels=8, ogan=True, **SIZE).eval(), {"process": "gan"})
    elif kind == "gan-unconditional":
        pipe = GANPipeline(Generator(latent_dim=8, base_channels=8, image_size=16).eval(), None, {"process": "gan"})
    elif kind == "vae":
        pipe = VAEPipeline(ConvVAE(latent_dim=4, base_channels=8, **SIZE).eval(), {"process": "vae"})
    else:
        pipe = VAEPipeline(HierarchicalVAE(width=8, latent_channels=2, groups_per_scale=(1, 1), **SIZE).eval(),
                           {"process": "vae"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


KINDS = ["gan", "gan-unconditional", "vae", "nvae"]


def test_the_pipelines_package_exports_them_for_the_app():
    for name in ("GANPipeline", "VAEPipeline"):
        assert name in pipelines.__all__ and issubclass(getattr(pipelines, name), DiffusionPipeline)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_gives_the_same_images(kind, tmp_path):
    pipe = make(kind)
    labels = None if kind == "gan-unconditional" else [0, 1, 2]
    before = pipe(batch_size=3, class_labels=labels, generator=seeded(4), output_type="raw").images
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    weights = [p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".json",)]
    assert weights and all(name.endswith(".safetensors") for name in weights)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == type(pipe).__name__
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    after = loaded(batch_size=3, class_labels=labels, generator=seeded(4), output_type="raw").images
    assert torch.equal(before, after)
    assert loaded.config.model_info["process"] == pipe.config.model_info["process"]


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_output_types_and_nfe(kind):
    pipe = make(kind)
    out = pipe(batch_size=2, class_labels=1, generator=seeded(0))
    assert out.nfe == 1 and len(out.images) == 2 and isinstance(out.images[0], PIL.Image.Image)
    array = pipe(batch_size=2, class_labels=1, generator=seeded(0), output_type="np").images
    tensor = pipe(batch_size=2, class_labels=1, generator=seeded(0), output_type="pt").images
    raw = pipe(batch_size=2, class_labels=1, generator=seeded(0), output_type="raw").images
    assert array.shape == (2, 16, 16, 1) and tensor.shape == (2, 1, 16, 16)
    assert np.allclose(array[..., 0], tensor[:, 0].numpy(), atol=1e-6)
    assert torch.allclose(tensor, (raw / 2 + 0.5).clamp(0, 1), atol=1e-6)
    images, nfe = pipe(batch_size=2, class_labels=1, generator=seeded(0), output_type="pt", return_dict=False)
    assert nfe == 1 and torch.equal(images, tensor)


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_one_generator_per_image_seeds_each_image(kind):
    pipe = make(kind)
    both = pipe(batch_size=2, class_labels=[0, 2], generator=[seeded(1), seeded(2)], output_type="raw").images
    second = pipe(batch_size=1, class_labels=[2], generator=[seeded(2)], output_type="raw").images
    assert torch.allclose(both[1:], second, atol=1e-6)


def test_unlabelled_calls_of_a_conditional_model_draw_classes_from_the_generator():
    pipe = make("gan")
    a = pipe(batch_size=6, generator=seeded(3), output_type="raw").images
    b = pipe(batch_size=6, generator=seeded(3), output_type="raw").images
    assert torch.equal(a, b)


BAD_CALLS = [
    ("gan", dict(batch_size=0), "batch_size must be a positive integer"),
    ("vae", dict(batch_size="4"), "batch_size must be a positive integer"),
    ("gan", dict(batch_size=2, output_type="jpeg"), "output_type must be one of"),
    ("vae", dict(batch_size=2, class_labels=[0, 1, 2]), "got 3 class labels for batch_size 2"),
    ("gan", dict(batch_size=2, class_labels=3), r"class labels must be in \[0, 2\]"),
    ("vae", dict(batch_size=2, class_labels=-1), r"class labels must be in \[0, 2\]"),
    ("gan-unconditional", dict(batch_size=2, class_labels=0), "unconditional"),
    ("gan", dict(batch_size=2, class_labels=0, latents=torch.zeros(2, 5)), r"latents must have shape \(2, 8\)"),
    ("vae", dict(batch_size=2, class_labels=0, temperature=math.nan), "temperature"),
    ("nvae", dict(batch_size=2, class_labels=0, temperature=-1.0), "temperature"),
]


@pytest.mark.parametrize("kind, kwargs, message", BAD_CALLS)
def test_bad_arguments_raise_clear_errors(kind, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(kind)(**kwargs)


def test_encoding_needs_an_ogan_critic_and_labels_where_conditional():
    images = torch.zeros(2, 1, 16, 16)
    with pytest.raises(ValueError, match="no O-GAN encoder"):
        make("gan-unconditional").encode(images)
    with pytest.raises(ValueError, match="pass the images' class_labels"):
        make("vae").bits_per_dim(images)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 16, 16\)"):
        make("vae").reconstruct(torch.zeros(2, 1, 8, 8), class_labels=[0, 1])


def test_bits_per_dim_is_the_negative_elbo_over_d_ln2():
    pipe = make("vae")
    images = torch.linspace(-1, 1, 256)[torch.randint(256, (2, 1, 16, 16), generator=seeded(0))]
    bits = pipe.bits_per_dim(images, class_labels=[0, 1], generator=seeded(5))
    from models.vae import discretized_logistic_log_likelihood

    output = pipe.vae(images, torch.tensor([0, 1]), generator=seeded(5))
    elbo = discretized_logistic_log_likelihood(images, output.mean, output.log_scale) - output.kl
    assert torch.allclose(bits, -elbo / (256 * math.log(2)))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_precision_recall_matches_a_hand_computed_case():
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # k = 1 radii: 1, 1, 1, 8
    fake = torch.tensor([[0.5], [5.0], [20.0]])  # radii: 4.5, 4.5, 15
    # precision: 0.5 (within 1 of 0) and 5 (within 8 of 10) are inside, 20 is not; recall: every real point
    # is inside a fake ball (10 is within 15 of 20)
    assert precision_recall(real, fake, k=1) == pytest.approx({"precision": 2 / 3, "recall": 1.0})
    same = torch.randn(50, 4, generator=seeded(0))
    assert precision_recall(same, same.clone()) == {"precision": 1.0, "recall": 1.0}
    with pytest.raises(ValueError, match="feature sizes differ"):
        precision_recall(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="N > k"):
        precision_recall(torch.zeros(3, 2), torch.zeros(5, 2))


def test_class_coverage_and_entropy():
    collapsed = class_coverage(torch.tensor([0, 0, 1, 1]), 10)
    assert collapsed["coverage"] == pytest.approx(0.2) and collapsed["entropy_bits"] == pytest.approx(1.0)
    balanced = class_coverage(torch.arange(10).repeat(3), 10)
    assert balanced["coverage"] == 1.0 and balanced["entropy_bits"] == pytest.approx(math.log2(10))
    with pytest.raises(ValueError, match="predictions"):
        class_coverage(torch.tensor([10]), 10)


def test_judge_predictions_agree_with_judge_accuracy():
    judge = load_judge(REPO / "checkpoints/mnist-judge")
    images, labels = load_dataset("mnist", image_size=32, split="heldout").tensors()
    predictions = judge_predictions(judge, images[:200])
    assert (predictions == labels[:200]).float().mean().item() == pytest.approx(
        judge_accuracy(judge, images[:200], labels[:200]))


# --------------------------------------------------------------------------------------------------
# Shipped checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls, process, min_accuracy", [
    ("mnist-gan-qp", GANPipeline, "gan", 0.8),
    ("mnist-vae", VAEPipeline, "vae", 0.6),  # blurry samples: 72% on these 50
])
def test_shipped_baselines_load_and_draw_the_asked_digits(name, cls, process, min_accuracy):
    path = REPO / "checkpoints" / name
    assert all(p.suffix != ".bin" for p in path.rglob("*"))
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    info = pipe.config.model_info
    assert info["process"] == process and info["num_classes"] == 10 and info["image_size"] == 32
    assert f"-m train.{process}" in info["training_command"]
    labels = torch.arange(10).repeat(5)
    images = pipe(batch_size=50, class_labels=labels, generator=seeded(0), output_type="raw").images
    judge = load_judge(REPO / "checkpoints/mnist-judge")
    assert judge_accuracy(judge, images.clamp(-1, 1), labels) >= min_accuracy
