"""The training loop, identical for every strategy.

Launch (from the repository root; ``stages/train.py`` builds these for you):

    python stages/train.py --worker ...                                    # one process
    python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        stages/train.py --worker ...                                      # DDP / DeepSpeed, 2 ranks
    horovodrun --gloo -np 2 -H localhost:2 python stages/train.py --worker ...  # Horovod

Resume: rank 0 keeps a snapshot (weights, optimiser, scheduler, epoch, step
within the epoch, every rank's RNG state) after every epoch and when asked to
stop, in a folder of the main checkout that DVC never touches:
``.virgo/snapshots/<key>/`` (see :func:`virgo_exps.paths.snapshot_root`). The
key is a hash of everything that determines the trajectory: the ``train.*``
params except ``train.epochs`` and ``train.max_requeues``, the world size, the
contents of the training data, the code that computes a step (this module,
dataset, models, strategies) and the ``--checkpoints`` path, so two outputs
never share a folder. Before DVC reproduces an experiment it restores every
output from its cache; a snapshot inside an output would be overwritten by the
committed one, which is why the running state lives outside.

When the run completes, the final snapshot goes to the ``--checkpoints``
folder (the DVC output an extension with more epochs continues from, see
:mod:`virgo_exps.experiments.resume`) and the folder under ``.virgo/snapshots`` is removed.
``<checkpoints>/status.json`` always shows the latest state (what the SLURM
batch script reads to decide on a requeue).

A snapshot is used only when it is a prefix of the requested run: same key
(checked again from its contents), and no further than ``train.epochs``. A
completed snapshot of exactly ``train.epochs`` epochs is reused as is (nothing
to train; the outputs are written again from it). Otherwise training starts
afresh and one line says why. Of the two candidates (the running state and the
final snapshot in ``--checkpoints``) the one further along wins. The data order
depends only on (seed, epoch), so an interrupted-then-resumed run computes
exactly what an uninterrupted one does. Two trainings with the same key at the
same time are refused (a lock in the folder), as they would overwrite each
other's snapshots.

Interruption: SIGUSR1 or SIGTERM sets a flag; at the next step boundary all
ranks agree to stop (one tiny all-reduce), rank 0 writes a snapshot and every
rank exits with :data:`EXIT_INTERRUPTED`, which the SLURM launcher takes as
"requeue me". The local launcher turns Ctrl-C into SIGTERM.

Sweep trials: with ``VIRGO_SWEEP_TRIAL`` set (by :func:`virgo_exps.sweeps.search.trial_env`), rank 0
reports each epoch's validation loss to the sweep's Optuna trial and asks whether to prune; the answer
reaches every rank through the same kind of all-reduce, so all stop after the same epoch. A pruned run
ends normally (exit 0): its final snapshot has status ``pruned`` and results/metrics.json has
``"pruned": true`` and ``"pruned_at_epoch"``, so DVC records the experiment. Without the variable
nothing of this runs and Optuna is not imported.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from virgo_exps import fsio
from virgo_exps.config import Params, as_flat_dict
from virgo_exps.launch.protocol import (
    EXIT_INTERRUPTED,
    STATUS_COMPLETE,
    STATUS_FILE,
    STATUS_INTERRUPTED,
    STATUS_PRUNED,
    STATUS_RUNNING,
)
from virgo_exps.machines import active_machine_name
from virgo_exps.modelfile import count_parameters, model_file_content
from virgo_exps.paths import snapshot_root
from virgo_exps.records import numbers
from virgo_exps.train import cost, outcome
from virgo_exps.train.data import ImageDataset, ShardSampler, eval_shard
from virgo_exps.train.monitoring import GpuMonitor, HostLoad, computation_fraction
from virgo_exps.train.strategies import Strategy
from virgo_exps.train.watchdog import (
    LOSS_COMPUTED,
    STEP_DONE,
    STEP_STARTED,
    STOP_CHECK,
    VALIDATING,
    Heartbeat,
    Watchdog,
    end_on_stall,
)

SNAPSHOT = "snapshot.pt"
STATUS = STATUS_FILE  # {"status": running|interrupted|complete, "epoch", "step_in_epoch", ...}
LOCK = "lock"
# Train keys that may change between a snapshot and the run that resumes from it.
RESUMABLE_KEYS = {"train.epochs", "train.max_requeues"}
# The code that computes a step (relative to the package): part of the snapshot key.
TRAJECTORY_CODE = ("train/trainer.py", "train/data.py", "train/strategies")
# The sweep trial a run reports to (JSON: journal, study, number, pruner); see SweepTrial.
SWEEP_TRIAL_ENV = "VIRGO_SWEEP_TRIAL"
# Snapshot states written to --checkpoints: the run is over (no requeue).
FINAL_STATES = (STATUS_COMPLETE, STATUS_PRUNED)


def tree_digest(path: Path) -> str:
    """SHA-256 of a file or of a folder's files (relative names, sizes and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        h.update(f"{rel}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def code_digest(extra: tuple[Path, ...] = ()) -> str:
    """SHA-256 of the package's source that determines the trajectory (:data:`TRAJECTORY_CODE`),
    then of ``extra`` files (the study's model code): a file of the package named by its place in it,
    any other as given (relative to the checkout), so that the digest is the same in every checkout."""
    here = Path(__file__).parents[1]
    h = hashlib.sha256()
    for name in TRAJECTORY_CODE:
        p = here / name
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            h.update(f.relative_to(here).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    for f in map(Path, extra):
        name = f.relative_to(here).as_posix() if f.is_absolute() and f.is_relative_to(here) else f.as_posix()
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def lr_factor(cfg, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of step ``step`` as a fraction of ``train.lr``: a linear warm-up, then constant or
    a cosine decay to ``train.lr_floor`` at the last step of ``train.epochs``.

    The constant schedule does not depend on train.epochs, so a run continued with more epochs is the
    same as one trained that many epochs in one go; a cosine one does (epochs are then in the snapshot key).
    """
    warmup = cfg.warmup_steps

    def warm(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    if cfg.lr_schedule == "constant":
        return warm
    total, floor = max(1, cfg.epochs * steps_per_epoch - 1), cfg.lr_floor
    return lambda step: (
        warm(step) * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``train.precision`` around a forward pass: nothing for fp32, else torch's autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def adamw(parameters, lr: float, cfg) -> torch.optim.Optimizer:
    """AdamW with ``train.weight_decay``: an optimiser a study may choose (:class:`ModelFactory`)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=cfg.weight_decay)


@dataclass(frozen=True)
class ModelFactory:
    """The study's side of training, given by its train stage: its networks, the code that defines them,
    its loss and its optimiser.

    The trainer reads the split store (``<split>/x``, ``<split>/y``, see
    :mod:`virgo_exps.train.data`), builds the network with ``build``, computes
    ``loss()`` of its output and the targets and steps ``optimizer(parameters,
    lr, train params)``; everything else (strategies, snapshots, outputs,
    tracking) is the same for every study. A study that gives no loss or
    optimiser trains with mean squared error and AdamW.
    """

    build: Callable[[str, int], nn.Module]  # (train.model, input channels) -> an untrained network
    code: tuple[Path, ...] = ()  # the files that define them (and the loss, the optimiser): in the snapshot key
    loss: Callable[[], nn.Module] = nn.MSELoss
    optimizer: Callable[..., torch.optim.Optimizer] = adamw
    # (output, targets) of a validation batch -> per-sample figures: "loss" and the study's own metrics
    # (each averaged over the whole validation split: val_loss, val_<name> in metrics.json and MLflow)
    evaluate: Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]] = None  # type: ignore[assignment]
    metrics: tuple[str, ...] = ()  # the names evaluate gives besides "loss" (a sweep may optimise val_<name>)

    def __post_init__(self) -> None:
        if self.evaluate is None:
            object.__setattr__(self, "evaluate", per_sample_mse)


