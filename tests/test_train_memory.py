"""A training process keeps the memory it frees (train/memory.py): a step's buffers cost no page faults at
the next step. Counted by the kernel (getrusage's minor faults) in fresh processes, so the host's load does
not enter."""

from __future__ import annotations

import subprocess
import sys

# A step's pattern: buffers of a few MB each (a batch, activations, gradients), all freed at its end.
STEP = r"""
import resource, sys
import numpy as np
if sys.argv[1] == "keep":
    from virgo_exps.train.memory import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()
def step():
    blocks = [np.ones(n, dtype=np.float32) for n in (3_000_000, 1_500_000, 6_000_000, 2_000_000, 4_000_000, 500_000)]
    return sum(float(b[0]) for b in blocks)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""
PAGES_PER_STEP = 17_000_000 * 4 // 4096  # the step's bytes in 4 KiB pages


def _faults(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", STEP, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


def test_a_training_process_reuses_what_it_freed_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # glibc's own choice gives part of the step's memory back and faults it in again at every step
    assert default > 0.05 * PAGES_PER_STEP, default
    assert kept < 0.01 * PAGES_PER_STEP, (kept, default)
