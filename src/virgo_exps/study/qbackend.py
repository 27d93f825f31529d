"""Where the Q-transform's kernels run: numpy fast paths for CPU tensors, torch everywhere else,
and the one median both the transform and the whitening use.

On CPU the bin gather (:mod:`virgo_exps.study.qtransform`) and the median use numpy
(``take``/``partition``), which is markedly faster there than the torch equivalents.
:data:`CPU_NUMPY_PATHS` turns those paths off, so that every device takes the torch-only path a GPU
takes (the tests compare the two on CPU).
"""

from __future__ import annotations

import numpy as np
import torch

# numpy fast paths for CPU tensors; off, every device takes the torch-only path
# a GPU takes (the tests compare the two on CPU).
CPU_NUMPY_PATHS = True


def _numpy_path(t: torch.Tensor | torch.device) -> bool:
    device = t if isinstance(t, torch.device) else t.device
    return CPU_NUMPY_PATHS and device.type == "cpu"


def _median(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Median along ``dim``; mean of the two middle values for even sizes
    (numpy's convention; ``torch.median`` would return the lower one)."""
    n = x.shape[dim]
    if _numpy_path(x):
        # one introselect partition is much faster than sorting; the lower
        # middle value is then the largest element left of the pivot
        part = np.partition(x.detach().numpy(), n // 2, axis=dim)
        upper = np.take(part, n // 2, axis=dim)
        if n % 2:
            return torch.from_numpy(np.ascontiguousarray(upper))
        left = [slice(None)] * part.ndim
        left[dim] = slice(0, n // 2)
        lower = part[tuple(left)].max(axis=dim)
        return torch.from_numpy(0.5 * (lower + upper))
    ordered = x.sort(dim=dim).values
    upper = ordered.select(dim, n // 2)
    if n % 2:
        return upper
    return 0.5 * (ordered.select(dim, n // 2 - 1) + upper)
