"""Where the scalability report gets its experiments from.

Three sources, each giving a list of :class:`~virgo_exps.scalability.runs.Run` (one finished training run)
and a list of notes about what was left out and why:

- :func:`load_dvc`: the experiments of the current baseline in ``dvc exp show
  --json`` (plus the workspace and the baseline commit when they carry metrics
  that no experiment already has), optionally only some of them by name;
- :func:`virgo_exps.scalability.mlflow_source.load_mlflow`: the finished
  top-level runs of an MLflow experiment (teammates' runs on a shared server
  included);
- :func:`load_files`: ``metrics.json`` files or folders holding them.

Per-epoch training times (for the spread when a configuration ran only once)
come from ``epochs.csv``: the experiment's commit for DVC (read with ``git
show``, which changes nothing), the file beside ``metrics.json`` for files,
the metric history for MLflow. The first epoch is warm-up and never counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

from virgo_exps import dvcrun
from virgo_exps.config import DamagedInputError
from virgo_exps.gitrun import git
from virgo_exps.paths import EPOCHS_FILE, METRICS_FILE, run_file
from virgo_exps.provenance import read_metrics
from virgo_exps.records import merge
from virgo_exps.scalability.runs import SOFTWARE_FILE, Run, parse_epochs_csv


class SourceError(RuntimeError):
    """A source cannot be read at all (no DVC repository, unknown experiment, ...)."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"train": {"seed": 0}} -> {"train.seed": 0}."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


# -- DVC ---------------------------------------------------------------------


def _metrics_of(data: dict) -> dict | None:
    """The run's record out of ``dvc exp show``: metrics.json's measures with run.json's description (shown
    by DVC as params of the report stage)."""
    for path, entry in (data.get("metrics") or {}).items():
        values = (entry or {}).get("data")
        if (
            path.endswith("metrics.json")
            and isinstance(values, dict)
            and ("epoch_time_s_median" in values or "world_size" in values)
        ):
            described = ((data.get("params") or {}).get(str(run_file(path))) or {}).get("data")
            return merge(values, described) if isinstance(described, dict) else values
    return None


def _params_of(data: dict) -> dict:
    entry = (data.get("params") or {}).get("params.yaml") or {}
    return flatten(entry.get("data") or {})


NO_EPOCHS = (None, None, None)