def per_sample_mse(out: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The validation figure of a study that gives none: each sample's mean squared error."""
    return {"loss": ((out.float() - y) ** 2).flatten(1).mean(dim=1)}


def snapshot_refusal(snap: dict, config: dict, epochs: int) -> str | None:
    """Why ``snap`` is not a prefix of a run of ``epochs`` epochs with ``config``; None when it is."""
    theirs = snap.get("config") or {}
    changed = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k))
    if changed:
        names = {
            "data": "training data",
            "code": "trainer code",
            "world_size": "world size",
            "checkpoints": "--checkpoints path",
        }
        shown = [names.get(k, k) for k in changed]
        more = f", {len(shown) - 5} more" if len(shown) > 5 else ""
        return f"configuration changed ({', '.join(shown[:5])}{more})"
    done, step = int(snap.get("epoch", 0)), int(snap.get("step_in_epoch", 0))
    if done > epochs or (done == epochs and step > 0):
        where = f"epoch {done + 1}, step {step}" if step else f"{done} epoch(s)"
        return (
            f"it is at {where} (status {snap.get('status')}), past the {epochs} epoch(s) "
            f"requested, so it is not a prefix of this run"
        )
    return None


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
    # The host's load while the epoch ran: mean runnable tasks per core,
    # sampled (the most loaded host of the run); above 1, other work competed
    # for the CPUs while the epoch was timed.
    load_avg: float | None = None
    # Compute processes of other jobs seen on a rank's GPU during the epoch
    # (None without a GPU): they share the device the epoch was timed on.
    gpu_other_procs: int | None = None
    # The study's own validation metrics (ModelFactory.metrics): val_<name> -> value
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The epoch as one flat row (epochs.csv, MLflow): the study's metrics as columns of their own."""
        out = asdict(self)
        metrics = out.pop("metrics")
        return {**out, **metrics}


