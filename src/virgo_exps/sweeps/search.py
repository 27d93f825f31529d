"""The search behind a sweep: one Optuna study per sweep, kept in a journal file in the sweep dir.

Every task of the sweep's job array opens the same study (:func:`open_study`), asks it for a trial
(:func:`ask`: the trial number and its ``-S`` overrides), runs ``dvc exp run`` with :func:`trial_env`
(so that rank 0 of the trainer reports each epoch's validation loss and the pruner may stop the run) and
tells the outcome (:func:`tell`). The study lives in ``<sweep dir>/optuna.journal``, an append-only file
guarded by an open-exclusive lock file, which works on NFS-like shared file systems without a database
server; a second submission of the same sweep opens the same study and continues up to the budget.

Sampling: TPE (or random), a few random trials first. With a ``seed`` in the spec each ask seeds the
sampler from (seed, trials so far), so parallel tasks do not draw the same point and a rerun of the
same sequence of asks draws the same points.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from virgo_exps import fsio
from virgo_exps.config import DamagedInputError
from virgo_exps.records import numbers
from virgo_exps.sweeps.spec import SweepSpec, overrides_of, trial_name

if TYPE_CHECKING:
    import optuna

JOURNAL = "optuna.journal"
ASK_LOCK = "ask.lock"
TRIAL_ENV = "VIRGO_SWEEP_TRIAL"  # read by rank 0 of the training (virgo_exps.sweeps.pruning)
STATES = ("complete", "pruned", "fail")
ABANDONED = "abandoned in the middle of an ask (its task was killed); asked again"


def journal_path(sweep_dir: Path) -> Path:
    return Path(sweep_dir) / JOURNAL


def _storage(sweep_dir: Path):
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock, JournalStorage

    path = str(journal_path(sweep_dir))
    return JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))


# Beside the journal: its size and the SHA-256 of that many bytes after our last ask or tell. The journal
# only grows, so a shorter file, or other bytes in that prefix, is a damaged one.
MARK = "optuna.journal.mark"


def _journal_lock(sweep_dir: Path):
    from optuna.storages.journal import JournalFileOpenLock

    return JournalFileOpenLock(str(journal_path(sweep_dir)))


def journal_refusal(sweep_dir: Path) -> str | None:
    """Why the sweep's journal cannot be trusted (None: it can, or there is none yet); one line naming the
    file, the damage and the fix. Checked with the journal's writers held off."""
    path = journal_path(sweep_dir)
    if not path.exists():
        if (Path(sweep_dir) / MARK).exists():  # trials were asked or told: a fresh study would forget them
            return (
                f"{path}: missing, but {MARK} records trials asked or told in it (deleted?): the study would "
                "start again from nothing; restore the file from a backup"
            )
        return None
    lock = _journal_lock(sweep_dir)
    try:
        lock.acquire()
    except OSError as exc:  # the lock file beside the journal: not the team's to write
        return (
            f"{path}.lock: the journal cannot be locked ({exc.strerror or exc}); check the sweep folder's "
            "permissions with `virgo-exps share --check`"
        )
    try:
        try:
            why = fsio.trust_refusal(path, team_folder=sweep_dir)
            if why:
                return f"{path}: not read: {why}; only you and the team write a sweep's journal"
            data = path.read_bytes()
        except OSError as exc:
            return f"{path}: cannot be read ({exc.strerror or exc}); check its permissions"
        mark_file = Path(sweep_dir) / MARK
        if mark_file.exists():
            try:
                mark = json.loads(mark_file.read_text())
                size, digest = int(mark["size"]), str(mark["sha256"])
            except (OSError, ValueError, KeyError, TypeError):
                return f"{mark_file}: damaged; remove it to accept {path} as it is, if you trust that file"
            if len(data) < size:
                return (
                    f"{path}: {len(data)} bytes, shorter than the {size} it had after the last trial was asked or "
                    "told (truncated): the study would forget trials; restore the file from a backup"
                )
            if hashlib.sha256(data[:size]).hexdigest() != digest:
                return f"{path}: its first {size} bytes changed since they were written; restore it from a backup"
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            return f"{path}: its last line is cut short (line {len(lines)}); restore the file from a backup"
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or "op_code" not in record:
                return (
                    f"{path}: line {n} is not an Optuna journal record (damaged); remove that line if it was "
                    "added by hand, or restore the file from a backup"
                )
        return None
    finally:
        lock.release()


def check_journal(sweep_dir: Path) -> None:
    """Raise DamagedInputError (one line) when the sweep's journal cannot be trusted."""
    why = journal_refusal(sweep_dir)
    if why:
        raise DamagedInputError(why)