def _git_epochs(repo: Path, rev: str) -> tuple:
    try:
        proc = git(repo, "show", f"{rev}:./{EPOCHS_FILE}", check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return NO_EPOCHS
    return parse_epochs_csv(proc.stdout) if proc.returncode == 0 else NO_EPOCHS


def _file_epochs(path: Path) -> tuple:
    return parse_epochs_csv(path.read_text()) if path.is_file() else NO_EPOCHS


def _hashes(entries: dict | None) -> dict[str, str]:
    """{path: hash} out of the deps/outs of ``dvc exp show --json``."""
    out = {}
    for path, entry in (entries or {}).items():
        h = (entry or {}).get("hash") if isinstance(entry, dict) else None
        if h:
            out[path] = str(h)
    return out


def parse_exp_show(shown: list[dict], repo: Path | None = None) -> tuple[list[Run], list[str]]:
    """Runs out of ``dvc exp show --json`` (DVC 3): experiments first, then the workspace and the baseline
    commits when they carry results. Duplicates (the workspace after ``dvc exp run`` holds the last
    experiment's results) are removed later, by :func:`virgo_exps.scalability.groups.dedupe`."""
    runs: list[Run] = []
    times: list[str] = []
    extra: list[Run] = []
    notes: list[str] = []
    head = next((e.get("rev") for e in shown if e.get("rev") not in (None, "workspace")), None)
    for entry in shown:
        rev = entry.get("rev")
        data = entry.get("data") or {}
        if rev == "workspace":
            metrics = _metrics_of(data)
            if metrics is not None:
                t, s, load = _file_epochs(repo / EPOCHS_FILE) if repo else NO_EPOCHS
                extra.append(
                    Run(
                        "workspace",
                        "workspace",
                        metrics,
                        _params_of(data),
                        t,
                        s,
                        None,
                        _hashes(data.get("deps")),
                        _hashes(data.get("outs")),
                        head,
                        epoch_load=load,
                    )
                )
            continue
        metrics = _metrics_of(data)
        if metrics is not None:
            t, s, load = _git_epochs(repo, rev) if repo else NO_EPOCHS
            extra.append(
                Run(
                    entry.get("name") or str(rev)[:7],
                    "commit",
                    metrics,
                    _params_of(data),
                    t,
                    s,
                    rev,
                    _hashes(data.get("deps")),
                    _hashes(data.get("outs")),
                    rev,
                    epoch_load=load,
                )
            )
        for exp in entry.get("experiments") or []:
            revs = exp.get("revs") or []
            if not revs:
                continue
            tip = revs[0]
            name = exp.get("name") or tip.get("name") or str(tip.get("rev"))[:7]
            state = (exp.get("executor") or {}).get("state")
            tip_data = tip.get("data") or {}
            metrics = _metrics_of(tip_data)
            if state in ("queued", "running", "failed") or tip.get("error") or metrics is None:
                why = state or (
                    "error: " + str((tip.get("error") or {}).get("msg", ""))[:80]
                    if tip.get("error")
                    else "no results/metrics.json"
                )
                notes.append(f"experiment {name} left out ({why})")
                continue
            t, s, load = _git_epochs(repo, tip["rev"]) if repo else NO_EPOCHS
            times.append(str(tip_data.get("timestamp") or ""))
            runs.append(
                Run(
                    name,
                    "experiment",
                    metrics,
                    _params_of(tip_data),
                    t,
                    s,
                    tip.get("rev"),
                    _hashes(tip_data.get("deps")),
                    _hashes(tip_data.get("outs")),
                    rev,
                    epoch_load=load,
                )
            )
    # Oldest first, so that of two experiments with the same result the one that trained is kept.
    stamp = {id(r): t for r, t in zip(runs, times)}
    runs.sort(key=lambda r: stamp[id(r)] or "")
    return runs + extra, notes


def load_dvc(
    repo: str | os.PathLike = ".", names: list[str] | None = None, all_commits: bool = False
) -> tuple[list[Run], list[str]]:
    repo = Path(repo)
    try:
        proc = dvcrun.run(["exp", "show", "--json"] + (["--all-commits"] if all_commits else []), repo)
    except dvcrun.DvcError as exc:
        raise SourceError(str(exc)) from None
    try:
        shown = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise SourceError("`dvc exp show --json` did not print JSON") from None
    runs, notes = parse_exp_show(shown, repo)
    if names:
        missing = [n for n in names if n not in {r.name for r in runs}]
        if missing:
            known = ", ".join(sorted(r.name for r in runs)) or "none"
            raise SourceError(f"no finished experiment named {', '.join(missing)} (available: {known})")
        runs = [r for r in runs if r.name in names]
        notes = [n for n in notes if any(f"experiment {x} " in n for x in names)]
    return runs, notes


# -- files -------------------------------------------------------------------


def _metrics_files(paths: list[str | os.PathLike]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            direct = [c for c in (p / "metrics.json", p / METRICS_FILE) if c.is_file()]
            files.extend(direct[:1] or sorted(p.rglob("metrics.json")))
        else:
            raise SourceError(f"{p}: no such file or directory")
    return list(dict.fromkeys(f.resolve() for f in files))


def _run_dir(f: Path) -> Path:
    return f.parent.parent if f.parent.name == "results" else f.parent


def _lock_hashes(d: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Hashes of the train stage's deps and outs from a dvc.lock in the run folder, and of a version.lock
    there (its content decides, as DVC's own hash would)."""
    deps: dict[str, str] = {}
    outs: dict[str, str] = {}
    lock = d / "dvc.lock"
    if lock.is_file():
        try:
            stage = ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).get("train") or {}
        except yaml.YAMLError:
            stage = {}
        for key, target in (("deps", deps), ("outs", outs)):
            for entry in stage.get(key) or []:
                h = entry.get("md5") or entry.get("hash") if isinstance(entry, dict) else None
                if isinstance(entry, dict) and entry.get("path") and h and h != "md5":
                    target[str(entry["path"])] = str(h)
    version = d / SOFTWARE_FILE
    if version.is_file():
        deps.setdefault(SOFTWARE_FILE, hashlib.md5(version.read_bytes()).hexdigest())
    return deps, outs


def load_files(paths: list[str | os.PathLike]) -> tuple[list[Run], list[str]]:
    """metrics.json files (or folders searched for them), with epochs.csv and params.yaml nearby if present."""
    files = _metrics_files(paths)
    if not files:
        raise SourceError("no metrics.json in " + ", ".join(map(str, paths)))
    dirs = [_run_dir(f) for f in files]
    common = Path(os.path.commonpath([str(d) for d in dirs])) if len(dirs) > 1 else dirs[0].parent
    runs, notes = [], []
    for f, d in zip(files, dirs):
        name = str(d.relative_to(common)) if d != common else d.name
        try:
            metrics = read_metrics(f)  # with run.json beside it
        except DamagedInputError as exc:
            notes.append(f"{f} left out ({str(exc).split('; ')[0]})")
            continue
        params = {}
        for candidate in (f.parent / "params.yaml", d / "params.yaml"):
            if candidate.is_file():
                params = flatten(yaml.safe_load(candidate.read_text()) or {})
                break
        t, s, load = _file_epochs(f.parent / "epochs.csv")
        deps, outs = _lock_hashes(d)
        runs.append(Run(name, "file", metrics, params, t, s, None, deps, outs, epoch_load=load))
    return runs, notes