class Interrupted(Exception):
    """Raised after the snapshot is written, when a stop was requested."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    try:
        with fsio.replacing(path) as tmp, open(tmp, "wb") as fh:
            torch.save(obj, fh)
    except (OSError, RuntimeError) as exc:
        raise _write_failure(path, exc) from exc


# A snapshot file: this line, the SHA-256 of the rest, a newline, then what torch.save wrote. A flipped
# byte in a tensor loads silently with torch.load alone, and a run resumed from it would not be the run
# it claims to continue.
SNAPSHOT_MAGIC = b"virgo-exps snapshot 1\n"


class DamagedSnapshot(Exception):
    """A snapshot file that is not one, or whose content does not match its checksum."""


def write_snapshot_file(obj: Any, path: Path) -> None:
    """``obj`` (the snapshot dict) into ``path``, whole or not at all, with its checksum."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    try:
        with fsio.replacing(path) as tmp, open(tmp, "wb") as fh:
            fh.write(SNAPSHOT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            fh.write(payload)
    except (OSError, RuntimeError) as exc:
        raise _write_failure(path, exc) from exc


# What a snapshot holds besides tensors and plain values: numpy's random state (an array). torch.load
# builds nothing else: a file planted under a snapshot's name, with a checksum that matches (anyone can
# compute one), cannot run code when a run continues from it.
_SNAPSHOT_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def read_snapshot_file(path: Path) -> dict:
    """The snapshot dict of ``path``, verified against its checksum (:class:`DamagedSnapshot` if not), and
    only when the file is this user's own (:func:`fsio.trust_refusal`)."""
    why = fsio.trust_refusal(path)
    if why:
        raise DamagedSnapshot(f"{why}; a snapshot is read only when it is yours")
    with open(path, "rb") as fh:
        head, digest, payload = fh.readline(), fh.readline().strip(), fh.read()
    if head != SNAPSHOT_MAGIC:
        raise DamagedSnapshot("it has no checksum (not a snapshot of this version, or damaged at its start)")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise DamagedSnapshot("its content does not match its SHA-256 checksum (damaged)")
    try:
        with torch.serialization.safe_globals(_SNAPSHOT_GLOBALS):
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise DamagedSnapshot(f"it holds more than tensors and plain values ({first}); not loaded") from exc


def _atomic_write_text(path: Path, text: str) -> None:
    try:
        fsio.write_text(path, text)
    except OSError as exc:
        raise _write_failure(path, exc) from exc


def _write_failure(path: Path, exc: BaseException) -> BaseException:
    """A full disk as one line (the run ends without a result, its last snapshot kept); any other error
    as it is. torch reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc...]``."""
    folder = next((p for p in Path(path).absolute().parents if p.exists()), Path("/"))
    free = shutil.disk_usage(folder).free
    full = getattr(exc, "errno", None) == errno.ENOSPC or (isinstance(exc, RuntimeError) and free < (64 << 20))
    if not full:
        return exc
    return outcome.RunFailed(
        f"train: cannot write {path}: the disk is full ({free / 1e6:.1f} MB free in {folder}); free space "
        "and run again: the run resumes from its last complete snapshot"
    )


def _device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's model name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _busiest(per_rank: list[tuple[float | None, int | None]]) -> dict:
    """The epoch's load figures from every rank's (host load, other GPU processes): the worst of each."""
    loads = [load for load, _ in per_rank if load is not None]
    others = [n for _, n in per_rank if n is not None]
    return {
        "load_avg": round(max(loads), 3) if loads else None,
        "gpu_other_procs": max(others) if others else None,
    }


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


class SweepTrial:
    """Rank 0's link to the Optuna trial named by ``VIRGO_SWEEP_TRIAL``; Optuna is imported only here."""

    def __init__(self, text: str):
        import optuna
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

        info = json.loads(text)
        journal = str(info["journal"])
        storage = JournalStorage(JournalFileBackend(journal, lock_obj=JournalFileOpenLock(journal)))
        pruner = getattr(optuna.pruners, info["pruner"])(**info.get("pruner_args", {}))
        study = optuna.load_study(study_name=info["study"], storage=storage, pruner=pruner)
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(info["study"]), int(info["number"])
        )
        self.trial = optuna.trial.Trial(study, trial_id)
        self.label = f"{info['study']} trial {info['number']}"
        self.metric = str(info.get("metric", "val_loss"))  # the sweep's objective

    def should_prune(self, epoch: int, figures: dict[str, float]) -> bool:
        """Report the epoch's value of the sweep's metric and return the pruner's verdict."""
        if self.metric not in figures:
            raise KeyError(f"{self.metric} is not a per-epoch figure (those are {', '.join(sorted(figures))})")
        self.trial.report(figures[self.metric], epoch)
        return self.trial.should_prune()


