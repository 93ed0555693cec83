"""The data order and random streams of a training run: pure functions of (seed, position).

Every process draws the same *global* batch (batch × processes images) and trains on its own contiguous shard
(rank r takes images r·batch … (r+1)·batch − 1). Global batch k is items k·G … (k+1)·G − 1 of the endless
concatenation of per-epoch permutations, epoch e's permutation drawn from a generator seeded by (seed, e). So a
resumed run continues the exact sequence, and N processes × batch B compute what 1 process × batch N·B does.
Noise comes from generators seeded by (seed, stream, index), the same on every process and after resuming.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from data import ImageDataset, load_dataset

# Independent random streams of a run, mixed into the seed so that data order and noise never share draws:
# 0 is the data order; trainers number their noise streams from 1 (diffusion 1; GAN 2, 3; VAE 2).
DATA_STREAM = 0
SUBSET_SEED = 0  # --max-train-images takes the first N images of this fixed shuffle, whatever --seed is


def derived_seed(seed: int, stream: int, index: int) -> int:
    """A well-mixed 63-bit seed for item ``index`` of random ``stream`` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seeded_generator(seed: int, stream: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, stream, index))


class GlobalBatchOrder:
    """Endless, seeded, resumable order of global batches (a ``DataLoader`` batch sampler).

    Global batch k is positions k·G … (k+1)·G − 1 of the concatenation of per-epoch permutations of the
    dataset, epoch e's permutation drawn from (seed, e); iteration starts at batch ``start_batch``.
    """

    def __init__(self, dataset_size: int, global_batch_size: int, seed: int, start_batch: int = 0):
        if dataset_size < 1 or global_batch_size < 1:
            raise ValueError(f"need a non-empty dataset and batch, got {dataset_size} images and a batch of "
                             f"{global_batch_size}")
        self.dataset_size = dataset_size
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.start_batch = start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.dataset_size, generator=seeded_generator(self.seed, DATA_STREAM, epoch))

    def batch_indices(self, batch: int) -> list[int]:
        positions = torch.arange(batch * self.global_batch_size, (batch + 1) * self.global_batch_size)
        epochs, offsets = positions // self.dataset_size, positions % self.dataset_size
        indices = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            in_epoch = epochs == epoch
            indices[in_epoch] = self.permutation(epoch)[offsets[in_epoch]]
        return indices.tolist()

    def __iter__(self):
        batch = self.start_batch
        while True:
            yield self.batch_indices(batch)
            batch += 1


def rank_shard(batch_size: int, process_index: int) -> slice:
    """The contiguous part of a global batch that process ``process_index`` trains on."""
    return slice(process_index * batch_size, (process_index + 1) * batch_size)


def training_data(args: argparse.Namespace) -> tuple[ImageDataset, Dataset]:
    """The dataset (for its metadata) and what is trained on: all of it, or the fixed ``--max-train-images`` subset."""
    dataset = load_dataset(args.dataset, image_size=args.image_size, split="train")
    if args.max_train_images is None or args.max_train_images >= len(dataset):
        return dataset, dataset
    subset = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return dataset, Subset(dataset, subset[: args.max_train_images].tolist())
