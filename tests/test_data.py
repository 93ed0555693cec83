"""data: the MNIST split, folder and hf datasets, and the errors bad specs get."""

import pytest
import torch
from PIL import Image

from data import check_image_size, load_dataset, mnist_split_indices


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset("mnist")


@pytest.fixture(scope="module")
def mnist_heldout():
    return load_dataset("mnist", split="heldout")


def _save_image(path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


# ---------------------------------------------------------------- mnist


def test_mnist_split_sizes_and_classes(mnist_train, mnist_heldout):
    assert (len(mnist_train), len(mnist_heldout)) == (4500, 500)
    assert mnist_train.num_classes == 10
    assert mnist_train.class_names == [str(digit) for digit in range(10)]
    assert (mnist_train.channels, mnist_train.image_size, mnist_train.name) == (1, 32, "mnist")


def test_mnist_heldout_holds_50_of_each_digit(mnist_heldout):
    _, labels = mnist_heldout.tensors()
    assert torch.bincount(labels, minlength=10).tolist() == [50] * 10


def test_mnist_split_is_the_documented_fixed_one():
    # pinned: a change of seed or of the drawing order would silently move digits between the splits.
    assert mnist_split_indices("heldout")[:6].tolist() == [1, 2, 4, 7, 10, 13]
    assert sorted([*mnist_split_indices("train"), *mnist_split_indices("heldout")]) == list(range(5000))


def test_mnist_train_and_heldout_share_no_image(mnist_train, mnist_heldout):
    train_images = {image.numpy().tobytes() for image in mnist_train.images}
    assert not any(image.numpy().tobytes() in train_images for image in mnist_heldout.images)


def test_mnist_items_are_float_images_in_signed_unit_range(mnist_train):
    image, label = mnist_train[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32)
    assert isinstance(label, int)
    images, _ = mnist_train.tensors()
    assert images.min() == -1 and images.max() == 1


def test_mnist_32_pads_the_native_digit_with_background(mnist_heldout):
    padded, _ = mnist_heldout.tensors()
    native, _ = load_dataset("mnist", image_size=28, split="heldout").tensors()
    assert native.shape[-2:] == (28, 28)
    assert torch.equal(padded[:, :, 2:30, 2:30], native)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[:, :, border] == -1).all()


def test_mnist_other_sizes_and_three_channels():
    resized = load_dataset("mnist", image_size=16, split="heldout")
    assert resized[0][0].shape == (1, 16, 16)
    rgb, _ = load_dataset("mnist", image_size=16, channels=3, split="heldout").tensors()
    assert rgb.shape[1] == 3
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 0], rgb[:, 2])
    assert torch.equal(rgb[:, :1], resized.tensors()[0])


# ---------------------------------------------------------------- folder:PATH


def test_folder_class_subfolders_become_sorted_labels(tmp_path):
    for name, color in (("dog", (0, 0, 255)), ("cat", (255, 0, 0))):
        for index in range(3):
            _save_image(tmp_path / name / f"{index}.png", (40, 60), color)
    dataset = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2
    assert (len(dataset), dataset.channels, dataset.image_size) == (6, 3, 16)
    assert [dataset[index][1] for index in range(6)] == [0, 0, 0, 1, 1, 1]
    red_cat, _ = dataset[0]
    assert red_cat.shape == (3, 16, 16)
    assert torch.allclose(red_cat[0], torch.ones(16, 16)) and torch.allclose(red_cat[2], -torch.ones(16, 16))


def test_folder_resizes_the_shorter_side_and_center_crops(tmp_path):
    # 60×30: black 10-pixel bands at the left and right of a white middle. Fitting the 30-pixel side to 16
    # and cropping the middle keeps only white; squashing the whole width into 16 would keep black edges.
    image = Image.new("L", (60, 30), 0)
    image.paste(255, (10, 0, 50, 30))
    image.save(tmp_path / "wide.png")
    fitted, _ = load_dataset(f"folder:{tmp_path}", image_size=16)[0]
    assert fitted.shape == (1, 16, 16)
    assert fitted.min() > 0.9


def test_folder_channels_default_to_grayscale_only_when_every_image_is(tmp_path):
    _save_image(tmp_path / "gray" / "a.png", (8, 8), 128, mode="L")
    _save_image(tmp_path / "gray" / "b.png", (8, 8), 0, mode="L")
    _save_image(tmp_path / "mixed" / "a.png", (8, 8), 128, mode="L")
    _save_image(tmp_path / "mixed" / "b.jpg", (8, 8), (10, 200, 30))
    assert load_dataset(f"folder:{tmp_path / 'gray'}", image_size=8).channels == 1
    assert load_dataset(f"folder:{tmp_path / 'mixed'}", image_size=8).channels == 3
    as_gray = load_dataset(f"folder:{tmp_path / 'mixed'}", image_size=8, channels=1)
    assert as_gray[1][0].shape == (1, 8, 8)
    as_rgb, _ = load_dataset(f"folder:{tmp_path / 'gray'}", image_size=8, channels=3)[0]
    assert as_rgb.shape == (3, 8, 8) and torch.equal(as_rgb[0], as_rgb[2])


