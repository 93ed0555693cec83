"""``evaluation.sampling``: the one way every scorer, preview and benchmark draws images."""

import numpy as np
import pytest
import torch

from evaluation.exact import ExactScoreModel, GaussianMixture
from evaluation.metrics import load_images
from evaluation.sampling import UNCONDITIONAL_ROWS, class_balanced_labels, image_grid, sample_images
from models.gan import Generator
from pipelines import DiffusionImagePipeline, GANPipeline
from schedulers import DDIMScheduler

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 3


def exact_pipeline(num_classes: int) -> DiffusionImagePipeline:
    mixture = GaussianMixture.random((1, 4, 4), 6, rank=2, num_classes=num_classes, seed=1)
    pipe = DiffusionImagePipeline(ExactScoreModel.from_mixture(mixture), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def conditional():
    return exact_pipeline(num_classes=3)


@pytest.fixture(scope="module")
def unconditional():
    return exact_pipeline(num_classes=0)


def batchwise_reference(pipe, labels, batch_size, seed, **call_kwargs):
    """What ``train.evaluate_model.generate`` drew, written out: call i on the i-th ``batch_size`` labels, its
    noise from seed + i, raw output clamped to [-1, 1]. Every published score was sampled this way."""
    return torch.cat([pipe(batch_size=len(batch), class_labels=batch, generator=torch.Generator().manual_seed(seed + i),
                           output_type="raw", **call_kwargs).images
                      for i, batch in enumerate(labels.split(batch_size))]).clamp(-1, 1)


def test_class_balanced_labels_give_every_class_the_same_count_in_turn():
    assert class_balanced_labels(3, 6).tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(torch.bincount(class_balanced_labels(10, 1000)), torch.full((10,), 100))


def test_samples_have_the_asked_shape_and_lie_in_the_data_range(conditional, unconditional):
    labels = class_balanced_labels(3, 9)
    images = sample_images(conditional, class_labels=labels, batch_size=4, num_inference_steps=STEPS,
                           guidance_scale=2.0)
    assert images.shape == (9, 1, 4, 4)
    assert images.min() >= -1 and images.max() <= 1
    assert sample_images(unconditional, 5, batch_size=2, num_inference_steps=STEPS).shape == (5, 1, 4, 4)
    as_list = sample_images(conditional, class_labels=labels.tolist(), batch_size=4, num_inference_steps=STEPS,
                            guidance_scale=2.0)
    assert torch.equal(as_list, images)
    raw = sample_images(conditional, class_labels=labels, batch_size=4, num_inference_steps=STEPS,
                        guidance_scale=2.0, clamp=False)  # the overshoot, as the sampler left it
    assert torch.equal(raw.clamp(-1, 1), images)


def test_batches_are_seeded_as_the_published_scores_were(conditional, unconditional):
    labels = class_balanced_labels(3, 12)
    options = dict(num_inference_steps=STEPS, guidance_scale=1.5)
    ours = sample_images(conditional, class_labels=labels, seed=7, batch_size=5, **options)
    assert torch.equal(ours, batchwise_reference(conditional, labels, 5, 7, **options))
    assert torch.equal(sample_images(conditional, class_labels=labels, seed=7, batch_size=5, **options), ours)
    assert not torch.equal(sample_images(conditional, class_labels=labels, seed=8, batch_size=5, **options), ours)
    # unconditional: the same rule with no labels
    first = unconditional(batch_size=3, generator=torch.Generator().manual_seed(2), output_type="raw",
                          num_inference_steps=STEPS).images.clamp(-1, 1)
    assert torch.equal(sample_images(unconditional, 5, seed=2, batch_size=3, num_inference_steps=STEPS)[:3], first)


def test_gan_pipelines_draw_through_the_same_service():
    torch.manual_seed(0)
    gan = GANPipeline(Generator(latent_dim=8, base_channels=8, image_size=16, num_classes=3).eval(), None,
                      {"process": "gan"})
    gan.set_progress_bar_config(disable=True)
    labels = class_balanced_labels(3, 6)
    images = sample_images(gan, class_labels=labels, seed=3, batch_size=4)
    assert images.shape == (6, 1, 16, 16)
    assert torch.equal(images, batchwise_reference(gan, labels, 4, 3))


def test_progress_reports_after_every_batch(conditional):
    calls = []
    sample_images(conditional, class_labels=class_balanced_labels(3, 9), batch_size=4, num_inference_steps=STEPS,
                  progress=lambda done, total: calls.append((done, total)))
    assert calls == [(4, 9), (8, 9), (9, 9)]


def test_image_grid_has_a_row_per_class_and_grey_borders(conditional):
    columns = 4
    grid = np.asarray(image_grid(conditional, columns, seed=5, num_inference_steps=STEPS, guidance_scale=2.0))
    assert grid.shape == (3 * 6, columns * 6)  # 4×4 digits, each framed by a 1-pixel border
    assert (grid[0] == 128).all() and (grid[:, 0] == 128).all()
    # the images are one call seeded with ``seed``, rendered as the pipelines' "np" output
    drawn = conditional(batch_size=3 * columns, class_labels=class_balanced_labels(3, 3 * columns),
                        generator=torch.Generator().manual_seed(5), output_type="np", num_inference_steps=STEPS,
                        guidance_scale=2.0).images
    second_row_third_image = grid[6 + 1:6 + 5, 2 * 6 + 1:2 * 6 + 5]
    assert np.array_equal(second_row_third_image, (drawn[columns + 2, :, :, 0] * 255).round().astype(np.uint8))


def test_image_grid_of_an_unconditional_model_ignores_guidance(unconditional):
    grid = image_grid(unconditional, 3, seed=1, num_inference_steps=STEPS, guidance_scale=4.0)
    assert grid.size == (3 * 6, UNCONDITIONAL_ROWS * 6)
    assert np.array_equal(np.asarray(grid), np.asarray(image_grid(unconditional, 3, seed=1, num_inference_steps=STEPS)))


@pytest.mark.parametrize("call, message", [
    (lambda pipe: class_balanced_labels(3, 7), "cannot be shared equally among 3 classes"),
    (lambda pipe: class_balanced_labels(0, 6), "num_classes must be at least 1"),
    (lambda pipe: sample_images(pipe), "at least one image"),
    (lambda pipe: sample_images(pipe, 0), "at least one image"),
    (lambda pipe: sample_images(pipe, 4, class_labels=[0, 1, 2]), "count is 4 but there are 3 class labels"),
    (lambda pipe: sample_images(pipe, class_labels=torch.zeros(2, 2, dtype=torch.long)), "one label per image"),
    (lambda pipe: sample_images(pipe, 4, batch_size=0), "batch_size must be at least 1"),
    (lambda pipe: image_grid(pipe, 0), "columns must be at least 1"),
])
def test_bad_requests_are_clear_errors(conditional, call, message):
    with pytest.raises(ValueError, match=message):
        call(conditional)


def test_the_metrics_command_line_samples_a_pipeline_directory_through_the_service(conditional, tmp_path):
    conditional.save_pretrained(tmp_path, safe_serialization=True)
    images, labels = load_images(tmp_path, samples=6, steps=STEPS, guidance=2.0, seed=4)
    assert labels.tolist() == class_balanced_labels(3, 6).tolist()
    assert torch.equal(images, sample_images(conditional, class_labels=labels, seed=4, num_inference_steps=STEPS,
                                             guidance_scale=2.0))
