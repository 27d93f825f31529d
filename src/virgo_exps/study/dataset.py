"""Reading the preprocessed zarr store for training.

The store written by :mod:`virgo_exps.study.preprocess` holds ``<split>/x``
(N, n_aux, P, P) and ``<split>/y`` (N, 1, P, P), already normalised.

:class:`ShardSampler` gives every rank its share of each global batch: the
epoch's permutation depends only on (seed, epoch), and rank r takes positions
r, r+W, r+2W, ... of it. Local batch k of all ranks together is then exactly
global batch k of a single process with the same seed, which is what makes the
strategies comparable step by step, and it can start at any batch, which is
what makes mid-epoch resume exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import Dataset, Sampler

from virgo_exps.store import read


def _open_group(path: Path):
    import zarr

    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete", False):
        raise RuntimeError(f"{path}: the preprocessed store is incomplete; rerun the preprocess stage")
    return group


class ImageDataset(Dataset):
    """(x, y) pairs of one split, held in memory as float32 tensors.

    The default data sets are a few MB to a few GB, so reading each split once
    into memory makes the input pipeline free. A split larger than
    ``max_fraction`` of the available memory is refused with a clear message
    rather than swapping.
    """

    def __init__(self, path: str | Path, split: str, max_fraction: float = 0.5):
        group = _open_group(Path(path))
        if split not in group:
            raise KeyError(f"{path}: no split {split!r}; found {sorted(group.group_keys())}")
        xa, ya = group[f"{split}/x"], group[f"{split}/y"]
        need = (np.prod(xa.shape) + np.prod(ya.shape)) * 4
        avail = psutil.virtual_memory().available
        if need > max_fraction * avail:
            raise MemoryError(
                f"{path}/{split}: {need / 2**30:.1f} GiB does not fit in memory "
                f"({avail / 2**30:.1f} GiB available); use more nodes or a smaller data set"
            )
        # checksummed reads: a damaged chunk stops training with the store, the chunk and the fix
        self.x = torch.from_numpy(np.asarray(read(xa, path, stage="preprocess"), dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(read(ya, path, stage="preprocess"), dtype=np.float32))
        self.attrs = dict(group.attrs)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Fancy-indexed batch: much faster than collating single items."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    @property
    def n_channels(self) -> int:
        return self.x.shape[1]


class ShardSampler(Sampler[list[int]]):
    """Yields this rank's index lists, one per global batch, for one epoch.

    Incomplete last global batches are dropped, so every strategy and world
    size takes the same number of optimiser steps per epoch.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, shuffle: bool = True):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world}")
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.local_batch = global_batch // world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch() - self.start_step

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        for step in range(self.start_step, self.steps_per_epoch()):
            block = order[step * self.global_batch : (step + 1) * self.global_batch]
            yield block[self.rank :: self.world].tolist()


def eval_shard(n: int, rank: int, world: int) -> list[int]:
    """Validation indices of one rank: every sample exactly once over all ranks."""
    return list(range(rank, n, world))
