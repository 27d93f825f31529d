"""Trainer overhead and input-pipeline cost, measured in one run; prints one JSON object.

    python benchmarks/trainer.py [--quick] [--model decoder|unet] [--patch 64] [--batch 32]

- ``overhead_ratio``: time per optimiser step of our Trainer (single-process
  strategy, real ImageDataset read from a zarr store, ShardSampler, scheduler,
  stop checks) over a bare PyTorch loop on the same model, data and batch,
  with tensors already in memory, the same network, seed and optimiser
  settings (train.seed, train.lr, train.weight_decay). Goal: <= 1.02.
  ``median_round_overhead_ratio`` is the median of the rounds' own ratios
  (each round's two sides ran back to back, under the same load).
- ``minor_faults_per_step``: page faults per step of each side (from
  getrusage; independent of the host's load). Both sides run with glibc's
  thresholds as every training process sets them (train/memory.py).
- ``loader_ratio``: training throughput reading batches through our dataset
  from the zarr store over indexing in-memory tensors directly. Goal: >= 0.95.

Both sides of each ratio run alternately in several rounds, in the opposite
order every other round, and the best round of each side is compared: on a
shared machine, other load only ever slows a round down, so the best round is
the closest to the code's own cost and both sides get the same chance at a
quiet moment. The medians and the host's load per core during the rounds are
printed too; a ratio whose sides' best rounds ran under different load says
so in ``warning``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from virgo_exps.config import params_from_dict  # noqa: E402
from virgo_exps.study.models import build_model  # noqa: E402
from virgo_exps.train.data import ImageDataset, ShardSampler  # noqa: E402
from virgo_exps.train.memory import keep_freed_memory  # noqa: E402
from virgo_exps.train.strategies import get_strategy  # noqa: E402
from virgo_exps.train.trainer import ModelFactory, Trainer, TrainOutputs  # noqa: E402


def make_store(path: Path, n: int, channels: int, patch: int) -> None:
    import zarr

    rng = np.random.default_rng(0)
    group = zarr.open_group(str(path), mode="w")
    for split, count in (("train", n), ("val", max(8, n // 8))):
        x = rng.standard_normal((count, channels, patch, patch)).astype("float32")
        y = rng.standard_normal((count, 1, patch, patch)).astype("float32")
        group.create_array(f"{split}/x", data=x, chunks=(256, channels, patch, patch))
        group.create_array(f"{split}/y", data=y, chunks=(256, 1, patch, patch))
    group.attrs["complete"] = True


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def train_params(model_name: str, batch: int, n: int):
    raw = {
        "generate": {"n_samples": n + max(8, n // 8)},
        "preprocess": {"val_fraction": 0.1},
        "train": {"model": model_name, "global_batch_size": batch, "epochs": 2, "profile_steps": 0, "warmup_steps": 1},
    }
    return params_from_dict(raw)


def bare_loop(x: torch.Tensor, y: torch.Tensor, model_name: str, batch: int, steps: int, seed: int) -> float:
    """Seconds per step of the plainest correct loop: the Trainer's network, seed and optimiser settings."""
    cfg = train_params(model_name, batch, x.shape[0]).train
    torch.manual_seed(cfg.seed)
    model = build_model(model_name, x.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.MSELoss()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=g)
    model.train()
    # Two passes, the first untimed: the same warm-up the Trainer's epoch 1 gives it.
    for _timed in (False, True):
        t0 = time.perf_counter()
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            xb, yb = x[idx], y[idx]
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return (time.perf_counter() - t0) / steps


