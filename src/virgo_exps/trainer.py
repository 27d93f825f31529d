"""The training loop, identical for every strategy.

Launch (from the repository root; ``stages/train.py`` builds these for you):

    python stages/train.py --worker ...                                    # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        stages/train.py --worker ...                                      # DDP / DeepSpeed, 2 ranks
    horovodrun --gloo -np 2 -H localhost:2 python stages/train.py --worker ...  # Horovod

Resume: when the checkpoint directory holds a snapshot of the same
configuration (only ``train.epochs`` and ``train.max_requeues`` may differ),
training continues from it: weights, optimiser, scheduler, epoch, step within
the epoch and every rank's RNG state. The data order depends only on
(seed, epoch), so an interrupted-then-resumed run computes exactly what an
uninterrupted one does.

Interruption: SIGUSR1 or SIGTERM sets a flag; at the next step boundary all
ranks agree to stop (one tiny all-reduce), rank 0 writes a snapshot and every
rank exits with :data:`EXIT_INTERRUPTED`, which the SLURM launcher takes as
"requeue me".
"""

from __future__ import annotations

import copy
import dataclasses
import csv
import json
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import Params, as_flat_dict
from .machines import active_machine_name
from .dataset import ImageDataset, ShardSampler, eval_shard
from .models import build_model, count_parameters
from .monitoring import GpuMonitor, computation_fraction
from .strategies import Strategy

EXIT_INTERRUPTED = 85
SNAPSHOT = "snapshot.pt"
STATUS = "status.json"  # {"status": running|interrupted|complete, "epoch", "step_in_epoch"}
# Keys that may change between a snapshot and the run that resumes from it.
RESUMABLE_KEYS = {"train.epochs", "train.max_requeues"}


@dataclass
class TrainOutputs:
    """Every path the train stage writes (all from dvc.yaml)."""

    checkpoints: Path  # persistent: the snapshot to resume from
    model: Path  # final weights and model arguments
    metrics: Path  # final metrics (DVC metrics)
    epochs: Path  # one row per epoch (DVC plots)
    ranks: Path  # per-rank figures (computation fraction, GPU energy)


@dataclass
class EpochRecord:
    epoch: int
    step: int
    train_loss: float
    val_loss: float
    train_time_s: float
    val_time_s: float
    samples_per_s: float
    lr: float


