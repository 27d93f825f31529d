"""A sweep trial's pruning, as a callback of the trainer (:class:`Pruning`).

With ``VIRGO_SWEEP_TRIAL`` set (by :func:`virgo_exps.sweeps.search.trial_env`), rank 0 reports each epoch's
value of the sweep's metric to the sweep's Optuna trial and asks whether to prune; the answer reaches every
rank through one tiny all-reduce, so all stop after the same epoch. A pruned run ends normally (exit 0):
its final snapshot has status ``pruned``, results/run.json has ``"pruned": true`` and metrics.json
``"pruned_at_epoch"``, so DVC records the experiment. Without the variable nothing of this runs and Optuna
is not imported.
"""

from __future__ import annotations

import json
import os
import sys

import torch

# The sweep trial a run reports to (JSON: journal, study, number, pruner, metric); see SweepTrial. The same
# name as virgo_exps.sweeps.search.TRIAL_ENV, which sets it: not imported from there, as the search module
# (and what it imports) is not code the training's result depends on.
SWEEP_TRIAL_ENV = "VIRGO_SWEEP_TRIAL"


def in_sweep() -> bool:
    """Whether this run is a sweep's trial (the same on every rank)."""
    return bool(os.environ.get(SWEEP_TRIAL_ENV))


def sweep_tags() -> dict[str, str]:
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


class SweepTrial:
    """Rank 0's link to the Optuna trial named by ``VIRGO_SWEEP_TRIAL``; Optuna is imported only here."""

    def __init__(self, text: str):
        # Imported here, not at the top: Optuna is heavy and only a sweep's trial needs it; the trainer
        # imports this module on every run.
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


class Pruning:
    """The trainer's pruning callback: :meth:`open` once before the first epoch, :meth:`after_epoch` after
    each. Outside a sweep it does nothing (and every rank knows it, so none waits for the others)."""

    def __init__(self, strategy):
        self.strategy = strategy  # its rank, world size and all_reduce (virgo_exps.train.strategies.Strategy)
        self.active = in_sweep()  # the same on every rank: all join after_epoch
        self.trial: SweepTrial | None = None  # rank 0 of a sweep trial

    def open(self) -> None:
        """Rank 0: open the sweep's trial; one that cannot be opened leaves the run unpruned."""
        if not (self.active and self.strategy.is_main):
            return
        try:
            self.trial = SweepTrial(os.environ[SWEEP_TRIAL_ENV])
        except Exception as exc:  # as in after_epoch: the training itself does not depend on it
            print(
                f"train: cannot open the sweep trial of {SWEEP_TRIAL_ENV} ({type(exc).__name__}: {exc}); "
                "training on without pruning",
                file=sys.stderr,
            )

    def after_epoch(self, epoch: int, epochs: int, figures: dict[str, float]) -> bool:
        """Whether to stop after ``epoch`` (1-based) of ``epochs`` with these figures: rank 0 reports them and
        asks the pruner, every rank gets the verdict (one that comes after the last epoch changes nothing).
        False outside a sweep, without any collective."""
        if not self.active:
            return False
        s = self.strategy
        verdict = False
        if self.trial is not None:
            try:
                verdict = self.trial.should_prune(epoch, figures)
            except Exception as exc:  # the run goes on unpruned rather than dying on its bookkeeping
                print(
                    f"train: cannot report to {self.trial.label} ({type(exc).__name__}: {exc}); "
                    "training on without pruning",
                    file=sys.stderr,
                )
                self.trial = None
        flag = torch.tensor([1.0 if verdict else 0.0])
        if s.world_size > 1:
            flag = s.all_reduce(flag, op="max")
        if not (flag.item() > 0 and epoch < epochs):
            return False
        if s.is_main:
            print(
                f"train: pruned by the sweep after epoch {epoch}/{epochs} "
                f"(val_loss {figures['val_loss']:.4f}); writing the outputs of the epochs done",
                file=sys.stderr,
                flush=True,
            )
        return True
