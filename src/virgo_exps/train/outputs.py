"""What a training leaves: the epochs' records, its final metrics, its outputs (the model file,
metrics.json and run.json, epochs.csv and epochs.json, ranks.json) and what it tells the tracker (MLflow),
written by rank 0.

Every file is written whole or not at all; a full disk ends the run with one line
(:func:`write_failure`), its last snapshot kept.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import io
import json
import shutil
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from virgo_exps import fsio, paths, provenance
from virgo_exps.config import as_flat_dict
from virgo_exps.machines import active_machine_name
from virgo_exps.modelfile import model_file_content
from virgo_exps.records import numbers, split
from virgo_exps.sweeps.pruning import sweep_tags
from virgo_exps.train import cost, outcome

if TYPE_CHECKING:  # for the annotations only: the trainer imports this module
    from virgo_exps.train.trainer import Trainer


@dataclass
class TrainOutputs:
    """Every path the train stage writes (all from dvc.yaml)."""

    checkpoints: Path  # persistent: the snapshot to resume from
    model: Path  # final weights and model arguments
    metrics: Path  # final metrics (DVC metrics)
    epochs: Path  # one row per epoch (DVC plots)
    ranks: Path  # per-rank figures (computation fraction, GPU energy)

    @property
    def run(self) -> Path:
        """What describes the run (device, machine, strategy, provenance): beside metrics.json."""
        return paths.run_file(self.metrics)

    @property
    def epochs_plot(self) -> Path:
        """The epochs' rows for DVC's plots, numbers as numbers: beside epochs.csv."""
        return paths.epochs_plot_file(self.epochs)


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


def busiest(per_rank: list[tuple[float | None, int | None]]) -> dict:
    """The epoch's load figures from every rank's (host load, other GPU processes): the worst of each."""
    loads = [load for load, _ in per_rank if load is not None]
    others = [n for _, n in per_rank if n is not None]
    return {
        "load_avg": round(max(loads), 3) if loads else None,
        "gpu_other_procs": max(others) if others else None,
    }


def device_name(device: torch.device) -> str:
    """``cpu``, or the GPU's model name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


# -- writing ------------------------------------------------------------------


def write_failure(path: Path, exc: BaseException) -> BaseException:
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


def atomic_write_text(path: Path, text: str) -> None:
    try:
        fsio.write_text(path, text)
    except OSError as exc:
        raise write_failure(path, exc) from exc


def atomic_torch_save(obj: Any, path: Path) -> None:
    try:
        with fsio.replacing(path) as tmp, open(tmp, "wb") as fh:
            torch.save(obj, fh)
    except (OSError, RuntimeError) as exc:
        raise write_failure(path, exc) from exc


# -- the record of the run ----------------------------------------------------