def test_unlabelled_folder(tmp_path):
    for index in range(4):
        _save_image(tmp_path / f"{index}.png", (8, 8), (index * 60, 0, 0))
    dataset = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert (len(dataset), dataset.num_classes, dataset.class_names) == (4, 0, [])
    assert {dataset[index][1] for index in range(4)} == {0}


def test_folder_with_train_and_heldout_subfolders(tmp_path):
    for split, count in (("train", 3), ("heldout", 1)):
        for name in ("a", "b"):
            for index in range(count):
                _save_image(tmp_path / split / name / f"{index}.png", (8, 8), (0, 255, 0))
    assert len(load_dataset(f"folder:{tmp_path}", image_size=8)) == 6
    heldout = load_dataset(f"folder:{tmp_path}", image_size=8, split="heldout")
    assert (len(heldout), heldout.class_names) == (2, ["a", "b"])


# ---------------------------------------------------------------- hf:NAME[:SPLIT]


@pytest.fixture
def saved_hf_dataset(tmp_path):
    import datasets

    # "picture" is not a conventional image column name: it must be found by its datasets.Image feature.
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    pictures = [Image.new("L", (12, 10), value) for value in (0, 255, 0, 255)]
    dataset = datasets.Dataset.from_dict({"picture": pictures, "label": [0, 1, 0, 1]}, features=features)
    path = tmp_path / "saved"
    datasets.DatasetDict({"train": dataset.select([0, 1, 2]), "test": dataset.select([3])}).save_to_disk(path)
    return path


def test_hf_dataset_saved_to_disk(saved_hf_dataset):
    dataset = load_dataset(f"hf:{saved_hf_dataset}", image_size=8)
    assert (len(dataset), dataset.class_names, dataset.channels) == (3, ["dark", "light"], 1)
    assert [dataset[index][1] for index in range(3)] == [0, 1, 0]
    light, _ = dataset[1]
    assert light.shape == (1, 8, 8) and torch.allclose(light, torch.ones_like(light))


def test_hf_heldout_reads_the_test_split_and_specs_can_pin_a_split(saved_hf_dataset):
    assert len(load_dataset(f"hf:{saved_hf_dataset}", image_size=8, split="heldout")) == 1
    assert len(load_dataset(f"hf:{saved_hf_dataset}:test", image_size=8)) == 1
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_dataset(f"hf:{saved_hf_dataset}", image_size=8, split="validation")


# ---------------------------------------------------------------- errors


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        load_dataset(f"folder:{tmp_path}")


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_dataset(f"folder:{tmp_path / 'absent'}")


def test_corrupt_image_is_an_error_naming_the_file(tmp_path):
    _save_image(tmp_path / "good.png", (8, 8), (0, 0, 0))
    (tmp_path / "x.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"x\.png"):
        load_dataset(f"folder:{tmp_path}")


def test_images_next_to_class_folders_is_an_error(tmp_path):
    _save_image(tmp_path / "loose.png", (8, 8), (0, 0, 0))
    _save_image(tmp_path / "cls" / "a.png", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match="mixes images"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize("channels", [0, 2, 4])
def test_unsupported_channel_counts_are_errors(channels):
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_dataset("mnist", channels=channels)


@pytest.mark.parametrize("image_size", [0, -32, 32.0])
def test_bad_image_sizes_are_errors(image_size):
    with pytest.raises(ValueError, match="image size must be a positive integer"):
        load_dataset("mnist", image_size=image_size)


def test_image_size_must_divide_by_the_unet_factor():
    check_image_size(32, 8)
    with pytest.raises(ValueError, match="image size 30 is not divisible by 8, the UNet's downsampling factor"):
        check_image_size(30, 8)


@pytest.mark.parametrize("spec", ["imagenet", "folder:", "hf:", "s3:bucket/mnist"])
def test_unknown_specs_are_errors(spec):
    with pytest.raises(ValueError, match="unknown dataset spec"):
        load_dataset(spec)


def test_unknown_splits_are_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_dataset("mnist", split="test")
    _save_image(tmp_path / "a.png", (8, 8), (0, 0, 0))
    with pytest.raises(ValueError, match="no 'heldout' split"):
        load_dataset(f"folder:{tmp_path}", split="heldout")
