"""Whether a training run succeeded: the one place that decides it.

A run succeeded when every epoch it was asked for is done (or the sweep's
pruner stopped it after a whole epoch), every loss it recorded is a finite
number, and its outputs were written. The trainer asks :func:`epoch_refusal`
after each epoch and stops a run that fails it with :class:`RunFailed` (one
line: the epoch and the step where the loss stopped being finite), so that
nothing of it is recorded as a result: no metrics, no model, no final
snapshot, MLflow's run FAILED, the stage non-zero. Readers of a recorded
result (the scalability report, ``virgo-exps verify``, the report stage, a
sweep's task before it records and pushes a trial) ask :func:`metrics_refusal`
of its ``metrics.json``, so that a result written by an older trainer, or
edited, is never shown as a success either.
"""

from __future__ import annotations

from virgo_exps.records import is_measure

# The exit code of a training run that ended without a result (the loss stopped being finite).
EXIT_FAILED_RUN = 4


class RunFailed(RuntimeError):
    """A run that ended without a result; its message is one line: what, where, and what to try."""


finite = is_measure  # a finite number, not a flag


def epoch_refusal(epoch: int, train_loss: float, val_loss: float, first_bad: tuple[int, int] | None) -> str | None:
    """Why a run cannot go on after ``epoch`` (None: it can). ``first_bad`` is (rank, step in the epoch)
    of the first training step whose loss was not finite, if any."""
    if first_bad is not None:
        rank, step = first_bad
        return (
            f"the training loss stopped being finite at epoch {epoch}, step {step} (rank {rank}); "
            "nothing of this run is recorded as a result: lower train.lr or train.weight_decay, or check the data"
        )
    if not finite(train_loss):
        return f"the training loss of epoch {epoch} is {train_loss}; nothing of this run is recorded as a result"
    if not finite(val_loss):
        return (
            f"the validation loss of epoch {epoch} is {val_loss}; nothing of this run is recorded as a result: "
            "lower train.lr or train.weight_decay, or check the data"
        )
    return None


def metrics_refusal(metrics: dict, losses: tuple[str, ...] = ("train_loss", "val_loss")) -> str | None:
    """Why a recorded result is not a successful run's (None: it is): each of ``losses`` a finite number
    and, where recorded, ``epochs`` a positive count. ``metrics.json`` has both losses; an MLflow run's
    final metrics have ``val_loss`` (its ``train_loss`` is per epoch)."""
    if not isinstance(metrics, dict):
        return "metrics are not a mapping"
    for key in losses:
        if not finite(metrics.get(key)):
            return f"{key} is {metrics.get(key)!r}, not a finite number (the run diverged or did not finish)"
    epochs = metrics.get("epochs", 1)
    if not (finite(epochs) and epochs > 0 and float(epochs).is_integer()):
        return f"epochs is {epochs!r}, not a count of epochs done"
    return None