def _mark_journal(sweep_dir: Path) -> None:
    """Record the journal's size and digest after our own ask or tell (see MARK)."""
    lock = _journal_lock(sweep_dir)
    lock.acquire()
    try:
        data = journal_path(sweep_dir).read_bytes()
        fsio.write_json(Path(sweep_dir) / MARK, {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    finally:
        lock.release()


def pruner_args(spec: SweepSpec) -> tuple[str, dict[str, Any]]:
    """The Optuna pruner class name and its arguments (also handed to the trainer through :func:`trial_env`).

    Steps are epochs: the median pruner stops a trial whose validation loss after an epoch is worse than
    the median of the earlier trials' losses after the same epoch, once ``startup_trials`` trials have
    finished, and never in the first ``warmup_epochs`` epochs of a trial.
    """
    if spec.pruner == "median":
        return "MedianPruner", {"n_startup_trials": spec.startup_trials, "n_warmup_steps": spec.warmup_epochs}
    return "NopPruner", {}


def _pruner(spec: SweepSpec):
    import optuna

    name, args = pruner_args(spec)
    return getattr(optuna.pruners, name)(**args)


def _sampler(spec: SweepSpec, asked: int):
    import optuna

    seed = None if spec.seed is None else (spec.seed * 1_000_003 + asked) % 2**32
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Random trials first: a third of the budget, from 2 up to Optuna's usual 10.
    startup = min(10, max(2, spec.trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def _quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_study(spec: SweepSpec, sweep_dir: Path) -> optuna.Study:
    """The sweep's study: created on first use, loaded afterwards (a second submission continues it).
    A search's study is asked for its trials; a grid's records them (every sweep opens in optuna-dashboard)."""
    import optuna

    _quiet()
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    check_journal(sweep_dir)
    study = optuna.create_study(
        storage=_storage(sweep_dir),
        # a grid's study is never asked: its trials are recorded as they end (record_grid_trial)
        sampler=_sampler(spec, 0) if spec.kind == "search" else optuna.samplers.RandomSampler(seed=0),
        pruner=_pruner(spec),
        study_name=spec.name,
        direction=spec.direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != spec.direction:
        raise ValueError(
            f"sweep {spec.name!r}: the study in {journal_path(sweep_dir)} was made to {study.direction.name.lower()} "
            f"{spec.metric}, the spec says {spec.direction}; use a new sweep name"
        )
    if study.metric_names is None:  # the value's name in the tools that show the study (optuna-dashboard)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([spec.metric])
    return study


class _AskLock:
    """Count-then-ask as one step across tasks, so that the budget is never overrun."""

    def __init__(self, sweep_dir: Path):
        from optuna.storages.journal import JournalFileOpenLock

        self._lock = JournalFileOpenLock(str(Path(sweep_dir) / ASK_LOCK))

    def __enter__(self):
        self._lock.acquire()
        return self

    def __exit__(self, *exc):
        self._lock.release()


def _override(p: dict[str, Any], value: Any) -> str:
    """A parameter's value as its ``-S`` override."""
    if p["type"] == "choice":
        return str(value)
    if p["type"] == "int":
        return str(int(value))
    return repr(float(value))


def _suggest(trial: optuna.Trial, key: str, p: dict[str, Any]) -> str:
    kind = p["type"]
    if kind == "choice":
        return _override(p, trial.suggest_categorical(key, list(p["values"])))
    if kind == "int":
        return _override(p, trial.suggest_int(key, p["low"], p["high"], step=p.get("step", 1), log=bool(p.get("log"))))
    return _override(p, trial.suggest_float(key, p["low"], p["high"], log=kind == "loguniform", step=p.get("step")))


def ask(spec: SweepSpec, sweep_dir: Path, task: str | None = None) -> tuple[int, dict[str, str]] | None:
    """The next trial: its number and its ``-S`` overrides; None when ``spec.trials`` trials were asked.

    ``task`` names the asker (``<array job>_<index>``) and is kept with the trial. A task asks again
    only when it was requeued before it recorded its trial: it then gets back the running trial it was
    given, not a new one, so that no trial stays running in the study with nobody to finish it.
    """
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    with _AskLock(sweep_dir):
        study = open_study(spec, sweep_dir)
        trials = study.get_trials(deepcopy=False)
        if task is not None:
            from optuna.trial import TrialState

            for old in trials:
                if old.state == TrialState.RUNNING and old.user_attrs.get("task") == task:
                    if all(key in old.params for key in spec.space):
                        return old.number, {key: _override(p, old.params[key]) for key, p in spec.space.items()}
                    # killed in the middle of this ask: the trial has no complete set of values; it
                    # failed without running and does not count against the budget
                    storage = _storage(sweep_dir)
                    storage.set_trial_user_attr(_trial_id(spec, storage, old.number), "fail_reason", ABANDONED)
                    study.tell(old.number, state=TrialState.FAIL, skip_if_finished=True)
                    trials = study.get_trials(deepcopy=False)
        counted = [t for t in trials if t.user_attrs.get("fail_reason") != ABANDONED]
        if len(counted) >= spec.trials:
            return None
        study.sampler = _sampler(spec, len(trials))
        trial = study.ask()
        if task is not None:  # first: a task killed in the middle of this ask finds its trial again
            trial.set_user_attr("task", task)
        overrides = {key: _suggest(trial, key, p) for key, p in spec.space.items()}
        trial.set_user_attr("experiment", trial_name(spec.name, trial.number))
        _mark_journal(sweep_dir)
    return trial.number, overrides


def _trial_id(spec: SweepSpec, storage, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(spec.name), number)


def tell(
    spec: SweepSpec, sweep_dir: Path, number: int, value: float | None, state: str, attrs: dict | None = None
) -> None:
    """Record trial ``number``'s outcome: ``complete`` with the metric's value, ``pruned`` or ``fail``.

    ``attrs`` are kept with the trial (experiment name, cost, log path) before it is finished. Telling a
    trial that is already finished (a requeued task telling again) changes nothing.
    """
    final, value, why = _outcome(spec, value, state)
    study = open_study(spec, sweep_dir)
    storage = _storage(sweep_dir)
    frozen = study.get_trials(deepcopy=False)
    if not 0 <= number < len(frozen):
        raise ValueError(f"sweep {spec.name!r} has no trial {number} (trials 0-{len(frozen) - 1} were asked)")
    if frozen[number].state.is_finished():
        return
    trial_id = _trial_id(spec, storage, number)
    for key, item in {**_user_attrs(attrs), **({"fail_reason": why} if why else {})}.items():
        storage.set_trial_user_attr(trial_id, key, item)
    study.tell(number, value, state=final, skip_if_finished=True)
    _mark_journal(sweep_dir)


def _outcome(spec: SweepSpec, value: float | None, state: str):
    """(Optuna trial state, value, why it failed or None) of an outcome told as ``complete`` with the
    metric's value, ``pruned`` or ``fail``: a complete trial whose metric is not a finite number failed."""
    from optuna.trial import TrialState

    if state not in STATES:
        raise ValueError(f"state {state!r}: expected one of {', '.join(STATES)}")
    if state == "complete" and (value is None or not math.isfinite(float(value))):
        return TrialState.FAIL, None, f"{spec.metric} is {value!r}"
    if state == "complete":
        return TrialState.COMPLETE, float(value), None
    return (TrialState.PRUNED if state == "pruned" else TrialState.FAIL), None, None


def _user_attrs(attrs: dict | None) -> dict[str, Any]:
    """A trial's attributes as Optuna keeps them (JSON values), and each number of a nested one under its
    own key as well (cost.core_h, allocation.cpu_eff): what a dashboard sorts and filters on."""
    out = {key: json.loads(json.dumps(item, default=str)) for key, item in (attrs or {}).items()}
    out.update(numbers({key: item for key, item in (attrs or {}).items() if isinstance(item, dict)}))
    return out


def record_grid_trial(
    spec: SweepSpec,
    sweep_dir: Path,
    index: int,
    value: float | None,
    state: str,
    attrs: dict | None = None,
) -> None:
    """Grid trial ``index``'s outcome as a finished trial of the sweep's study: its ``-S`` values as
    categorical params, the metric's value (``complete``), ``pruned`` or ``fail``, its attributes and
    ``grid_index``. A trial recorded already (a requeued task recording again) changes nothing."""
    import optuna

    final, value, why = _outcome(spec, value, state)
    overrides = overrides_of(spec, index)
    choices = {key: tuple(dict.fromkeys(combo[key] for combo in spec.grid)) for key in overrides}
    user = {**_user_attrs(attrs), "grid_index": index, **({"fail_reason": why} if why else {})}
    with _AskLock(sweep_dir):
        study = open_study(spec, sweep_dir)
        if any(t.user_attrs.get("grid_index") == index for t in study.get_trials(deepcopy=False)):
            return
        study.add_trial(
            optuna.trial.create_trial(
                params=dict(overrides),
                distributions={k: optuna.distributions.CategoricalDistribution(c) for k, c in choices.items()},
                value=value,
                state=final,
                user_attrs=user,
            )
        )
        _mark_journal(sweep_dir)


def trial_env(spec: SweepSpec, sweep_dir: Path, number: int) -> dict[str, str]:
    """The environment of trial ``number``'s ``dvc exp run``: where rank 0 of the trainer reports to."""
    name, args = pruner_args(spec)
    info = {
        "journal": str(journal_path(sweep_dir).resolve()),
        "study": spec.name,
        "number": int(number),
        "pruner": name,
        "pruner_args": args,
        "metric": spec.metric,
    }
    return {TRIAL_ENV: json.dumps(info, sort_keys=True)}


def metric_of(metrics: dict[str, Any], key: str) -> Any:
    """``metrics["a"]["b"]`` for ``key`` ``"a.b"`` (None when absent)."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


__all__ = [
    "JOURNAL",
    "TRIAL_ENV",
    "ask",
    "journal_path",
    "metric_of",
    "open_study",
    "pruner_args",
    "record_grid_trial",
    "tell",
    "trial_env",
]