def final_metrics(t: Trainer, per_rank_gpu: list[dict]) -> dict:
    """metrics.json's figures (every rank computes them; the cost gathers every rank's usage)."""
    h = t.history
    own = h[t.own_from :] or h  # a continued finished run's epochs are its parent's record
    timed = own[1:] if len(own) > 1 else own  # the first epoch of a run is warm-up
    times = [r.train_time_s for r in timed]
    m = {
        "strategy": t.cfg.strategy,
        "nodes": t.cfg.nodes,
        "procs_per_node": t.cfg.procs_per_node,
        "world_size": t.strategy.world_size,
        "epochs": len(h),
        "parameters": t.n_parameters,
        "train_loss": h[-1].train_loss,
        "val_loss": h[-1].val_loss,
        **h[-1].metrics,
        "epoch_time_s_median": float(np.median(times)),
        "epoch_time_s_mean": float(np.mean(times)),
        "samples_per_s": float(np.median([r.samples_per_s for r in timed])),
        "timed_epochs": len(timed),
        "first_timed_epoch": timed[0].epoch,
        "computation_fraction": (t.computation or {}).get("computation_fraction"),
        "machine": active_machine_name(),
        "hosts": len({p["host"] for p in t.placement}),
        "device": t.placement[0]["device"],
    }
    energies = [g.get("energy_wh") for g in per_rank_gpu if g.get("energy_wh") is not None]
    utils = [g.get("utilization_pct") for g in per_rank_gpu if g.get("utilization_pct") is not None]
    if t.pruned_at is not None:
        m["pruned"] = True
        m["pruned_at_epoch"] = t.pruned_at
    m["gpu_energy_wh"] = float(sum(energies)) if energies else None
    m["gpu_utilization_pct"] = float(np.mean(utils)) if utils else None
    if m["gpu_energy_wh"] is not None:
        samples = sum(len(t.train_set) // t.cfg.global_batch_size * t.cfg.global_batch_size for _ in h)
        m["gpu_energy_wh_per_sample"] = m["gpu_energy_wh"] / max(1, samples)
    # What the run used (train/cost.py): every rank's own figures, gathered.
    # A resumed run adds what its earlier attempts used (their snapshots' figures).
    this = cost.summarise(
        t.strategy.all_gather_object(cost.rank_usage()),
        [p["device"] for p in t.placement],
        m["gpu_energy_wh"],
    )
    m["cost"] = cost.combine([*t.earlier_cost, this])
    return m


def stage_code() -> str | None:
    """The digest of the train stage's code (provenance): in metrics.json and the run's tags."""
    return provenance.stage_code_digest("train")


def write_outputs(t: Trainer, metrics: dict, per_rank_gpu: list[dict], weights: dict) -> None:
    """Rank 0: the model file (``weights``: the network's whole state dict, :meth:`Strategy.model_state`), the
    epochs' files, ranks.json, run.json and, last, metrics.json; then the tracker's copy."""
    t.out.model.parent.mkdir(parents=True, exist_ok=True)
    # The params and data these outputs were made with (checked by the report stage and `virgo-exps verify`).
    stamp = provenance.stamp(
        "train",
        as_flat_dict(t.params),
        inputs={str(t.data): t.data},
        upstream=t.train_set.attrs.get(provenance.KEY),
    )
    atomic_torch_save(  # with the sha256 that models.load_model verifies
        model_file_content(
            weights,
            {"name": t.cfg.model, "in_channels": t.train_set.n_channels},
            t.train_set.attrs.get("norm"),
            **{provenance.KEY: stamp},
        ),
        t.out.model,
    )
    # with the digest of the code that trained (the scalability report never pools runs of other code)
    record = {**metrics, provenance.KEY: {**provenance.metrics_stamp(stamp), "code": t.stage_code}}
    if t.tracker is not None and t.tracker.run_id:
        record["mlflow_run_id"] = t.tracker.run_id  # the run's record in the store it logged to
    # metrics.json: the numbers DVC compares (what was not measured is left out); run.json: the rest
    measures, description = split(record)
    rows = [r.row() for r in t.history]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(t.out.epochs, text.getvalue())
    plot_rows = [split(r)[0] for r in rows]
    atomic_write_text(t.out.epochs_plot, json.dumps(plot_rows, indent=1) + "\n")
    ranks = []
    comp = (t.computation or {}).get("per_rank") or [{}] * len(per_rank_gpu)
    for rank, (c, g) in enumerate(zip(comp, per_rank_gpu)):
        ranks.append({"rank": rank, **t.placement[rank], **{f"compute_{k}": v for k, v in c.items()}, **g})
    atomic_write_text(t.out.ranks, json.dumps(ranks, indent=2) + "\n")
    # The record of success last: a failure before it leaves no metrics.json that claims this run.
    atomic_write_text(t.out.run, json.dumps(description, indent=2, sort_keys=True) + "\n")
    atomic_write_text(t.out.metrics, json.dumps(measures, indent=2, sort_keys=True) + "\n")
    if t.tracker is not None:
        per_epoch = {f.name for f in dataclasses.fields(EpochRecord)} | set(t.history[-1].metrics)
        # every number of metrics.json under its dotted key (cost.core_h, cost.energy_wh, ...)
        t.tracker.log_metrics({k: v for k, v in numbers(measures).items() if k not in per_epoch})
        t.tracker.log_rank_runs(
            [{k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "rank"} for r in ranks]
        )
        for p in (t.out.metrics, t.out.run, t.out.epochs):
            t.tracker.log_artifact(p)
        t.tracker.log_artifact(t.out.model, "model")  # the trained network, with its checksum and stamp
        t.tracker.register_model("model")
        t.tracker.log_dataset(t.data, record[provenance.KEY]["data"])


def say_epoch(rec: EpochRecord, epochs: int, steps: int, steps_per_epoch: int) -> None:
    """Rank 0: the epoch's line in the log (``steps`` of the epoch's ``steps_per_epoch`` done)."""
    print(
        f"epoch {rec.epoch}/{epochs}: train_loss {rec.train_loss:.4f} "
        f"val_loss {rec.val_loss:.4f} train {rec.train_time_s:.2f}s "
        f"({rec.samples_per_s:.0f} samples/s) val {rec.val_time_s:.2f}s "
        f"[{steps}/{steps_per_epoch} steps]",
        file=sys.stderr,
        flush=True,
    )


# -- tracking (MLflow, rank 0) -------------------------------------------------


def start_record(t: Trainer, resumed: bool) -> None:
    """Every rank: where each rank runs (recorded, never part of what DVC hashes); rank 0: the digest of the
    stage's code and, with a tracker, the run's record (params, tags, the epochs of the snapshot it resumed)."""
    t.placement = t.strategy.all_gather_object({"host": socket.gethostname(), "device": device_name(t.strategy.device)})
    if t.strategy.is_main:
        t.stage_code = stage_code()
        if t.tracker is not None:
            start_tracking(t, resumed)


def start_tracking(t: Trainer, resumed: bool) -> None:
    """Rank 0: open the run's record with its params and tags, and the epochs of the snapshot it resumed."""
    hosts = sorted({p["host"] for p in t.placement})
    t.tracker.start(
        as_flat_dict(t.params),
        {
            "strategy": t.cfg.strategy,
            "world_size": str(t.strategy.world_size),
            "resumed": str(resumed),
            "machine": active_machine_name(),
            "hosts": ",".join(hosts),
            "device": t.placement[0]["device"],
            "code": t.stage_code or "",
            **sweep_tags(),
        },
        [Path("version.lock")],
    )
    # The epochs of the snapshot belong to this run's record as well.
    for rec in t.history:
        log_epoch(t, rec)


def log_epoch(t: Trainer, rec: EpochRecord) -> None:
    """Rank 0: one epoch's figures to the tracker, if any."""
    if t.tracker is not None:
        t.tracker.log_metrics({k: v for k, v in rec.row().items() if k != "epoch"}, rec.epoch)


def end_tracking(t: Trainer, status: str) -> None:
    """Rank 0: close the run's record, if any, as FINISHED, KILLED or FAILED."""
    if t.tracker is not None:
        t.tracker.end(status)
