"""The training process keeps the memory it frees, for the next step to reuse.

glibc's malloc gives large blocks back to the kernel when they are freed (blocks above a threshold are
mapped and unmapped on their own; the top of the heap is trimmed), and the kernel hands out zeroed pages
again at the next step: a page fault per 4 KiB of every batch, activation and gradient. Measured with
``benchmarks/trainer.py``'s model (the decoder on 32 patches of 3 x 64 x 64): about 35,000 minor faults per
step in the trainer (17,000 in a bare loop on in-memory tensors), 35 to 40 with the thresholds fixed below. The
memory kept is the step's own peak, which the next step needs again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB x sizeof(long)): a block of
# more stays mapped on its own
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30  # the freed top of the heap the process keeps before giving any back


@cache
def keep_freed_memory() -> bool:
    """Fix glibc's thresholds (once per process) so that freed blocks stay with the process; False where
    the C library is not glibc (nothing changed)."""
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is not None and hasattr(libc, "gnu_get_libc_version"):
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except OSError:
        ok = False
    return ok
