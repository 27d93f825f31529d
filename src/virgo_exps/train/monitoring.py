"""Measurements for the scalability report: computation fraction and GPU data.

- :func:`computation_fraction` runs a few training steps under the torch
  profiler and compares the time spent in compute kernels with the wall time
  of the window. Communication (all-reduce, broadcast, waiting on other ranks)
  and everything outside kernels is "other".
- :class:`GpuMonitor` samples NVML in a background thread: utilisation, and
  energy from the cumulative energy counter where the GPU has one (Volta and
  newer), or power integrated over real timestamps otherwise. On a machine
  without NVIDIA GPUs it records nothing and the report says so. It also counts
  the compute processes of other jobs on the same device.
- :class:`HostLoad` samples the host's runnable tasks in a background thread,
  so that each epoch gets the load of its own window (the kernel's 1-minute
  load average lags a short epoch by a minute).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

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
        self.others_max = 0  # compute processes of other jobs on the device, most seen since the last window
        self._energy0 = None
        self._energy1 = None
        self._stopped: dict | None = None  # what stop() returned

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
                self.others_max = max(self.others_max, self._other_processes())
            except Exception:
                pass
            self._stop.wait(self.interval)

    def _other_processes(self) -> int:
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        return len(other_gpu_processes([p.pid for p in procs], os.getpid()))

    def others_window(self) -> int | None:
        """Most compute processes of other jobs seen on this GPU since the previous call; None off GPU."""
        if self._thread is None:
            return None
        n, self.others_max = self.others_max, 0
        return n

    def energy_wh_so_far(self) -> float | None:
        """GPU energy since start() (up to stop() once stopped); None off GPU or where nothing measures it."""
        if self._stopped is not None:
            return self._stopped.get("energy_wh")
        if self._thread is None:
            return None
        measured = self._energy_wh()
        return measured[0] if measured else None

    def _energy_wh(self) -> tuple[float, str] | None:
        """GPU energy since start() and how it was measured: NVML's energy counter, else the sampled
        power integrated over time; None when neither can say."""
        now = self._energy_mj() if self._energy0 is not None else None
        if now is not None:
            self._energy1 = now
            return (now - self._energy0) / 3.6e6, "nvml_total_energy_counter"
        samples = list(self.samples)
        if len(samples) > 1:
            joules = sum(0.5 * (a[2] + b[2]) * (b[0] - a[0]) for a, b in zip(samples, samples[1:]))
            return joules / 3600.0, "power_integrated"
        return None

    def stop(self) -> dict:
        """Stop sampling; return utilisation and energy (empty off GPU)."""
        if self._thread is None:
            return self._stopped or {}
        self._stop.set()
        self._thread.join()
        self._thread = None
        out: dict = {"gpu_name": self._nvml.nvmlDeviceGetName(self._handle)}
        if self.samples:
            out["utilization_pct"] = sum(s[1] for s in self.samples) / len(self.samples)
        measured = self._energy_wh()
        if measured:
            out["energy_wh"], out["energy_source"] = measured
        self._stopped = out
        return out


def runnable_tasks(stat_path: str = "/proc/stat") -> int | None:
    """Tasks running or waiting for a CPU right now (``procs_running`` of /proc/stat); None off Linux."""
    try:
        with open(stat_path) as fh:
            for line in fh:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class HostLoad:
    """Runnable tasks per usable core over a window, sampled every ``interval`` seconds.

    The run itself counts one per process of its job on this host that is
    running, however many threads it keeps busy (Horovod's background thread,
    gloo's, the data loader's): a run alone reads at most its processes per
    core, about 1.0 when it has a core per rank. More than that is other work
    competing for the same cores while the window was timed.
    """

    # Every 0.5 s: at 0.1 s the sampling thread's wake-ups cost the training about 3 % of its step time on
    # 2 cores (benchmarks/trainer.py), at 0.5 s about 1 %. A window without a sample takes one when it ends.
    def __init__(self, interval: float = 0.5, refresh: float = 2.0):
        self.interval, self.refresh = interval, refresh
        self.cores = max(1, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._lock = threading.Lock()
        self._sum, self._n = 0, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._job: set[int] = {os.getpid()}
        self._job_at = 0.0

    def start(self) -> HostLoad:
        if runnable_tasks() is None:
            return self
        self._thread = threading.Thread(target=self._loop, daemon=True, name="host-load")
        self._thread.start()
        return self

    def sample(self) -> int | None:
        """Runnable tasks now, with the run's own processes counted once each (None off Linux)."""
        now = time.monotonic()
        if now - self._job_at > self.refresh:
            self._job, self._job_at = job_processes(os.getpid()), now
        # The run's threads are read just before and just after the host's count: a thread of ours running
        # at either moment is ours in the count (one read alone, taken a moment apart, would count a thread
        # of ours that stopped in between as other work).
        before = {pid: running_threads(pid) for pid in self._job}
        n = runnable_tasks()
        if n is None:
            return None
        threads = processes = 0
        for pid, earlier in before.items():
            running = earlier | running_threads(pid)
            threads += len(running)
            processes += bool(running)
        # This sampling thread runs while it reads: its process counts as running.
        if os.getpid() in self._job and not before.get(os.getpid()):
            processes += 1
        return max(0, n - threads) + processes

    def _loop(self) -> None:
        while not self._stop.is_set():
            n = self.sample()
            if n is not None:
                with self._lock:
                    self._sum += n
                    self._n += 1
            self._stop.wait(self.interval)

    def window(self) -> float | None:
        """Mean runnable tasks per core since the previous call (None when nothing was sampled)."""
        with self._lock:
            total, n = self._sum, self._n
            self._sum, self._n = 0, 0
        if not n and self._thread is not None:  # a window shorter than the interval: one sample, now
            now = self.sample()
            total, n = (now, 1) if now is not None else (0, 0)
        return total / n / self.cores if n else None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def running_threads(pid: int) -> set[str]:
    """Threads of ``pid`` running or waiting for a CPU now (state R), by thread id."""
    running: set[str] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return running
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "R":
                    running.add(tid)
        except (OSError, IndexError):
            continue
    return running


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def job_processes(own_pid: int) -> set[int]:
    """This rank's job on this host: the processes under its launcher (torchrun, the DeepSpeed
    or Horovod launcher, the stage, the Slurm step), and on SLURM every process of the same job
    (the simulated cluster's other nodes share this host)."""
    pids = _all_pids()
    children: dict[int, list[int]] = {}
    for pid in pids:
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    job = {own_pid}
    root = _parent(own_pid)
    todo = [root] if root and root > 1 else []
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            if child not in job:
                job.add(child)
                todo.append(child)
    slurm_job = os.environ.get("SLURM_JOB_ID")
    if slurm_job:
        mark = f"SLURM_JOB_ID={slurm_job}".encode()
        cluster = os.environ.get("SLURM_CLUSTER_NAME")
        for pid in pids:
            try:
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    env = fh.read().split(b"\0")
            except OSError:
                continue
            if mark in env and (cluster is None or f"SLURM_CLUSTER_NAME={cluster}".encode() in env):
                job.add(pid)
    return job


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def other_gpu_processes(gpu_pids: list[int], own_pid: int) -> list[int]:
    """The GPU's compute processes that are neither this rank nor another rank of its job.

    The ranks of one job on a node are children of one launcher process
    (torchrun, the DeepSpeed or Horovod launcher, or the Slurm step), so a
    process with another parent is someone else's; so is a process NVML lists
    but /proc does not show (another container's).
    """
    parent = _parent(own_pid)
    return [pid for pid in gpu_pids if pid != own_pid and (parent is None or _parent(pid) != parent)]