class Trainer:
    def __init__(
        self,
        params: Params,
        strategy: Strategy,
        data: Path,
        outputs: TrainOutputs,
        tracker=None,
        models: ModelFactory | None = None,
    ):
        self.params = params
        if models is None:
            raise TypeError("Trainer: give the study's ModelFactory (its train stage's models())")
        self.models = models
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
        self._digests: dict = {}
        self.live_dir: Path | None = None
        self._lock = None
        self._complete = False
        self._final_written = False  # the final snapshot is in --checkpoints
        self._pruned_at: int | None = None  # the epoch after which a sweep's pruner stopped the run
        self._sweep: SweepTrial | None = None  # rank 0 of a sweep trial (VIRGO_SWEEP_TRIAL)
        # The cost of the attempts this run resumed from (their snapshots carry it): train/cost.py combine().
        self._earlier_cost: list[dict] = []
        self._gpu: GpuMonitor | None = None  # this attempt's (its energy goes into each snapshot's cost)
        self._first_bad: int | None = None  # this epoch's first step (1-based) whose loss was not finite
        self._own_from = 0  # epochs of the history that another (finished) run trained
        self._stage_code: str | None = None  # rank 0: digest of the train stage's code (provenance)
        self._heart = Heartbeat(None, -1)  # a rank's heartbeat, from _watch on (once the run's folder is known)

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
        model = self.models.build(self.cfg.model, self.train_set.n_channels)
        self.n_parameters = count_parameters(model)
        if self.cfg.compile:
            model.compile()  # in place: the state dict keeps its keys (snapshots, model.pt)
        lr = self.cfg.lr * (s.world_size if self.cfg.lr_scaling == "linear" else 1)
        optimizer = self.models.optimizer(model.parameters(), lr, self.cfg)
        self.local_batch = self.cfg.global_batch_size // s.world_size
        self.micro_batch = self.local_batch // self.cfg.grad_accum_steps
        self.model, self.optimizer = s.wrap(model, optimizer, self.micro_batch)
        if self.cfg.precision == "fp16":
            s.scaler = torch.amp.GradScaler(s.device.type)
        self.sampler = ShardSampler(
            len(self.train_set), self.cfg.global_batch_size, s.rank, s.world_size, self.cfg.seed
        )
        if self.sampler.steps_per_epoch() == 0:
            raise ValueError("train.global_batch_size is larger than the training split")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            s.torch_optimizer(self.optimizer), lr_factor(self.cfg, self.sampler.steps_per_epoch())
        )
        self.loss_fn = self.models.loss()
        self.metric_names = tuple(self.models.metrics)

    # -- snapshots ----------------------------------------------------------
    def _config_key(self) -> dict:
        """Everything that determines the trajectory (its hash names the snapshot folder)."""
        # a cosine schedule depends on train.epochs: a run with more epochs is another trajectory
        resumable = RESUMABLE_KEYS if self.cfg.lr_schedule == "constant" else RESUMABLE_KEYS - {"train.epochs"}
        key = {k: v for k, v in as_flat_dict(self.params).items() if k.startswith("train.") and k not in resumable}
        key["world_size"] = self.strategy.world_size
        key.update(self._digests)
        return key

    def _compute_digests(self) -> None:
        """Data and code digests and the checkpoints path, computed by rank 0 and shared."""
        # The same type on every rank: Horovod names a collective after the object's type.
        mine: dict = {}
        if self.strategy.is_main:
            # As DVC names it (relative to the workspace, the same in a queued experiment's copy).
            ckpt = self.out.checkpoints.resolve()
            with contextlib.suppress(ValueError):
                ckpt = ckpt.relative_to(Path.cwd().resolve())
            mine = {
                "data": tree_digest(self.data),
                "code": code_digest(self.models.code),
                "checkpoints": ckpt.as_posix(),
            }
        self._digests = self.strategy.all_gather_object(mine)[0]
        blob = json.dumps(self._config_key(), sort_keys=True, default=str).encode()
        self.live_dir = snapshot_root() / hashlib.sha256(blob).hexdigest()[:20]

    def _lock_live_dir(self) -> None:
        """Rank 0 holds a lock on the snapshot folder for the whole run."""
        if not self.strategy.is_main:
            return
        self.live_dir.mkdir(parents=True, exist_ok=True)
        fh = open(self.live_dir / LOCK, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RuntimeError(
                f"another training of the same configuration is running ({holder}) and uses "
                f"{self.live_dir}; wait until it ends, or stop it (the next run resumes from its snapshot)"
            ) from None
        except OSError:
            pass  # a file system without locks: run unguarded
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._lock = fh

    def _release_live_dir(self, remove: bool) -> None:
        """Drop the lock; remove the folder once the run is complete (its final snapshot is in --checkpoints)."""
        if not self.strategy.is_main:
            return
        if remove:
            shutil.rmtree(self.live_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _save_snapshot(self, status: str) -> None:
        s = self.strategy
        gathered = s.all_gather_object(
            {
                "rng": _rng_state(),
                "loss_sum": self._loss_sum.clone(),
                "epoch_steps": self._epoch_steps,
                "usage": cost.rank_usage(),
                "energy_wh": self._gpu.energy_wh_so_far() if self._gpu is not None else None,
                # each rank's part of a partitioned optimiser state (ZeRO); else rank 0's is the whole
                "optimizer": s.optimizer_state(self.optimizer) if s.partitioned_optimizer else None,
            }
        )
        usage = [g.pop("usage") for g in gathered]
        energies = [e for e in (g.pop("energy_wh") for g in gathered) if e is not None]
        parts = [g.pop("optimizer") for g in gathered]
        rng = gathered
        self._final_written = status in FINAL_STATES
        if not self.strategy.is_main:
            return
        # Running and interrupted states stay outside DVC's outputs; the final
        # one is the --checkpoints output (what a longer run continues from).
        folder = self.out.checkpoints if status in FINAL_STATES else self.live_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.out.checkpoints.mkdir(parents=True, exist_ok=True)
        snapshot = {
            "model": self.strategy.unwrap(self.model).state_dict(),
            "optimizer": parts if s.partitioned_optimizer else s.optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.strategy.scaler.state_dict() if self.strategy.scaler is not None else None,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "rng": rng,
            "world_size": self.strategy.world_size,
            "config": self._config_key(),
            "model_args": {"name": self.cfg.model, "in_channels": self.train_set.n_channels},
            "history": [asdict(r) for r in self.history],
            "own_from": self._own_from,
            "computation": self.computation,
            "status": status,
            # what every attempt so far used, this one up to now: a resumed run adds it to its own
            "cost_attempts": [
                *self._earlier_cost,
                cost.summarise(usage, [p["device"] for p in self.placement], sum(energies) if energies else None),
            ],
        }
        write_snapshot_file(snapshot, folder / SNAPSHOT)
        state = (
            json.dumps(
                {
                    "status": status,
                    "epoch": self.epoch,
                    "step_in_epoch": self.step_in_epoch,
                    "global_step": self.global_step,
                    "snapshot": str(folder / SNAPSHOT),
                }
            )
            + "\n"
        )
        if folder != self.out.checkpoints:
            _atomic_write_text(folder / STATUS, state)
        _atomic_write_text(self.out.checkpoints / STATUS, state)

    @staticmethod
    def _shown(path: Path) -> str:
        with contextlib.suppress(ValueError):
            return str(path.resolve().relative_to(Path.cwd()))
        return str(path)

    def _choose_snapshot(self) -> Path | None:
        """Rank 0: the snapshot to resume from (the candidate furthest along), or None; says why not."""
        config, best, best_pos = self._config_key(), None, None
        # The final snapshot first: at the same position it wins (a pruned or complete state is the record).
        for path in (self.out.checkpoints / SNAPSHOT, self.live_dir / SNAPSHOT):
            if not path.exists():
                continue
            try:
                snap = read_snapshot_file(path)
            except DamagedSnapshot as exc:
                print(f"train: not resuming from {self._shown(path)}: {exc}; starting afresh", file=sys.stderr)
                continue
            except Exception as exc:
                print(
                    f"train: not resuming from {self._shown(path)}: cannot read it ({type(exc).__name__}: "
                    f"{exc}); starting afresh",
                    file=sys.stderr,
                )
                continue
            reason = snapshot_refusal(snap, config, self.cfg.epochs)
            if reason:
                print(f"train: not resuming from {self._shown(path)}: {reason}; starting afresh", file=sys.stderr)
                continue
            pos = (snap["epoch"], snap["step_in_epoch"])
            if best_pos is None or pos > best_pos:
                best, best_pos = path, pos
        return best

    def _inherited_cost(self, snap: dict, path: Path) -> list[dict]:
        """The cost of the attempts this run continues: those of a running or interrupted snapshot (no
        record has them yet). A final snapshot's belong to the run that wrote it, whose metrics.json has
        them, so a run that continues or reuses it starts its own count, unless it is that very run
        again: the same SLURM job, requeued between the final snapshot and its outputs."""
        attempts = list(snap.get("cost_attempts", []))
        if path != self.out.checkpoints / SNAPSHOT or not attempts:
            return attempts
        job = cost.slurm_job_id()
        return attempts if job is not None and attempts[-1].get("slurm_job") == job else []

    def _load_snapshot(self) -> bool:
        chosen = self._choose_snapshot() if self.strategy.is_main else None
        # A str on every rank ("" for none): Horovod names a collective after the object's type.
        chosen = self.strategy.all_gather_object("" if chosen is None else str(chosen))[0]
        if not chosen:
            return False
        path = Path(chosen)
        snap = read_snapshot_file(path)
        self.strategy.unwrap(self.model).load_state_dict(snap["model"])
        self.strategy.load_optimizer_state(self.optimizer, snap["optimizer"])
        self.scheduler.load_state_dict(snap["scheduler"])
        if self.strategy.scaler is not None and snap.get("scaler"):
            self.strategy.scaler.load_state_dict(snap["scaler"])
        self.epoch = snap["epoch"]
        self.step_in_epoch = snap["step_in_epoch"]
        self.global_step = snap["global_step"]
        self.history = [EpochRecord(**r) for r in snap["history"]]
        self._own_from = int(snap.get("own_from", 0))
        if snap.get("status") in FINAL_STATES and snap["epoch"] < self.cfg.epochs:
            # A finished run continued with more epochs: a new run, whose timing is its own epochs'.
            self._own_from = snap["epoch"]
        self.computation = snap.get("computation")
        self._earlier_cost = self._inherited_cost(snap, path)
        mine = snap["rng"][self.strategy.rank]
        _set_rng_state(mine["rng"])
        self._loss_sum = mine["loss_sum"].clone()
        self._epoch_steps = mine["epoch_steps"]
        done = snap.get("status") == STATUS_COMPLETE and self.epoch == self.cfg.epochs
        if snap.get("status") == STATUS_PRUNED and os.environ.get(SWEEP_TRIAL_ENV):
            # The trial was pruned after this epoch and its task requeued before the outputs were
            # written: it stays pruned there. (Without a sweep, a run continues from the snapshot.)
            self._pruned_at = self.epoch
            done = True
        self._final_written = done and path == self.out.checkpoints / SNAPSHOT
        if self.strategy.is_main and done:
            print(
                f"train: reusing {self._shown(path)}: all {self.epoch} epoch(s) of this configuration are done "
                f"(status complete); writing the outputs from it",
                file=sys.stderr,
            )
        elif self.strategy.is_main:
            print(
                f"train: resuming from {self._shown(path)} at epoch {self.epoch + 1}, step {self.step_in_epoch} "
                f"(status {snap.get('status')})",
                file=sys.stderr,
            )
        return True

    # -- the loop ------------------------------------------------------------
    def _inject_faults(self) -> None:
        """Test hooks: a stop request or a crash at a given step (environment variables).

        VIRGO_FAULT_STOP_AT_STEP=k   rank 0 behaves as if signalled after global step k
        VIRGO_FAULT_CRASH=r:k        rank r raises an error at global step k
        VIRGO_FAULT_HANG=r:k         rank r stops making progress at global step k
        VIRGO_FAULT_STEP_SLEEP=s     sleep s seconds before every step (to interrupt a short run)
        """
        pause = os.environ.get("VIRGO_FAULT_STEP_SLEEP")
        if pause:
            time.sleep(float(pause))
        stop_at = os.environ.get("VIRGO_FAULT_STOP_AT_STEP")
        if stop_at and self.strategy.is_main and self.global_step == int(stop_at):
            self._stop = True
        hang = os.environ.get("VIRGO_FAULT_HANG")
        if hang:
            rank, step = (int(v) for v in hang.split(":"))
            if self.strategy.rank == rank and self.global_step == step:
                time.sleep(3600)  # a rank stuck (a dead file system, a lost GPU): the watchdog ends the run
        crash = os.environ.get("VIRGO_FAULT_CRASH")
        if crash:
            rank, step = (int(v) for v in crash.split(":"))
            if self.strategy.rank == rank and self.global_step == step:
                raise RuntimeError(f"injected fault at step {step} (VIRGO_FAULT_CRASH)")

    def _should_stop(self) -> bool:
        self._inject_faults()
        self._heart.beat(self.epoch + 1, self.step_in_epoch + 1, STOP_CHECK)  # then waits for every rank
        flag = torch.tensor([1.0 if self._stop else 0.0])
        if self.strategy.world_size > 1:
            flag = self.strategy.all_reduce(flag, op="max")
        return bool(flag.item() > 0)

    def _prune_now(self, rec: EpochRecord) -> bool:
        """Sweep trials only: rank 0 reports the epoch and asks the pruner; every rank gets the verdict."""
        s = self.strategy
        verdict = False
        if self._sweep is not None:
            try:
                figures = {"train_loss": rec.train_loss, "val_loss": rec.val_loss, **rec.metrics}
                verdict = self._sweep.should_prune(rec.epoch, figures)
            except Exception as exc:  # the run goes on unpruned rather than dying on its bookkeeping
                print(
                    f"train: cannot report to {self._sweep.label} ({type(exc).__name__}: {exc}); "
                    "training on without pruning",
                    file=sys.stderr,
                )
                self._sweep = None
        flag = torch.tensor([1.0 if verdict else 0.0])
        if s.world_size > 1:
            flag = s.all_reduce(flag, op="max")
        return bool(flag.item() > 0)

    def _run_batch(self, indices: list[int]) -> torch.Tensor:
        """One optimiser step over this process's share of the global batch, in train.grad_accum_steps
        micro-batches; the step's mean loss."""
        s, accum = self.strategy, self.cfg.grad_accum_steps
        s.zero_grad(self.optimizer)
        total = None
        for i in range(accum):
            part = indices if accum == 1 else indices[i * self.micro_batch : (i + 1) * self.micro_batch]
            x, y = self.train_set.batch(part)
            x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
            with autocast(self.cfg.precision, s.device):
                loss = self.loss_fn(self.model(x), y)
            if i == 0:
                self._heart.beat(self.epoch + 1, self.step_in_epoch + 1, LOSS_COMPUTED)
            s.backward(loss, self.model, self.optimizer, last=i == accum - 1)
            total = loss.detach() if total is None else total + loss.detach()
        s.step(self.model, self.optimizer)
        self.scheduler.step()
        return total if accum == 1 else total / accum

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
            self._first_bad = None
        steps_run = 0
        s.barrier()
        t0 = time.perf_counter()
        for indices in self.sampler:
            if self._should_stop():
                raise Interrupted
            self._heart.beat(self.epoch + 1, self.step_in_epoch + 1, STEP_STARTED)
            loss = self._run_batch(indices).cpu().double()
            if self._first_bad is None and not bool(torch.isfinite(loss).all()):
                self._first_bad = self.step_in_epoch + 1
            self._loss_sum += loss
            self._epoch_steps += 1
            steps_run += 1
            self.step_in_epoch += 1
            self.global_step += 1
            self._heart.beat(self.epoch + 1, self.step_in_epoch, STEP_DONE)
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
        names = ["loss", *self.metric_names]
        total = torch.zeros(len(names) + 1, dtype=torch.float64)  # the sums of each figure, then the count
        module = s.unwrap(self.model)
        for start in range(0, len(idx), self.local_batch):
            x, y = self.val_set.batch(idx[start : start + self.local_batch])
            x, y = x.to(s.device), y.to(s.device)
            with autocast(self.cfg.precision, s.device):
                out = module(x)
            figures = self.models.evaluate(out, y)
            self._heart.beat(self.epoch + 1, self.step_in_epoch, VALIDATING, start + 1)
            sums = [figures[n].sum().double().cpu() for n in names]
            total += torch.stack([*sums, torch.tensor(float(len(x)), dtype=torch.float64)])
        total = s.all_reduce(total, op="sum")
        elapsed = s.all_reduce(torch.tensor([time.perf_counter() - t0], dtype=torch.float64), op="max")
        self.val_metrics = {f"val_{n}": float(total[i + 1] / total[-1]) for i, n in enumerate(self.metric_names)}
        return float(total[0] / total[-1]), float(elapsed.item())

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
        scaler = self.strategy.scaler
        scaler_state = scaler.state_dict() if scaler is not None else None
        rng = _rng_state()
        sampler = ShardSampler(
            len(self.train_set),
            self.cfg.global_batch_size,
            self.strategy.rank,
            self.strategy.world_size,
            self.cfg.seed + 7919,
        )
        batches = list(sampler)[: n + 1]
        self.model.train()
        self._run_batch(batches[0])  # warm-up step, not profiled
        local = computation_fraction(lambda: [self._run_batch(b) for b in batches[1:]], self.strategy.device)
        self.strategy.unwrap(self.model).load_state_dict(model_state)
        self.strategy.load_optimizer_state(self.optimizer, opt_state)
        self.scheduler.load_state_dict(sched_state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        _set_rng_state(rng)
        per_rank = self.strategy.all_gather_object(local)
        self.computation = {
            "computation_fraction": float(np.mean([r["fraction"] for r in per_rank])),
            "per_rank": per_rank,
            "profiled_steps": len(batches) - 1,
        }

    # -- public -------------------------------------------------------------
    def fit(self) -> dict:
        self._install_signal_handlers()
        self._setup()
        try:
            self._compute_digests()
            self._lock_live_dir()
            try:
                return self._fit()
            finally:
                self._release_live_dir(remove=self._complete)
        finally:
            # The node's copy of each split goes with its last rank (ImageDataset).
            self.train_set.close()
            self.val_set.close()

    def _watch(self) -> Watchdog | None:
        """Every rank's heartbeat; on rank 0 the watch over all of them (machine profile's stall_limit)."""
        s = self.strategy
        self.live_dir.mkdir(parents=True, exist_ok=True)
        self._heart = Heartbeat(self.live_dir, s.rank)
        self._heart.beat(self.epoch + 1, self.step_in_epoch, STEP_STARTED)
        self._heart.start()
        if not s.is_main:
            return None
        try:
            from virgo_exps.machines import load_machine

            limit = load_machine().stall_limit
        except Exception:  # a profile that cannot be read was refused by the first stage; keep the default
            limit = 1800
        if not limit:
            return None

        def before_exit():
            if self.tracker is not None:
                self.tracker.end("FAILED")

        dog = Watchdog(self.live_dir, s.world_size, limit, end_on_stall(self.live_dir / STATUS, before_exit))
        dog.start()
        return dog

    def _fit(self) -> dict:
        resumed = self._load_snapshot()
        dog = self._watch()
        try:
            return self._fit_watched(resumed)
        finally:
            if dog is not None:
                dog.stop()
            self._heart.stop()

    def _fit_watched(self, resumed: bool) -> dict:
        s = self.strategy
        gpu = self._gpu = GpuMonitor(local_rank=s.local_rank)
        gpu.start()
        host_load = HostLoad().start()
        # Where each rank runs: recorded, never part of what DVC hashes.
        self.placement = s.all_gather_object({"host": socket.gethostname(), "device": _device_name(s.device)})
        if s.is_main:
            from virgo_exps import provenance

            self._stage_code = provenance.stage_code_digest("train")
        if s.is_main and self.tracker is not None:
            hosts = sorted({p["host"] for p in self.placement})
            self.tracker.start(
                as_flat_dict(self.params),
                {
                    "strategy": self.cfg.strategy,
                    "world_size": str(s.world_size),
                    "resumed": str(resumed),
                    "machine": active_machine_name(),
                    "hosts": ",".join(hosts),
                    "device": self.placement[0]["device"],
                    "code": self._stage_code or "",
                    **self._sweep_tags(),
                },
                [Path("version.lock")],
            )
            # The epochs of the snapshot belong to this run's record as well.
            for rec in self.history:
                self.tracker.log_metrics({k: v for k, v in rec.row().items() if k != "epoch"}, rec.epoch)
        status = "FAILED"
        sweep = bool(os.environ.get(SWEEP_TRIAL_ENV))  # the same on every rank: all join _prune_now
        if sweep and s.is_main:
            try:
                self._sweep = SweepTrial(os.environ[SWEEP_TRIAL_ENV])
            except Exception as exc:  # as in _prune_now: the training itself does not depend on it
                print(
                    f"train: cannot open the sweep trial of {SWEEP_TRIAL_ENV} ({type(exc).__name__}: {exc}); "
                    "training on without pruning",
                    file=sys.stderr,
                )
        try:
            self._profile()
            while self.epoch < self.cfg.epochs and self._pruned_at is None:
                host_load.window(), gpu.others_window()  # start this epoch's window
                loss_sum, train_time, steps, steps_run = self._run_epoch()
                if self._should_stop():
                    raise Interrupted
                val_loss, val_time = self._validate()
                steps_done = self.sampler.steps_per_epoch()
                train_loss = s.all_reduce(torch.tensor([loss_sum]), "sum").item() / max(1, steps) / s.world_size
                # Every rank decides the same (the losses are reduced, the first bad steps gathered).
                bad = [(r, b) for r, b in enumerate(s.all_gather_object(self._first_bad)) if b is not None]
                first = min(bad, key=lambda rb: (rb[1], rb[0])) if bad else None
                why = outcome.epoch_refusal(self.epoch + 1, train_loss, val_loss, first)
                if why:
                    raise outcome.RunFailed(f"train: {why}")
                rec = EpochRecord(
                    epoch=self.epoch + 1,
                    step=self.global_step,
                    train_loss=train_loss,
                    val_loss=val_loss,
                    train_time_s=train_time,
                    val_time_s=val_time,
                    samples_per_s=steps_run * self.cfg.global_batch_size / train_time if train_time > 0 else 0.0,
                    lr=self.scheduler.get_last_lr()[0],
                    metrics=self.val_metrics,
                    **_busiest(s.all_gather_object((host_load.window(), gpu.others_window()))),
                )
                self.history.append(rec)
                self.epoch += 1
                self.step_in_epoch = 0
                self._save_snapshot(STATUS_RUNNING if self.epoch < self.cfg.epochs else STATUS_COMPLETE)
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
                        self.tracker.log_metrics({k: v for k, v in rec.row().items() if k != "epoch"}, rec.epoch)
                if sweep and self._prune_now(rec) and self.epoch < self.cfg.epochs:
                    self._pruned_at = rec.epoch
                    if s.is_main:
                        print(
                            f"train: pruned by the sweep after epoch {rec.epoch}/{self.cfg.epochs} "
                            f"(val_loss {rec.val_loss:.4f}); writing the outputs of the epochs done",
                            file=sys.stderr,
                            flush=True,
                        )
                    break
            gpu_stats = gpu.stop()
            per_rank_gpu = s.all_gather_object(gpu_stats)
            metrics = self._final_metrics(per_rank_gpu)
            if not self._final_written:  # all epochs came from a running snapshot, or the run was pruned
                self._save_snapshot(STATUS_PRUNED if self._pruned_at is not None else STATUS_COMPLETE)
            if s.is_main:
                self._write_outputs(metrics, per_rank_gpu)
            s.barrier()
            self._complete = True
            status = "FINISHED"
            return metrics
        except Interrupted:
            gpu.stop()
            self._save_snapshot(STATUS_INTERRUPTED)
            status = "KILLED"
            if s.is_main:
                print(
                    f"train: stop requested; snapshot written at epoch {self.epoch + 1}, "
                    f"step {self.step_in_epoch}; exiting with {EXIT_INTERRUPTED} so the job can be requeued",
                    file=sys.stderr,
                )
            raise
        finally:
            host_load.stop()
            if s.is_main and self.tracker is not None:
                self.tracker.end(status)

    @staticmethod
    def _sweep_tags() -> dict[str, str]:
        """The sweep, study and trial a run of a search belongs to, as MLflow tags (none outside a sweep)."""
        text = os.environ.get(SWEEP_TRIAL_ENV)
        if not text:
            return {}
        try:
            info = json.loads(text)
            # the tags the team store's merged runs carry too (sweeps/tracking.py); the study has the sweep's name
            return {"sweep": str(info["study"]), "trial": str(info["number"])}
        except (ValueError, KeyError, TypeError):
            return {}

    def _final_metrics(self, per_rank_gpu: list[dict]) -> dict:
        h = self.history
        own = h[self._own_from :] or h  # a continued finished run's epochs are its parent's record
        timed = own[1:] if len(own) > 1 else own  # the first epoch of a run is warm-up
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
            **h[-1].metrics,
            "epoch_time_s_median": float(np.median(times)),
            "epoch_time_s_mean": float(np.mean(times)),
            "samples_per_s": float(np.median([r.samples_per_s for r in timed])),
            "timed_epochs": len(timed),
            "first_timed_epoch": timed[0].epoch,
            "computation_fraction": (self.computation or {}).get("computation_fraction"),
            "machine": active_machine_name(),
            "hosts": len({p["host"] for p in self.placement}),
            "device": self.placement[0]["device"],
        }
        energies = [g.get("energy_wh") for g in per_rank_gpu if g.get("energy_wh") is not None]
        utils = [g.get("utilization_pct") for g in per_rank_gpu if g.get("utilization_pct") is not None]
        if self._pruned_at is not None:
            m["pruned"] = True
            m["pruned_at_epoch"] = self._pruned_at
        m["gpu_energy_wh"] = float(sum(energies)) if energies else None
        m["gpu_utilization_pct"] = float(np.mean(utils)) if utils else None
        if m["gpu_energy_wh"] is not None:
            samples = sum(len(self.train_set) // self.cfg.global_batch_size * self.cfg.global_batch_size for _ in h)
            m["gpu_energy_wh_per_sample"] = m["gpu_energy_wh"] / max(1, samples)
        # What the run used (train/cost.py): every rank's own figures, gathered.
        # A resumed run adds what its earlier attempts used (their snapshots' figures).
        this = cost.summarise(
            self.strategy.all_gather_object(cost.rank_usage()),
            [p["device"] for p in self.placement],
            m["gpu_energy_wh"],
        )
        m["cost"] = cost.combine([*self._earlier_cost, this])
        return m

    def _write_outputs(self, metrics: dict, per_rank_gpu: list[dict]) -> None:
        from virgo_exps import provenance

        model = self.strategy.unwrap(self.model)
        self.out.model.parent.mkdir(parents=True, exist_ok=True)
        # The params and data these outputs were made with (checked by the report stage and `virgo-exps verify`).
        stamp = provenance.stamp(
            "train",
            as_flat_dict(self.params),
            inputs={str(self.data): self.data},
            upstream=self.train_set.attrs.get(provenance.KEY),
        )
        _atomic_torch_save(  # with the sha256 that models.load_model verifies
            model_file_content(
                model.state_dict(),
                {"name": self.cfg.model, "in_channels": self.train_set.n_channels},
                self.train_set.attrs.get("norm"),
                **{provenance.KEY: stamp},
            ),
            self.out.model,
        )
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
        # with the digest of the code that trained (the scalability report never pools runs of other code)
        clean[provenance.KEY] = {**provenance.metrics_stamp(stamp), "code": self._stage_code}
        rows = [r.row() for r in self.history]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
        _atomic_write_text(self.out.epochs, text.getvalue())
        ranks = []
        comp = (self.computation or {}).get("per_rank") or [{}] * len(per_rank_gpu)
        for rank, (c, g) in enumerate(zip(comp, per_rank_gpu)):
            ranks.append({"rank": rank, **self.placement[rank], **{f"compute_{k}": v for k, v in c.items()}, **g})
        _atomic_write_text(self.out.ranks, json.dumps(ranks, indent=2) + "\n")
        # The record of success last: a failure before it leaves no metrics.json that claims this run.
        _atomic_write_text(self.out.metrics, json.dumps(clean, indent=2, sort_keys=True) + "\n")
        if self.tracker is not None:
            per_epoch = {f.name for f in dataclasses.fields(EpochRecord)} | set(self.history[-1].metrics)
            # every number of metrics.json under its dotted key (cost.core_h, cost.energy_wh, ...)
            self.tracker.log_metrics(
                {k: v for k, v in numbers(clean).items() if k not in per_epoch and not k.startswith("provenance.")}
            )
            self.tracker.log_rank_runs(
                [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "rank"} for r in ranks]
            )
            for p in (self.out.metrics, self.out.epochs):
                self.tracker.log_artifact(p)