def trainer_run(store: Path, out: Path, model_name: str, batch: int, n: int) -> float:
    """Seconds per step of our Trainer over its timed epoch (epoch 2; epoch 1 is warm-up)."""
    params = train_params(model_name, batch, n)
    strategy = get_strategy("single")
    strategy.init()
    outputs = TrainOutputs(out / "ck", out / "model.pt", out / "metrics.json", out / "epochs.csv", out / "ranks.json")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    models = ModelFactory(build_model, code=(ROOT / "src/virgo_exps/study/models.py",))
    trainer = Trainer(params, strategy, store, outputs, tracker=None, models=models)
    trainer.fit()
    rec = trainer.history[-1]
    return rec.train_time_s / (n // batch)


def loader_throughput(store: Path, batch: int, model_name: str, steps: int, from_store: bool) -> float:
    """Samples/s of forward+backward with batches from our dataset or from plain tensors."""
    ds = ImageDataset(store, "train")
    if from_store:
        get = ds.batch
    else:
        x, y = ds.x.clone(), ds.y.clone()

        def get(idx):
            return x[idx], y[idx]

    sampler = ShardSampler(len(ds), batch, 0, 1, seed=0)
    torch.manual_seed(0)
    model = build_model(model_name, ds.n_channels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = list(sampler)
    xb, yb = get(batches[0] if from_store else torch.as_tensor(batches[0]))
    torch.nn.functional.mse_loss(model(xb), yb).backward()  # warm-up step, untimed
    t0 = time.perf_counter()
    done = 0
    for step in range(steps):
        idx = batches[step % len(batches)]
        xb, yb = get(idx if from_store else torch.as_tensor(idx))
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done += len(idx)
    return done / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="decoder")
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    repeats = args.repeats or (2 if args.quick else 8)
    keep_freed_memory()  # as Trainer.fit does in every training process: the bare loop runs with it too
    n = args.batch * (4 if args.quick else 10)
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "images.zarr"
        make_store(store, n, 3, args.patch)
        ds = ImageDataset(store, "train")
        ours, bare, with_store, in_memory, loads = [], [], [], [], []
        fault_counts: dict[str, list[float]] = {"trainer": [], "bare": []}
        cores = len(os.sched_getaffinity(0))
        steps = n // args.batch

        def counted(name, measure):
            def run():
                before = faults()
                value = measure()
                fault_counts[name].append((faults() - before) / (2 * steps))  # both sides: 2 passes
                return value

            return run

        for r in range(repeats):
            sides = [
                (bare, counted("bare", lambda: bare_loop(ds.x, ds.y, args.model, args.batch, steps, seed=0))),
                (ours, counted("trainer", lambda: trainer_run(store, Path(tmp) / "run", args.model, args.batch, n))),
                (in_memory, lambda: loader_throughput(store, args.batch, args.model, steps, False)),
                (with_store, lambda: loader_throughput(store, args.batch, args.model, steps, True)),
            ]
            pairs = [sides[0:2], sides[2:4]]
            for pair in pairs:
                for values, measure in pair if r % 2 == 0 else reversed(pair):
                    values.append(measure())
            loads.append(os.getloadavg()[0] / cores)
    best_ours, best_bare = min(ours), min(bare)
    best_store, best_memory = max(with_store), max(in_memory)
    result = {
        "overhead_ratio": best_ours / best_bare,
        "loader_ratio": best_store / best_memory,
        "trainer_step_s": best_ours,
        "bare_step_s": best_bare,
        "samples_per_s_from_store": best_store,
        "samples_per_s_in_memory": best_memory,
        "median_overhead_ratio": float(np.median(ours) / np.median(bare)),
        "median_round_overhead_ratio": float(np.median(np.array(ours) / np.array(bare))),
        "minor_faults_per_step": {k: round(float(np.median(v))) for k, v in fault_counts.items()},
        "median_loader_ratio": float(np.median(with_store) / np.median(in_memory)),
        "load_per_core_by_round": [round(x, 2) for x in loads],
        "settings": {
            "model": args.model,
            "patch": args.patch,
            "batch": args.batch,
            "steps": n // args.batch,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "device": "cpu",
        },
    }
    if max(loads) > 1.0:
        result["warning"] = (
            f"the host's load per core reached {max(loads):.2f} during the rounds: other work shared the cores, "
            "so the figures are upper bounds on the cost; rerun on a quiet machine"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
