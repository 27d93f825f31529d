"""Test hooks: a stop request, a crash, a stall or a slow step, on purpose (``VIRGO_FAULT_*``).

Not part of training: the trainer calls :func:`at_step` once before each step (and once after each
epoch), and without these variables it does nothing. A run they touch records no result: it fails,
or it is interrupted and resumes bit-identically (:mod:`virgo_exps.envvars`).

    VIRGO_FAULT_STOP_AT_STEP=k   rank 0 behaves as if signalled after global step k
    VIRGO_FAULT_CRASH=r:k        rank r raises an error at global step k
    VIRGO_FAULT_HANG=r:k         rank r stops making progress at global step k
    VIRGO_FAULT_STEP_SLEEP=s     sleep s seconds before every step (to interrupt a short run)
"""

from __future__ import annotations

import os
import time


def at_step(rank: int, is_main: bool, global_step: int) -> bool:
    """Apply the faults asked for at this point of the run; True when this rank is to behave as if it
    had been asked to stop (SIGUSR1 or SIGTERM)."""
    pause = os.environ.get("VIRGO_FAULT_STEP_SLEEP")
    if pause:
        time.sleep(float(pause))
    stop_at = os.environ.get("VIRGO_FAULT_STOP_AT_STEP")
    stop = bool(stop_at and is_main and global_step == int(stop_at))
    hang = os.environ.get("VIRGO_FAULT_HANG")
    if hang:
        r, step = (int(v) for v in hang.split(":"))
        if rank == r and global_step == step:
            time.sleep(3600)  # a rank stuck (a dead file system, a lost GPU): the watchdog ends the run
    crash = os.environ.get("VIRGO_FAULT_CRASH")
    if crash:
        r, step = (int(v) for v in crash.split(":"))
        if rank == r and global_step == step:
            raise RuntimeError(f"injected fault at step {step} (VIRGO_FAULT_CRASH)")
    return stop
