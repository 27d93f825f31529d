"""Reading a study's split store for training (the same for every study).

A study's data stage writes a zarr group with ``<split>/x`` (N, C, H, W) and
``<split>/y`` (N, 1, H, W) for the splits ``train`` and ``val``, already
normalised (the Virgo study: Q-transform patches, N, n_aux, P, P).

:class:`ImageDataset` maps the node's one decompressed copy of a split
(:mod:`virgo_exps.train.nodecopy`: who makes it, where, and who may remove it).

:class:`ShardSampler` gives every rank its share of each global batch: the
epoch's permutation depends only on (seed, epoch), and rank r takes positions
r, r+W, r+2W, ... of it. Local batch k of all ranks together is then exactly
global batch k of a single process with the same seed, which is what makes the
strategies comparable step by step, and it can start at any batch, which is
what makes mid-epoch resume exact.
"""

from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from virgo_exps.train.nodecopy import NodeCopy, open_group


class ImageDataset(Dataset):
    """(x, y) pairs of one split, as float32 tensors mapped from the node's one copy of the split.

    Close it (or use it as a context manager) when done; the interpreter's exit
    closes it too. ``node_dir`` puts the copy there instead of /dev/shm or TMPDIR.
    """

    def __init__(self, path: str | Path, split: str, node_dir: str | Path | None = None):
        root = Path(path)
        group = open_group(root)
        if split not in group:
            raise KeyError(f"{path}: no split {split!r}; found {sorted(group.group_keys())}")
        self.attrs = dict(group.attrs)
        self._copy = NodeCopy(root, group, split, [Path(node_dir)] if node_dir else None)
        self._finalizer = weakref.finalize(self, self._copy.release)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            self.x = torch.from_numpy(self._copy.x)
            self.y = torch.from_numpy(self._copy.y)

    @property
    def copy_path(self) -> Path:
        """The node's file this data set maps."""
        return self._copy.path

    def close(self) -> None:
        self.x = self.y = None
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Fancy-indexed batch: much faster than collating single items (copies out of the mapped file)."""
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
