"""Training throughput by precision on one device, and DDP over every GPU of the node; prints one JSON object.

    python benchmarks/gpu.py [--quick] [--model decoder] [--patch 64] [--channels 8] [--batch 64]

For each mode (fp32, bf16, and bf16 + torch.compile where there is a GPU) the training step of the trainer
(``train.precision`` autocast, AdamW, MSE) runs on batches read through the project's dataset from a zarr
store, and the script reports:

- ``samples_per_s``: training samples per second over the timed steps;
- ``loader_share``: the part of the step time spent getting the batch (reading it and moving it to the
  device); the target on a GPU is under 0.05;
- ``gpu_utilization_pct``, ``gpu_energy_wh_per_1k_samples``: NVML's figures while the mode ran (pynvml);
- ``peak_gpu_memory_mb``: torch's peak allocation.

The modes run alternately in several rounds (the order reversed every other round) and the best round of each
is reported, so that other load on a shared machine, which only slows a round down, touches each mode alike.
``bf16_speedup`` is bf16's samples/s over fp32's (target on an A100/H100-class GPU: at least 1.8 at the
paper preset's model size). With more than one GPU, ``ddp`` is the bf16 step under DDP on all of them
(torchrun, NCCL). Without a GPU it measures fp32 and bf16 on the CPU and says that the GPU part did not run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from virgo_exps.modelfile import count_parameters  # noqa: E402
from virgo_exps.study.models import build_model  # noqa: E402
from virgo_exps.train.data import ImageDataset, ShardSampler  # noqa: E402
from virgo_exps.train.monitoring import GpuMonitor  # noqa: E402
from virgo_exps.train.trainer import autocast  # noqa: E402


def make_store(path: Path, n: int, channels: int, patch: int) -> None:
    import zarr

    rng = np.random.default_rng(0)
    group = zarr.open_group(str(path), mode="w")
    for split, count in (("train", n), ("val", 8)):
        x = rng.standard_normal((count, channels, patch, patch)).astype("float32")
        y = rng.standard_normal((count, 1, patch, patch)).astype("float32")
        group.create_array(f"{split}/x", data=x, chunks=(256, channels, patch, patch))
        group.create_array(f"{split}/y", data=y, chunks=(256, 1, patch, patch))
    group.attrs["complete"] = True


def run_mode(store: Path, args, precision: str, compiled: bool, device: torch.device, ddp: bool = False) -> dict:
    """One round of one mode: warm-up steps, then timed steps; its figures."""
    ds = ImageDataset(store, "train")
    torch.manual_seed(0)
    model = build_model(args.model, ds.n_channels)
    if compiled:
        model.compile()
    model = model.to(device)
    rank, world = 0, 1
    if ddp:
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    loss_fn = torch.nn.MSELoss()
    batches = list(ShardSampler(len(ds), args.batch * world, rank, world, seed=0))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(idx) -> float:
        t0 = time.perf_counter()
        x, y = ds.batch(idx)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sync()
        loaded = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        with autocast(precision, device):
            loss = loss_fn(model(x), y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        return loaded

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    monitor = GpuMonitor(device.index or 0, interval=0.1) if device.type == "cuda" else None
    if monitor is not None:
        monitor.start()
    loading = 0.0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loading += step(batches[i % len(batches)])
    sync()
    elapsed = time.perf_counter() - t0
    gpu = monitor.stop() if monitor is not None else {}
    samples = args.steps * args.batch * world
    out = {"samples_per_s": samples / elapsed, "loader_share": loading / elapsed, "seconds": elapsed}
    if device.type == "cuda":
        out["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if "utilization_pct" in gpu:
        out["gpu_utilization_pct"] = gpu["utilization_pct"]
    if gpu.get("energy_wh") is not None:
        out["gpu_energy_wh_per_1k_samples"] = gpu["energy_wh"] / samples * 1000 * world
    return out


def ddp_worker(args) -> None:
    """One rank of the DDP measurement (started by torchrun); rank 0 prints its figures."""
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    result = run_mode(Path(args.store), args, "bf16", False, torch.device("cuda", local), ddp=True)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        print(json.dumps({"world_size": len(results), **results[0], "per_rank": results}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds (a check that it runs)")
    ap.add_argument("--model", default="decoder")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64, help="samples per step and device")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.steps = args.steps or (5 if args.quick else (100 if gpus else 20))
    args.warmup = 3 if args.quick else 10
    rounds = args.rounds or (1 if args.quick else 3)
    if args.ddp_worker:
        ddp_worker(args)
        return
    started = time.perf_counter()
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    modes = {"fp32": ("fp32", False), "bf16": ("bf16", False)}
    if gpus:
        modes["bf16+compile"] = ("bf16", True)
    with tempfile.TemporaryDirectory(prefix="virgo-bench-gpu-") as tmp:
        store = Path(tmp) / "images.zarr"
        n = args.batch * max(gpus, 1) * 8
        make_store(store, n, args.channels, args.patch)
        best: dict[str, dict] = {}
        for r in range(rounds):
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            for name in order:
                got = run_mode(store, args, *modes[name], device)
                if name not in best or got["samples_per_s"] > best[name]["samples_per_s"]:
                    best[name] = got
        report: dict = {
            "device": torch.cuda.get_device_name(0) if gpus else "cpu",
            "torch": torch.__version__,
            "model": args.model,
            "parameters": count_parameters(build_model(args.model, args.channels)),
            "input": [args.channels, args.patch, args.patch],
            "batch_per_device": args.batch,
            "timed_steps": args.steps,
            "rounds": rounds,
            "modes": best,
            "bf16_speedup": best["bf16"]["samples_per_s"] / best["fp32"]["samples_per_s"],
        }
        if not gpus:
            report["gpu"] = "no CUDA GPU here: fp32 and bf16 measured on the CPU; the GPU modes and DDP did not run"
            report["cpu_threads"] = torch.get_num_threads()
        elif gpus == 1:
            report["ddp"] = {"skipped": "one GPU on this node"}
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
            cmd += [__file__, "--ddp-worker", "--store", str(store), "--model", args.model, "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
            if proc.returncode != 0 or not lines:
                report["ddp"] = {"failed": proc.returncode, "stderr": proc.stderr[-2000:]}
            else:
                ddp = json.loads(lines[-1])
                ddp["scaling_efficiency"] = ddp["samples_per_s"] / (gpus * best["bf16"]["samples_per_s"])
                report["ddp"] = ddp
        report["wall_s"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
