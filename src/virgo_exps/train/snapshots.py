"""Snapshots: the state a training resumes from, exactly.

Rank 0 keeps a snapshot (weights, optimiser, scheduler, epoch, step within the epoch, every rank's RNG
state) after every epoch and when asked to stop, in a folder of the main checkout that DVC never touches:
``.virgo/snapshots/<key>/`` (see :func:`virgo_exps.paths.snapshot_root`). The key is a hash of everything
that determines the trajectory (:meth:`Snapshots.config_key`): the ``train.*`` params except
``train.epochs`` and ``train.max_requeues``, the world size, the contents of the training data, the code
that computes a step (:data:`TRAJECTORY_CODE` and the study's model code) and the ``--checkpoints`` path,
so two outputs never share a folder. Before DVC reproduces an experiment it restores every output from its
cache; a snapshot inside an output would be overwritten by the committed one, which is why the running
state lives outside.

When the run completes, the final snapshot goes to the ``--checkpoints`` folder (the DVC output an
extension with more epochs continues from, see :mod:`virgo_exps.experiments.resume`) and the folder under
``.virgo/snapshots`` is removed. ``<checkpoints>/status.json`` always shows the latest state (what the
SLURM batch script reads to decide on a requeue).

A snapshot is used only when it is a prefix of the requested run: same key (checked again from its
contents), and no further than ``train.epochs``. A completed snapshot of exactly ``train.epochs`` epochs is
reused as is (nothing to train; the outputs are written again from it). Otherwise training starts afresh
and one line says why. Of the two candidates (the running state and the final snapshot in
``--checkpoints``) the one further along wins. The data order depends only on (seed, epoch), so an
interrupted-then-resumed run computes exactly what an uninterrupted one does. Two trainings with the same
key at the same time are refused (a lock in the folder), as they would overwrite each other's snapshots.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import pickle
import random
import shutil
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from virgo_exps import fsio
from virgo_exps.config import Params, as_flat_dict
from virgo_exps.launch.protocol import STATUS_COMPLETE, STATUS_FILE, STATUS_PRUNED
from virgo_exps.paths import snapshot_root
from virgo_exps.train import cost
from virgo_exps.train.outputs import EpochRecord, atomic_write_text, write_failure
from virgo_exps.train.strategies import Strategy

if TYPE_CHECKING:  # for the annotations only: the trainer imports this module
    from virgo_exps.train.trainer import Trainer

SNAPSHOT = "snapshot.pt"
STATUS = STATUS_FILE  # {"status": running|interrupted|complete|pruned, "epoch", "step_in_epoch", ...}
LOCK = "lock"
# Train keys that may change between a snapshot and the run that resumes from it.
RESUMABLE_KEYS = {"train.epochs", "train.max_requeues"}
# The code that computes a step (relative to the package): part of the snapshot key. Besides the loop
# and its schedule and precision (step), the defaults of the study's side (factory), what a snapshot
# restores (this module) and the profiler (it steps on a copy of the state and puts the state back).
TRAJECTORY_CODE = (
    "train/trainer.py",
    "train/step.py",
    "train/factory.py",
    "train/snapshots.py",
    "train/profiling.py",
    "train/data.py",
    "train/nodecopy.py",
    "train/strategies",
)
# Snapshot states written to --checkpoints: the run is over (no requeue).
FINAL_STATES = (STATUS_COMPLETE, STATUS_PRUNED)


# -- digests -------------------------------------------------------------------


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


# -- the file ------------------------------------------------------------------

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
        raise write_failure(path, exc) from exc


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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shown(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


# -- the snapshots of a run ------------------------------------------------------


class Snapshots:
    """The snapshots of one run: its key, its folder under ``.virgo/snapshots`` (locked by rank 0 while it
    runs) and ``--checkpoints``; :meth:`save` and :meth:`load` take the trainer's state and give it back."""

    def __init__(self, params: Params, strategy: Strategy, checkpoints: Path):
        self.params = params
        self.cfg = params.train
        self.strategy = strategy
        self.checkpoints = Path(checkpoints)
        self.digests: dict = {}
        self.live_dir: Path | None = None
        self._lock = None
        self.final_written = False  # the final snapshot is in --checkpoints

    def config_key(self) -> dict:
        """Everything that determines the trajectory (its hash names the snapshot folder)."""
        # a cosine schedule depends on train.epochs: a run with more epochs is another trajectory
        resumable = RESUMABLE_KEYS if self.cfg.lr_schedule == "constant" else RESUMABLE_KEYS - {"train.epochs"}
        key = {k: v for k, v in as_flat_dict(self.params).items() if k.startswith("train.") and k not in resumable}
        key["world_size"] = self.strategy.world_size
        key.update(self.digests)
        return key

    def compute_digests(self, data: Path, model_code: tuple[Path, ...]) -> None:
        """Data and code digests and the checkpoints path, computed by rank 0 and shared; names the folder."""
        # The same type on every rank: Horovod names a collective after the object's type.
        mine: dict = {}
        if self.strategy.is_main:
            # As DVC names it (relative to the workspace, the same in a queued experiment's copy).
            ckpt = self.checkpoints.resolve()
            with contextlib.suppress(ValueError):
                ckpt = ckpt.relative_to(Path.cwd().resolve())
            mine = {
                "data": tree_digest(data),
                "code": code_digest(model_code),
                "checkpoints": ckpt.as_posix(),
            }
        self.digests = self.strategy.all_gather_object(mine)[0]
        blob = json.dumps(self.config_key(), sort_keys=True, default=str).encode()
        self.live_dir = snapshot_root() / hashlib.sha256(blob).hexdigest()[:20]

    def lock(self) -> None:
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

    def release(self, remove: bool) -> None:
        """Drop the lock; remove the folder once the run is complete (its final snapshot is in --checkpoints)."""
        if not self.strategy.is_main:
            return
        if remove:
            shutil.rmtree(self.live_dir, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def save(self, t: Trainer, status: str) -> None:
        """Every rank: a snapshot of ``t`` with ``status`` (a STATUS_* of launch.protocol), written by rank 0,
        and the status file."""
        s = self.strategy
        weights = s.model_state(t.model)  # every rank: ZeRO 3 gathers the split weights (rank 0 keeps them)
        gathered = s.all_gather_object(
            {
                "rng": rng_state(),
                "loss_sum": t.loss_sum.clone(),
                "epoch_steps": t.epoch_steps,
                "usage": cost.rank_usage(),
                "energy_wh": t.gpu.energy_wh_so_far() if t.gpu is not None else None,
                # each rank's part of a partitioned optimiser state (ZeRO); else rank 0's is the whole
                "optimizer": s.optimizer_state(t.optimizer) if s.partitioned_optimizer else None,
            }
        )
        usage = [g.pop("usage") for g in gathered]
        energies = [e for e in (g.pop("energy_wh") for g in gathered) if e is not None]
        parts = [g.pop("optimizer") for g in gathered]
        rng = gathered
        self.final_written = status in FINAL_STATES
        if not s.is_main:
            return
        # Running and interrupted states stay outside DVC's outputs; the final
        # one is the --checkpoints output (what a longer run continues from).
        folder = self.checkpoints if status in FINAL_STATES else self.live_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        snapshot = {
            "model": weights,
            "optimizer": parts if s.partitioned_optimizer else s.optimizer_state(t.optimizer),
            "scheduler": t.scheduler.state_dict(),
            "scaler": s.scaler.state_dict() if s.scaler is not None else None,
            "epoch": t.epoch,
            "step_in_epoch": t.step_in_epoch,
            "global_step": t.global_step,
            "rng": rng,
            "world_size": s.world_size,
            "config": self.config_key(),
            "model_args": {"name": self.cfg.model, "in_channels": t.train_set.n_channels},
            "history": [asdict(r) for r in t.history],
            "own_from": t.own_from,
            "computation": t.computation,
            "status": status,
            # what every attempt so far used, this one up to now: a resumed run adds it to its own
            "cost_attempts": [
                *t.earlier_cost,
                cost.summarise(usage, [p["device"] for p in t.placement], sum(energies) if energies else None),
            ],
        }
        write_snapshot_file(snapshot, folder / SNAPSHOT)
        state = (
            json.dumps(
                {
                    "status": status,
                    "epoch": t.epoch,
                    "step_in_epoch": t.step_in_epoch,
                    "global_step": t.global_step,
                    "snapshot": str(folder / SNAPSHOT),
                }
            )
            + "\n"
        )
        if folder != self.checkpoints:
            atomic_write_text(folder / STATUS, state)
        atomic_write_text(self.checkpoints / STATUS, state)

    def choose(self) -> Path | None:
        """Rank 0: the snapshot to resume from (the candidate furthest along), or None; says why not."""
        config, best, best_pos = self.config_key(), None, None
        # The final snapshot first: at the same position it wins (a pruned or complete state is the record).
        for path in (self.checkpoints / SNAPSHOT, self.live_dir / SNAPSHOT):
            if not path.exists():
                continue
            try:
                snap = read_snapshot_file(path)
            except DamagedSnapshot as exc:
                print(f"train: not resuming from {_shown(path)}: {exc}; starting afresh", file=sys.stderr)
                continue
            except Exception as exc:
                print(
                    f"train: not resuming from {_shown(path)}: cannot read it ({type(exc).__name__}: "
                    f"{exc}); starting afresh",
                    file=sys.stderr,
                )
                continue
            reason = snapshot_refusal(snap, config, self.cfg.epochs)
            if reason:
                print(f"train: not resuming from {_shown(path)}: {reason}; starting afresh", file=sys.stderr)
                continue
            pos = (snap["epoch"], snap["step_in_epoch"])
            if best_pos is None or pos > best_pos:
                best, best_pos = path, pos
        return best

    def inherited_cost(self, snap: dict, path: Path) -> list[dict]:
        """The cost of the attempts this run continues: those of a running or interrupted snapshot (no
        record has them yet). A final snapshot's belong to the run that wrote it, whose metrics.json has
        them, so a run that continues or reuses it starts its own count, unless it is that very run
        again: the same SLURM job, requeued between the final snapshot and its outputs."""
        attempts = list(snap.get("cost_attempts", []))
        if path != self.checkpoints / SNAPSHOT or not attempts:
            return attempts
        job = cost.slurm_job_id()
        return attempts if job is not None and attempts[-1].get("slurm_job") == job else []

    def load(self, t: Trainer, in_sweep: bool) -> bool:
        """Every rank: put ``t`` in the state of the snapshot rank 0 chose; False when there is none.
        ``in_sweep``: the run is a sweep's trial (a pruned snapshot then stays pruned)."""
        s = self.strategy
        chosen = self.choose() if s.is_main else None
        # A str on every rank ("" for none): Horovod names a collective after the object's type.
        chosen = s.all_gather_object("" if chosen is None else str(chosen))[0]
        if not chosen:
            return False
        path = Path(chosen)
        snap = read_snapshot_file(path)
        s.load_model_state(t.model, snap["model"])
        s.load_optimizer_state(t.optimizer, snap["optimizer"])
        t.scheduler.load_state_dict(snap["scheduler"])
        if s.scaler is not None and snap.get("scaler"):
            s.scaler.load_state_dict(snap["scaler"])
        t.epoch = snap["epoch"]
        t.step_in_epoch = snap["step_in_epoch"]
        t.global_step = snap["global_step"]
        t.history = [EpochRecord(**r) for r in snap["history"]]
        t.own_from = int(snap.get("own_from", 0))
        if snap.get("status") in FINAL_STATES and snap["epoch"] < self.cfg.epochs:
            # A finished run continued with more epochs: a new run, whose timing is its own epochs'.
            t.own_from = snap["epoch"]
        t.computation = snap.get("computation")
        t.earlier_cost = self.inherited_cost(snap, path)
        mine = snap["rng"][s.rank]
        set_rng_state(mine["rng"])
        t.loss_sum = mine["loss_sum"].clone()
        t.epoch_steps = mine["epoch_steps"]
        done = snap.get("status") == STATUS_COMPLETE and t.epoch == self.cfg.epochs
        if snap.get("status") == STATUS_PRUNED and in_sweep:
            # The trial was pruned after this epoch and its task requeued before the outputs were
            # written: it stays pruned there. (Without a sweep, a run continues from the snapshot.)
            t.pruned_at = t.epoch
            done = True
        self.final_written = done and path == self.checkpoints / SNAPSHOT
        if s.is_main and done:
            print(
                f"train: reusing {_shown(path)}: all {t.epoch} epoch(s) of this configuration are done "
                f"(status complete); writing the outputs from it",
                file=sys.stderr,
            )
        elif s.is_main:
            print(
                f"train: resuming from {_shown(path)} at epoch {t.epoch + 1}, step {t.step_in_epoch} "
                f"(status {snap.get('status')})",
                file=sys.stderr,
            )
        return True
