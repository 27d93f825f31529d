"""The split into training and validation samples, and the normalisation with statistics of the
training split only.

1. Split (:func:`split_indices`): ``perm = default_rng(split_seed).permutation(n)``;
   the first ``round(n * val_fraction)`` ids are the validation split, the
   rest the training split; both are kept in increasing id order.
2. Statistics (:class:`Moments`): per-channel moments of the training split,
   accumulated in float64 with Chan et al.'s pairwise merge, in sample order,
   so the result does not depend on the number of workers.
3. Normalisation (:func:`_normalise_chunk`, one output chunk at a time, in
   place): ``x = (x - x_mean[c]) / x_std[c]`` per auxiliary channel,
   ``y = (y - y_mean) / y_std``. Standard deviations are population ones
   (ddof=0), so the training split has mean 0 and std 1 per channel up to
   float32 rounding.
"""

from __future__ import annotations

import numpy as np


def split_indices(n: int, val_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, validation ids), each sorted."""
    perm = np.random.default_rng(split_seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class Moments:
    """Streaming per-channel count, mean and M2 (float64; Chan's merge)."""

    def __init__(self, k: int):
        self.n = 0
        self.mean = np.zeros(k)
        self.m2 = np.zeros(k)

    def add(self, a: np.ndarray) -> None:
        """``a``: (m, k, ...) values of k channels."""
        if a.shape[0] == 0:
            return
        a = np.moveaxis(np.asarray(a, dtype=np.float64), 1, 0).reshape(a.shape[1], -1)
        nb = a.shape[1]
        mb = a.mean(axis=1)
        m2b = ((a - mb[:, None]) ** 2).sum(axis=1)
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    @property
    def std(self) -> np.ndarray:
        s = np.sqrt(self.m2 / max(self.n, 1))
        return np.where(s > 0, s, 1.0)


def _normalise_chunk(arr, start: int, stop: int, mean: np.ndarray, std: np.ndarray) -> int:
    data = np.asarray(arr[start:stop], dtype=np.float64)
    shape = (1, -1) + (1,) * (data.ndim - 2)
    data -= mean.reshape(shape)
    data /= std.reshape(shape)
    arr[start:stop] = data.astype(np.float32)
    return stop - start


__all__ = [
    "Moments",
    "split_indices",
]
