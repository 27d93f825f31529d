"""Measurements for the scalability report: computation fraction and GPU data.

- :func:`computation_fraction` runs a few training steps under the torch
  profiler and compares the time spent in compute kernels with the wall time
  of the window. Communication (all-reduce, broadcast, waiting on other ranks)
  and everything outside kernels is "other".
- :class:`GpuMonitor` samples NVML in a background thread: utilisation, and
  energy from the cumulative energy counter where the GPU has one (Volta and
  newer), or power integrated over real timestamps otherwise. On a machine
  without NVIDIA GPUs it records nothing and the report says so.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

# Substrings of profiler event names that are communication, not computation.
_COMM = (
    "allreduce",
    "all_reduce",
    "allgather",
    "all_gather",
    "broadcast",
    "barrier",
    "gloo",
    "nccl",
    "c10d",
    "horovod",
    "hvd",
    "reduce_scatter",
    "wait",
)


def _is_compute(name: str) -> bool:
    low = name.lower()
    if any(tag in low for tag in _COMM):
        return False
    return low.startswith("aten::") or "kernel" in low or low.startswith("void ")


def computation_fraction(run_steps: Callable[[], object], device: torch.device) -> dict:
    """Profile ``run_steps()``; return compute seconds, window seconds and their ratio."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    on_gpu = device.type == "cuda"
    if on_gpu:
        activities.append(ProfilerActivity.CUDA)
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run_steps()
        if on_gpu:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    compute_us = 0.0
    for ev in prof.key_averages():
        if not _is_compute(ev.key):
            continue
        if on_gpu:
            compute_us += getattr(ev, "self_device_time_total", 0.0) or 0.0
        else:
            compute_us += ev.self_cpu_time_total
    compute = compute_us / 1e6
    return {"compute_s": compute, "window_s": wall, "fraction": min(1.0, compute / wall) if wall > 0 else 0.0}


class GpuMonitor:
    """Samples this rank's GPU every ``interval`` seconds while training runs."""

    def __init__(self, local_rank: int = 0, interval: float = 0.5):
        self.local_rank, self.interval = local_rank, interval
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._handle = None
        self._nvml = None
        self.samples: list[tuple[float, float, float]] = []  # (time, utilisation %, power W)
        self._energy0 = None
        self._energy1 = None

    def start(self) -> None:
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # NVML missing or refused: metrics stay absent
            return
        self._energy0 = self._energy_mj()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _energy_mj(self):
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                power = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
                self.samples.append((time.time(), float(util), power))
            except Exception:
                pass
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        """Stop sampling; return utilisation and energy (empty off GPU)."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._energy1 = self._energy_mj()
        out: dict = {"gpu_name": self._nvml.nvmlDeviceGetName(self._handle)}
        if self.samples:
            out["utilization_pct"] = sum(s[1] for s in self.samples) / len(self.samples)
        if self._energy0 is not None and self._energy1 is not None:
            out["energy_wh"] = (self._energy1 - self._energy0) / 3.6e6
            out["energy_source"] = "nvml_total_energy_counter"
        elif len(self.samples) > 1:
            joules = sum(0.5 * (a[2] + b[2]) * (b[0] - a[0]) for a, b in zip(self.samples, self.samples[1:]))
            out["energy_wh"] = joules / 3600.0
            out["energy_source"] = "power_integrated"
        return out
