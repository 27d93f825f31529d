"""The preprocessed store: its layout, creating its arrays, writing each split in whole chunks,
and opening it.

Output (zarr v3 group, published atomically like the generated store)
---------------------------------------------------------------------
``train/x`` float32 (N_train, n_aux, P, P), ``train/y`` float32
(N_train, 1, P, P), ``train/index`` int64 (N_train,) original sample ids,
``train/window`` int32 (N_train, 2) first time bin and first frequency bin of
the patch on the Q-transform grid; the same under ``val/``. Root attributes:
``norm`` = {x_mean, x_std, y_mean, y_std}, ``patch_size``, ``params`` (the
preprocess parameters), ``generate`` (the source store's attributes),
``grid`` (origin, step and size of the time and frequency axes),
``frange_effective`` (the band on the grid, after q_transform's Nyquist cap),
``log_scale``, ``smoothing``, counts, and ``complete: true`` written last.
Patch pixel ``[i, j]`` of a sample with window ``(wt, wf)`` sits at time
``grid.t0 + (wt + i) * grid.dt`` and frequency ``grid.f0 + (wf + j) * grid.df``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from virgo_exps import store as _store

# Samples per chunk along axis 0 of every output array. Training reads whole
# splits or large contiguous slices; 256 samples (~12 MB of x for 3 aux
# channels and 64 x 64 patches) keep the number of files and the per-chunk
# overhead small, make each read a large sequential one that decompresses
# in parallel, and still let a rank or a DataLoader worker read a shard
# without decompressing much more than it needs.
OUT_CHUNK = 256


class _SplitWriter:
    """Collects a split's patches in sample order and writes whole output
    chunks (aligned writes only: each chunk is compressed and written once)."""

    def __init__(self, group, split: str, index: np.ndarray, n_aux: int, p: int):
        self.x, self.y = group[f"{split}/x"], group[f"{split}/y"]
        self.n = index.size
        self.chunk = self.x.chunks[0]
        self.bx = np.empty((self.chunk, n_aux, p, p), dtype=np.float32)
        self.by = np.empty((self.chunk, 1, p, p), dtype=np.float32)
        self.windows = np.zeros((self.n, 2), dtype=np.int32)
        self.pos = 0  # next position in the split
        self.fill = 0  # rows in the buffer

    def add(self, patches: np.ndarray, windows: np.ndarray) -> None:
        """Append the next samples of the split (in split order)."""
        n = len(patches)
        self.windows[self.pos : self.pos + n] = windows
        i = 0
        while i < n:
            take = min(self.chunk - self.fill, n - i)
            self.by[self.fill : self.fill + take, 0] = patches[i : i + take, 0]
            self.bx[self.fill : self.fill + take] = patches[i : i + take, 1:]
            self.fill += take
            self.pos += take
            i += take
            if self.fill == self.chunk:
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        start = self.pos - self.fill  # the buffer holds rows [pos - fill, pos)
        self.x[start : self.pos] = self.bx[: self.fill]
        self.y[start : self.pos] = self.by[: self.fill]
        self.fill = 0

    def close(self) -> None:
        self._flush()
        if self.pos != self.n:
            raise RuntimeError(f"split writer got {self.pos} of {self.n} samples")


def _create_output(path: Path, splits: dict, n_aux: int, p: int) -> object:
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    opts = _store.array_options()
    for split, index in splits.items():
        n = int(index.size)
        c = max(1, min(OUT_CHUNK, n))
        sub = group.create_group(split)
        sub.create_array(
            "x",
            shape=(n, n_aux, p, p),
            chunks=(c, n_aux, p, p),
            dtype="float32",
            **opts,
            dimension_names=("sample", "channel", "time", "frequency"),
        )
        sub.create_array(
            "y",
            shape=(n, 1, p, p),
            chunks=(c, 1, p, p),
            dtype="float32",
            **opts,
            dimension_names=("sample", "channel", "time", "frequency"),
        )
        sub.create_array(
            "index",
            shape=(n,),
            chunks=(max(1, n),),
            dtype="int64",
            **opts,
            dimension_names=("sample",),
        )
        sub.create_array(
            "window",
            shape=(n, 2),
            chunks=(max(1, n), 2),
            dtype="int32",
            **opts,
            dimension_names=("sample", "corner"),
        )
        sub["index"][:] = index.astype(np.int64)
    return group


def open_images(path: Path):
    """The complete preprocessed group (read-only)."""
    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete", False):
        raise RuntimeError(f"{path}: the preprocessed store is incomplete; rerun the preprocess stage")
    return group


__all__ = [
    "OUT_CHUNK",
    "open_images",
]