class Interrupted(Exception):
    """Raised after the snapshot is written, when a stop was requested."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's model name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, params: Params, strategy: Strategy, data: Path, outputs: TrainOutputs, tracker=None):
        self.params = params
        self.cfg = params.train
        self.strategy = strategy
        self.data = Path(data)
        self.out = outputs
        self.tracker = tracker
        self._stop = False
        self.history: list[EpochRecord] = []
        self.epoch = 0  # epochs completed
        self.step_in_epoch = 0  # steps completed in the current epoch
        self.global_step = 0
        self.computation: dict | None = None
        self.placement: list[dict] = []  # host and device of every rank
        # Partial sums of the current epoch, kept in the snapshot so a resumed
        # epoch reports the same loss as an uninterrupted one.
        self._loss_sum = torch.zeros(1, dtype=torch.float64)
        self._epoch_steps = 0

    # -- set-up -----------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop = True

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, request_stop)

    def _setup(self) -> None:
        s = self.strategy
        torch.manual_seed(self.cfg.seed)
        self.train_set = ImageDataset(self.data, "train")
        self.val_set = ImageDataset(self.data, "val")
        model = build_model(self.cfg.model, self.train_set.n_channels)
        self.n_parameters = count_parameters(model)
        lr = self.cfg.lr * (s.world_size if self.cfg.lr_scaling == "linear" else 1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=self.cfg.weight_decay)
        self.local_batch = self.cfg.global_batch_size // s.world_size
        self.model, self.optimizer = s.wrap(model, optimizer, self.local_batch)
        warmup = self.cfg.warmup_steps
        # Constant rate after a linear warm-up: the schedule must not depend on
        # train.epochs, or continuing a run with more epochs would differ from
        # training that many epochs in one go.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.sampler = ShardSampler(
            len(self.train_set), self.cfg.global_batch_size, s.rank, s.world_size, self.cfg.seed
        )
        if self.sampler.steps_per_epoch() == 0:
            raise ValueError("train.global_batch_size is larger than the training split")
        self.loss_fn = nn.MSELoss()

    # -- snapshots ----------------------------------------------------------
    def _config_key(self) -> dict:
        return {k: v for k, v in as_flat_dict(self.params).items() if k not in RESUMABLE_KEYS}

    def _save_snapshot(self, status: str) -> None:
        rng = self.strategy.all_gather_object(
            {"rng": _rng_state(), "loss_sum": self._loss_sum.clone(), "epoch_steps": self._epoch_steps}
        )
        if not self.strategy.is_main:
            return
        self.out.checkpoints.mkdir(parents=True, exist_ok=True)
        snapshot = {
            "model": self.strategy.unwrap(self.model).state_dict(),
            "optimizer": self.strategy.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": rng,
            "world_size": self.strategy.world_size,
            "config": self._config_key(),
            "model_args": {"name": self.cfg.model, "in_channels": self.train_set.n_channels},
            "history": [asdict(r) for r in self.history],
            "computation": self.computation,
            "status": status,
        }
        _atomic_torch_save(snapshot, self.out.checkpoints / SNAPSHOT)
        _atomic_write_text(
            self.out.checkpoints / STATUS,
            json.dumps({"status": status, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                        "global_step": self.global_step}) + "\n",
        )

    def _load_snapshot(self) -> bool:
        path = self.out.checkpoints / SNAPSHOT
        if not path.exists():
            return False
        snap = torch.load(path, map_location="cpu", weights_only=False)
        reason = None
        if snap.get("config") != self._config_key():
            changed = sorted(
                k for k in set(snap.get("config", {})) | set(self._config_key())
                if snap.get("config", {}).get(k) != self._config_key().get(k)
            )
            reason = f"configuration changed ({', '.join(changed[:5])})"
        elif snap.get("world_size") != self.strategy.world_size:
            reason = f"world size changed ({snap.get('world_size')} -> {self.strategy.world_size})"
        if reason:
            if self.strategy.is_main:
                print(f"train: not resuming from {path}: {reason}; starting afresh", file=sys.stderr)
            return False
        self.strategy.unwrap(self.model).load_state_dict(snap["model"])
        self.strategy.load_optimizer_state(self.optimizer, snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        self.epoch = snap["epoch"]
        self.step_in_epoch = snap["step_in_epoch"]
        self.global_step = snap["global_step"]
        self.history = [EpochRecord(**r) for r in snap["history"]]
        self.computation = snap.get("computation")
        mine = snap["rng"][self.strategy.rank]
        _set_rng_state(mine["rng"])
        self._loss_sum = mine["loss_sum"].clone()
        self._epoch_steps = mine["epoch_steps"]
        if self.strategy.is_main:
            print(
                f"train: resuming from {path} at epoch {self.epoch + 1}, step {self.step_in_epoch} "
                f"(status {snap.get('status')})",
                file=sys.stderr,
            )
        return True

    # -- the loop ------------------------------------------------------------
    def _inject_faults(self) -> None:
        """Test hooks: a stop request or a crash at a given step (environment variables).

        VIRGO_FAULT_STOP_AT_STEP=k   rank 0 behaves as if signalled after global step k
        VIRGO_FAULT_CRASH=r:k        rank r raises an error at global step k
        """
        stop_at = os.environ.get("VIRGO_FAULT_STOP_AT_STEP")
        if stop_at and self.strategy.is_main and self.global_step == int(stop_at):
            self._stop = True
        crash = os.environ.get("VIRGO_FAULT_CRASH")
        if crash:
            rank, step = (int(v) for v in crash.split(":"))
            if self.strategy.rank == rank and self.global_step == step:
                raise RuntimeError(f"injected fault at step {step} (VIRGO_FAULT_CRASH)")

    def _should_stop(self) -> bool:
        self._inject_faults()
        flag = torch.tensor([1.0 if self._stop else 0.0])
        if self.strategy.world_size > 1:
            flag = self.strategy.all_reduce(flag, op="max")
        return bool(flag.item() > 0)

    def _run_batch(self, indices: list[int]) -> torch.Tensor:
        x, y = self.train_set.batch(indices)
        x, y = x.to(self.strategy.device, non_blocking=True), y.to(self.strategy.device, non_blocking=True)
        loss = self.loss_fn(self.model(x), y)
        self.strategy.backward_and_step(loss, self.model, self.optimizer)
        self.scheduler.step()
        return loss.detach()

    def _run_epoch(self) -> tuple[float, float, int, int]:
        """Train one epoch (or its remainder).

        Returns (sum of step losses over the epoch, seconds, steps in the
        epoch, steps run by this call: fewer than the epoch after a resume).
        """
        s = self.strategy
        self.model.train()
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        if self.step_in_epoch == 0:
            self._loss_sum = torch.zeros(1, dtype=torch.float64)
            self._epoch_steps = 0
        steps_run = 0
        s.barrier()
        t0 = time.perf_counter()
        for indices in self.sampler:
            if self._should_stop():
                raise Interrupted
            self._loss_sum += self._run_batch(indices).cpu().double()
            self._epoch_steps += 1
            steps_run += 1
            self.step_in_epoch += 1
            self.global_step += 1
        s.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        elapsed = s.all_reduce(elapsed, op="max")
        return float(self._loss_sum.item()), float(elapsed.item()), self._epoch_steps, steps_run

    @torch.no_grad()
    def _validate(self) -> tuple[float, float]:
        s = self.strategy
        self.model.eval()
        t0 = time.perf_counter()
        idx = eval_shard(len(self.val_set), s.rank, s.world_size)
        total = torch.zeros(2, dtype=torch.float64)
        module = s.unwrap(self.model)
        for start in range(0, len(idx), self.local_batch):
            x, y = self.val_set.batch(idx[start : start + self.local_batch])
            x, y = x.to(s.device), y.to(s.device)
            err = ((module(x) - y) ** 2).mean(dim=(1, 2, 3))
            total += torch.stack([err.sum().double().cpu(), torch.tensor(float(len(err)), dtype=torch.float64)])
        total = s.all_reduce(total, op="sum")
        elapsed = s.all_reduce(torch.tensor([time.perf_counter() - t0], dtype=torch.float64), op="max")
        return float(total[0] / total[1]), float(elapsed.item())

    def _profile(self) -> None:
        """Computation fraction over a short window (once per run, before epoch timing)."""
        n = self.cfg.profile_steps
        if n == 0 or self.computation is not None:
            return
        # Profile on a throw-away copy of the state: the profiled steps must not
        # change the trajectory, or a profiled run and a resumed one would differ.
        model_state = {k: v.clone() for k, v in self.strategy.unwrap(self.model).state_dict().items()}
        opt_state = copy.deepcopy(self.strategy.optimizer_state(self.optimizer))
        sched_state = self.scheduler.state_dict()
        rng = _rng_state()
        sampler = ShardSampler(
            len(self.train_set), self.cfg.global_batch_size, self.strategy.rank, self.strategy.world_size,
            self.cfg.seed + 7919,
        )
        batches = list(sampler)[: n + 1]
        self.model.train()
        self._run_batch(batches[0])  # warm-up step, not profiled
        local = computation_fraction(lambda: [self._run_batch(b) for b in batches[1:]], self.strategy.device)
        self.strategy.unwrap(self.model).load_state_dict(model_state)
        self.strategy.load_optimizer_state(self.optimizer, opt_state)
        self.scheduler.load_state_dict(sched_state)
        _set_rng_state(rng)
        per_rank = self.strategy.all_gather_object(local)
        self.computation = {
            "computation_fraction": float(np.mean([r["fraction"] for r in per_rank])),
            "per_rank": per_rank,
            "profiled_steps": len(batches) - 1,
        }

    # -- public -------------------------------------------------------------
    def fit(self) -> dict:
        s = self.strategy
        self._install_signal_handlers()
        self._setup()
        resumed = self._load_snapshot()
        gpu = GpuMonitor(local_rank=s.local_rank)
        gpu.start()
        # Where each rank runs: recorded, never part of what DVC hashes.
        self.placement = s.all_gather_object({"host": socket.gethostname(), "device": _device_name(s.device)})
        if s.is_main and self.tracker is not None:
            hosts = sorted({p["host"] for p in self.placement})
            self.tracker.start(
                as_flat_dict(self.params),
                {"strategy": self.cfg.strategy, "world_size": str(s.world_size), "resumed": str(resumed),
                 "machine": active_machine_name(), "hosts": ",".join(hosts),
                 "device": self.placement[0]["device"]},
                [Path("version.lock")],
            )
        status = "FAILED"
        try:
            self._profile()
            while self.epoch < self.cfg.epochs:
                loss_sum, train_time, steps, steps_run = self._run_epoch()
                if self._should_stop():
                    raise Interrupted
                val_loss, val_time = self._validate()
                steps_done = self.sampler.steps_per_epoch()
                train_loss = s.all_reduce(torch.tensor([loss_sum]), "sum").item() / max(1, steps) / s.world_size
                rec = EpochRecord(
                    epoch=self.epoch + 1,
                    step=self.global_step,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    train_time_s=train_time,
                    val_time_s=val_time,
                    samples_per_s=steps_run * self.cfg.global_batch_size / train_time if train_time > 0 else 0.0,
                    lr=self.scheduler.get_last_lr()[0],
                )
                self.history.append(rec)
                self.epoch += 1
                self.step_in_epoch = 0
                self._save_snapshot("running" if self.epoch < self.cfg.epochs else "complete")
                if s.is_main:
                    print(
                        f"epoch {rec.epoch}/{self.cfg.epochs}: train_loss {rec.train_loss:.4f} "
                        f"val_loss {rec.val_loss:.4f} train {rec.train_time_s:.2f}s "
                        f"({rec.samples_per_s:.0f} samples/s) val {rec.val_time_s:.2f}s "
                        f"[{steps}/{steps_done} steps]",
                        file=sys.stderr,
                        flush=True,
                    )
                    if self.tracker is not None:
                        self.tracker.log_metrics({k: v for k, v in asdict(rec).items() if k != "epoch"}, rec.epoch)
            gpu_stats = gpu.stop()
            per_rank_gpu = s.all_gather_object(gpu_stats)
            metrics = self._final_metrics(per_rank_gpu)
            if s.is_main:
                self._write_outputs(metrics, per_rank_gpu)
            status = "FINISHED"
            return metrics
        except Interrupted:
            gpu.stop()
            self._save_snapshot("interrupted")
            status = "KILLED"
            if s.is_main:
                print(
                    f"train: stop requested; snapshot written at epoch {self.epoch + 1}, "
                    f"step {self.step_in_epoch}; exiting with {EXIT_INTERRUPTED} so the job can be requeued",
                    file=sys.stderr,
                )
            raise
        finally:
            if s.is_main and self.tracker is not None:
                self.tracker.end(status)

    def _final_metrics(self, per_rank_gpu: list[dict]) -> dict:
        h = self.history
        timed = h[1:] if len(h) > 1 else h  # the first epoch is warm-up
        times = [r.train_time_s for r in timed]
        m = {
            "strategy": self.cfg.strategy,
            "nodes": self.cfg.nodes,
            "procs_per_node": self.cfg.procs_per_node,
            "world_size": self.strategy.world_size,
            "epochs": len(h),
            "parameters": self.n_parameters,
            "train_loss": h[-1].train_loss,
            "val_loss": h[-1].val_loss,
            "epoch_time_s_median": float(np.median(times)),
            "epoch_time_s_mean": float(np.mean(times)),
            "samples_per_s": float(np.median([r.samples_per_s for r in timed])),
            "timed_epochs": len(timed),
            "computation_fraction": (self.computation or {}).get("computation_fraction"),
            "machine": active_machine_name(),
            "hosts": len({p["host"] for p in self.placement}),
            "device": self.placement[0]["device"],
        }
        energies = [g.get("energy_wh") for g in per_rank_gpu if g.get("energy_wh") is not None]
        utils = [g.get("utilization_pct") for g in per_rank_gpu if g.get("utilization_pct") is not None]
        m["gpu_energy_wh"] = float(sum(energies)) if energies else None
        m["gpu_utilization_pct"] = float(np.mean(utils)) if utils else None
        if m["gpu_energy_wh"] is not None:
            samples = sum(len(self.train_set) // self.cfg.global_batch_size * self.cfg.global_batch_size for _ in h)
            m["gpu_energy_wh_per_sample"] = m["gpu_energy_wh"] / max(1, samples)
        return m

    def _write_outputs(self, metrics: dict, per_rank_gpu: list[dict]) -> None:
        model = self.strategy.unwrap(self.model)
        self.out.model.parent.mkdir(parents=True, exist_ok=True)
        _atomic_torch_save(
            {"model": model.state_dict(), "model_args": {"name": self.cfg.model, "in_channels": self.train_set.n_channels},
             "norm": self.train_set.attrs.get("norm")},
            self.out.model,
        )
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        _atomic_write_text(self.out.metrics, json.dumps(clean, indent=2, sort_keys=True) + "\n")
        rows = [asdict(r) for r in self.history]
        self.out.epochs.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.epochs.with_name(f".{self.out.epochs.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.out.epochs)
        ranks = []
        comp = (self.computation or {}).get("per_rank") or [{}] * len(per_rank_gpu)
        for rank, (c, g) in enumerate(zip(comp, per_rank_gpu)):
            ranks.append({"rank": rank, **self.placement[rank], **{f"compute_{k}": v for k, v in c.items()}, **g})
        _atomic_write_text(self.out.ranks, json.dumps(ranks, indent=2) + "\n")
        if self.tracker is not None:
            per_epoch = {f.name for f in dataclasses.fields(EpochRecord)}
            self.tracker.log_metrics({k: v for k, v in clean.items() if isinstance(v, (int, float))
                                      and not isinstance(v, bool) and k not in per_epoch})
            self.tracker.log_rank_runs(
                [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "rank"} for r in ranks]
            )
            for p in (self.out.metrics, self.out.epochs):
                self.tracker.log_artifact(p)
