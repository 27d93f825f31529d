"""Everything about a run that can be known before it starts, checked before it starts.

:func:`check` is what the first stage (``stages/environment.py``) and
``virgo-exps check`` run, so both refuse exactly the same things, with the
same one line, before any stage has written or deleted an output:

1. ``params.yaml`` itself: types, allowed values and ranges, cross-field rules
   (:func:`virgo_exps.config.load_params`);
2. the params against the active machine (:mod:`virgo_exps.machines`): nodes
   and processes the machine can run, GPUs per node, the strategy's software
   installed, the study's own machine checks (its StudySpec.machine_check);
3. a size budget: disk and memory estimated from the params against what is
   free on the file system of ``data/`` (and of DVC's cache) and in memory;
4. the tracking credentials: none inside ``MLFLOW_TRACKING_URI``
   (:func:`virgo_exps.train.tracking.check_tracking_uri`), which MLflow would print
   into the training logs, and no password in the environment a SLURM job
   inherits (:func:`check_tracking_secret`).

A rule that the launcher already enforces (e.g. several nodes on the local
machine, Horovod not built) is checked by calling the launcher's own code.

Nothing here imports torch unless a check needs it (a CUDA device, GPUs for
several processes), so validating params stays cheap.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from virgo_exps import container
from virgo_exps.config import ConfigError, Params, as_flat_dict, load_params, read_yaml, studies
from virgo_exps.gitrun import git
from virgo_exps.launch.launcher import local_command
from virgo_exps.launch.slurm import use_slurm_conf
from virgo_exps.launch.strategy_table import check_software, strategy_row
from virgo_exps.machines import Machine, load_machine
from virgo_exps.paths import main_checkout, repo_root
from virgo_exps.store import format_bytes
from virgo_exps.train.tracking import check_tracking_uri


def _fmt(n: float) -> str:
    return format_bytes(n)


# -- the params against the machine ------------------------------------------


def check_machine(params: Params, machine: Machine) -> None:
    """Nodes, processes, GPUs and the strategy's software on ``machine``; raise ConfigError."""
    cfg = params.train
    if machine.kind == "local":
        # The launcher's own refusals (several nodes here, horovodrun missing).
        local_command(cfg, ["stages/train.py"], python=sys.executable, deepspeed_launcher=machine.deepspeed_launcher)
        total = machine.max_procs or os.cpu_count() or 1
        if cfg.procs_per_node > total:
            raise ConfigError(
                f"train.procs_per_node: {cfg.procs_per_node} processes do not fit the {total} cores of machine "
                f"'{machine.name}'; lower it or run on a cluster"
            )
        if cfg.procs_per_node > 1:
            gpus = _visible_gpus()
            if gpus and cfg.procs_per_node > gpus:
                raise ConfigError(
                    f"train.procs_per_node: {cfg.procs_per_node} processes but machine '{machine.name}' has "
                    f"{gpus} GPU(s), one per process; set train.procs_per_node to at most {gpus}"
                )
    else:
        use_slurm_conf(machine)  # the profile's cluster must exist
        if machine.gpus_per_node and cfg.procs_per_node > machine.gpus_per_node:
            raise ConfigError(
                f"train.procs_per_node: {cfg.procs_per_node} processes per node but machine '{machine.name}' "
                f"requests {machine.gpus_per_node} GPU(s) per node, one per process; set train.procs_per_node "
                f"to at most {machine.gpus_per_node} or raise gpus_per_node in machines/{machine.name}/machine.yaml"
            )
    if cfg.dist_backend == "nccl" and cfg.strategy in ("ddp", "deepspeed"):
        gpus = _visible_gpus() if machine.kind == "local" else machine.gpus_per_node
        if not gpus:
            where = "this machine has no CUDA GPU" if machine.kind == "local" else "its profile requests no GPUs"
            raise ConfigError(
                f"train.dist_backend: 'nccl' needs GPUs, but machine '{machine.name}' has none ({where}); "
                "set it to 'auto' or 'gloo'"
            )
    check_precision(cfg, machine)
    if machine.container is not None and container.current() is None:
        container.check(machine.container)  # a missing or damaged image, before any stage works
    else:
        check_software(strategy_row(cfg.strategy), sys.executable)  # the launcher's own check, and its words


def check_precision(cfg, machine: Machine) -> None:
    """train.precision and train.compile can run where training runs (this machine's torch: the nodes run
    the same environment); raise ConfigError."""
    import torch

    gpus = _visible_gpus() if machine.kind == "local" else machine.gpus_per_node
    if cfg.precision == "bf16" and machine.kind == "local" and gpus and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision: 'bf16' needs a GPU with bfloat16 support, but {torch.cuda.get_device_name(0)} has "
            "none; choose 'fp16' or 'fp32'"
        )
    if not cfg.compile:
        return
    if gpus:
        try:
            import triton  # noqa: F401 - torch.compile's code generator for GPUs
        except ImportError:
            raise ConfigError(
                "train.compile: torch.compile needs Triton for GPUs, and this environment has none; set "
                "train.compile=false or install the Triton that matches torch"
            ) from None
    else:
        cxx = os.environ.get("CXX") or "g++"
        if not (shutil.which(cxx) or shutil.which("c++")):
            raise ConfigError(
                f"train.compile: torch.compile on CPUs builds C++ and finds no compiler ({cxx}, c++); set "
                "train.compile=false, or install one (Debian: g++) or name it in CXX"
            )


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# -- the size budget -----------------------------------------------------------


@dataclass(frozen=True)
class DataNeeds:
    """What a study's data stages need, from its params (its ``StudySpec.data_needs``)."""

    outputs: tuple[tuple[str, str, int], ...]  # (what, path under the checkout, bytes it adds; 0: not rerun)
    peaks: tuple[tuple[int, str], ...]  # (bytes of memory, which stage and what) of what runs on this machine
    subject: str  # the params that set the size, as a refusal begins: "generate.n_samples: 512 samples"
    lower: str  # how to make it smaller: "lower generate.n_samples (or ...)"


@dataclass(frozen=True)
class Budget:
    """Sizes estimated from the params, in bytes, and what this machine has free."""

    outputs: tuple[tuple[str, int], ...]  # (what, bytes) of each data output (uncompressed: an upper bound)
    subject: str
    lower: str
    disk: int  # what the data outputs add on the file system of data/
    disk_free: int  # free there, plus what the current outputs occupy (they are replaced)
    copies: int  # 2 when DVC's cache is on the file system of data/ and DVC may copy (a copy in each)
    cache_disk: int  # what DVC's cache needs on its own file system (0: same as data/)
    cache_free: int
    memory: int  # peak memory of the stages that run on this machine
    memory_what: str  # which stage sets that peak
    memory_free: int


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a file system question, before the folder exists)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size_of(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def dvc_cache() -> tuple[Path, tuple[str, ...]]:
    """DVC's cache folder and link types (``cache.dir``, ``cache.type`` of ``.dvc/config(.local)``).

    Defaults: ``.dvc/cache`` of the main checkout, and DVC's ``reflink,copy``.
    """
    dvc_dir = main_checkout() / ".dvc"
    folder, types = dvc_dir / "cache", ("reflink", "copy")
    for name in ("config", "config.local"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(dvc_dir / name)
        except configparser.Error:
            continue
        for section in parser.sections():
            if section.strip().strip("'\"") != "cache":
                continue
            value = parser.get(section, "dir", fallback="").strip().strip("'\"")
            if value:
                path = Path(os.path.expanduser(value))
                folder = path if path.is_absolute() else dvc_dir / path
            value = parser.get(section, "type", fallback="").strip().strip("'\"")
            if value:
                types = tuple(t.strip() for t in value.split(",") if t.strip())
    return folder, types


def stages_up_to_date(params: Params, names: tuple[str, ...]) -> set[str]:
    """Of the stages ``names`` (in pipeline order), those DVC will not rerun: dvc.lock records exactly this
    params file's values of the stage's params and the MD5 of each of its file dependencies, its outputs
    exist, and every earlier stage of ``names`` it depends on is up to date too. Decided without DVC (the
    first stage runs while DVC holds the repository's lock); anything unclear counts as a rerun."""
    root = repo_root()
    try:
        lock = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return set()
    flat = as_flat_dict(params)
    current: set[str] = set()
    for name in names:
        entry = lock.get(name) or {}
        ok = bool(entry)
        recorded = (entry.get("params") or {}).get("params.yaml") or {}
        ok = ok and all(flat.get(k, _MISSING) == v for k, v in recorded.items())
        for dep in entry.get("deps") or []:
            path, md5 = root / dep.get("path", ""), str(dep.get("md5", ""))
            if md5.endswith(".dir"):
                # another stage's output (data/raw.zarr): up to date only if that stage is
                ok = ok and any(o.get("path") == dep.get("path") for n in current for o in lock[n].get("outs") or [])
            else:
                try:
                    ok = ok and hashlib.md5(path.read_bytes()).hexdigest() == md5
                except OSError:
                    ok = False
        ok = ok and all((root / o.get("path", "")).exists() for o in entry.get("outs") or [])
        if ok:
            current.add(name)
    return current


def study_hooks(params: Params, hook: str) -> list:
    """The functions named by ``hook`` (``"module:function"``) of the installed studies whose sections
    this params file has; imported only here, when a run is checked."""
    found = []
    for study in studies():
        name = getattr(study, hook)
        if name is not None and all(params.study.get(section) is not None for section in study.sections):
            module, _, function = name.partition(":")
            found.append(getattr(importlib.import_module(module), function))
    return found


def data_needs(params: Params, machine: Machine) -> DataNeeds | None:
    """What the installed study's data stages need for these params (None: no study sizes its data, or
    the params file has none of its sections)."""
    for needs in study_hooks(params, "data_needs"):
        return needs(params, machine, lambda names: stages_up_to_date(params, names))
    return None


def estimate(params: Params, machine: Machine, needs: DataNeeds | None = None) -> Budget:
    """Disk and memory a run of these params needs here, and what is free."""
    needs = needs or data_needs(params, machine)
    if needs is None:
        raise ValueError("no study sizes its data for these params")
    root = repo_root()
    outputs = sum(size for _, _, size in needs.outputs)
    data_fs = _existing(root / "data")
    cache_dir, link_types = dvc_cache()
    cache_fs = _existing(cache_dir)
    same = os.stat(data_fs).st_dev == os.stat(cache_fs).st_dev
    # The workspace holds a copy of each output unless DVC may only link
    # (reflink, symlink, hardlink: the bytes are stored once, in the cache).
    copies = 2 if same and "copy" in link_types else 1
    current = sum(_size_of(root / path) for _, path, _ in needs.outputs)
    disk_free = shutil.disk_usage(data_fs).free + current
    # Training sets no peak: the ranks of a node map one copy of each split
    # (virgo_exps.train.data.ImageDataset), in /dev/shm when it fits there
    # and in memory, else in a file in TMPDIR read through the page cache, so
    # a split larger than memory is read from disk, not refused, and the memory
    # it takes does not grow with train.procs_per_node.
    memory, what = max(needs.peaks) if needs.peaks else (0, "nothing")
    return Budget(
        outputs=tuple((label, size) for label, _, size in needs.outputs),
        subject=needs.subject,
        lower=needs.lower,
        disk=copies * outputs,
        disk_free=disk_free,
        copies=copies,
        cache_disk=0 if same else outputs,
        cache_free=0 if same else shutil.disk_usage(cache_fs).free,
        memory=memory,
        memory_what=what,
        memory_free=psutil.virtual_memory().available,
    )


def check_budget(params: Params, budget: Budget) -> None:
    """Refuse params whose outputs do not fit the disk, or whose stages do not fit in memory."""
    subject, lower = budget.subject, budget.lower
    sizes = " + ".join(f"{label} {_fmt(size)}" for label, size in budget.outputs)
    if budget.disk > budget.disk_free:
        where = ", once in data/ and once in DVC's cache" if budget.copies == 2 else ""
        raise ConfigError(
            f"{subject} need up to {_fmt(budget.disk)} on disk ({sizes}{where}) but "
            f"{_fmt(budget.disk_free)} are free on the file system of data/; {lower} or free space"
        )
    if budget.cache_disk > budget.cache_free:
        raise ConfigError(
            f"{subject} need up to {_fmt(budget.cache_disk)} in DVC's cache ({sizes}) but "
            f"{_fmt(budget.cache_free)} are free on its file system ({dvc_cache()[0]}); {lower} or free space"
        )
    if budget.memory > budget.memory_free:
        raise ConfigError(
            f"{subject} need ~{_fmt(budget.memory)} of memory ({budget.memory_what}) but "
            f"{_fmt(budget.memory_free)} are available on this machine; {lower}"
        )


# -- all together ----------------------------------------------------------------


def check(
    params_path: str | os.PathLike = "params.yaml", machine: Machine | None = None
) -> tuple[Params, Machine, Budget | None]:
    """Every check, in order; raise ConfigError (one line) at the first problem.

    The disk and memory budget is the study's (:func:`data_needs`; None when no study sizes its data)."""
    params = load_params(params_path)
    check_stage_params(params_path)
    machine = machine or load_machine()
    check_tracking_uri()
    check_tracking_server()
    check_tracking_secret(machine)
    check_machine(params, machine)
    for study_check in study_hooks(params, "machine_check"):
        study_check(params, machine)
    needs = data_needs(params, machine)
    if needs is None:
        return params, machine, None
    budget = estimate(params, machine, needs)
    check_budget(params, budget)
    return params, machine, budget


# How long the first stage waits for the MLflow server to answer.
TRACKING_PROBE_S = 10.0


def check_tracking_server(uri: str | None = None) -> None:
    """An http(s) MLFLOW_TRACKING_URI answers (any HTTP status will do: it is a server); else the
    training would fail only after minutes of MLflow's own retries."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "") if uri is None else uri
    if urllib.parse.urlsplit(uri).scheme.lower() not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=TRACKING_PROBE_S):
            return
    except urllib.error.HTTPError:
        return  # it answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", exc)
        raise ConfigError(
            f"MLFLOW_TRACKING_URI: no MLflow server answers at {uri} ({why}); start it, correct the address, "
            "or unset MLFLOW_TRACKING_URI to log into the checkout's own store"
        ) from None


def check_stage_params(params_path: str | os.PathLike = "params.yaml") -> None:
    """Every param a stage of dvc.yaml (beside the params file) names is in the file.

    DVC finds a missing one only when it reaches that stage, after it has
    deleted the stage's outputs (an emptied params.yaml cost the data); here,
    in the first stage, nothing has been touched yet."""
    path = Path(params_path)
    dvc_yaml = path.parent / "dvc.yaml"
    if not dvc_yaml.is_file():
        return
    try:
        stages = (read_yaml(dvc_yaml, "pipeline file") or {}).get("stages") or {}
    except (ConfigError, AttributeError):
        return  # DVC itself reports a broken dvc.yaml
    raw = read_yaml(path)
    for stage, spec in stages.items():
        for entry in (spec or {}).get("params") or []:
            if isinstance(entry, str):
                wanted = [(entry, "params.yaml")]
            elif isinstance(entry, dict):
                wanted = [(k, str(f)) for f, keys in entry.items() for k in (keys or [])]
            else:
                continue
            for key, file in wanted:
                if Path(file).name != path.name:
                    continue
                node = raw
                for part in key.split("."):
                    node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
                if node is _MISSING:
                    raise ConfigError(
                        f"{key}: missing from {path}, and stage '{stage}' of dvc.yaml needs it; `git checkout "
                        f"{path}` restores the committed params (`virgo-exps params` lists every key)"
                    )


_MISSING = object()


def check_tracking_secret(machine: Machine) -> None:
    """No MLflow password in the environment of a SLURM job.

    sbatch hands the job the caller's environment, and Slurm keeps a copy of it
    with the job in its state files on the controller; MLflow's own credentials
    file keeps the password out of it and works the same on every node.
    """
    if machine.kind != "slurm":
        return
    for name in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        if os.environ.get(name):
            raise ConfigError(
                f"{name}: is set, and on SLURM machine '{machine.name}' Slurm would store it with the job's "
                "environment on the controller; put the credentials in ~/.mlflow/credentials (mode 600: "
                "[mlflow], mlflow_tracking_username = ..., mlflow_tracking_password = ...) and unset "
                f"{name}"
            )


def summary(params_path: str | os.PathLike, machine: Machine, budget: Budget | None) -> str:
    """The line ``virgo-exps check`` prints when everything passed."""
    if budget is None:
        return f"{params_path}: valid; machine: {machine.name} ({machine.kind})"
    return (
        f"{params_path}: valid; machine: {machine.name} ({machine.kind}); data needs up to "
        f"{_fmt(budget.disk)} on disk ({_fmt(budget.disk_free)} free), ~{_fmt(budget.memory)} of memory "
        f"({_fmt(budget.memory_free)} available)"
    )


def recovery_hint(params_path: str | os.PathLike = "params.yaml") -> str | None:
    """How to get the committed params back, when the file on disk differs from them.

    ``dvc exp run -S key=value`` writes the value into params.yaml before any
    stage runs, so a refused value stays in the file. Compared by content
    with the committed file; None outside a git checkout, in DVC's temporary
    workspaces (the user's file was not touched) or when equal.
    """
    path = Path(params_path)
    if main_checkout() != repo_root():
        return None
    folder = path.parent if str(path.parent) else Path(".")
    try:
        proc = git(folder, "show", f"HEAD:./{path.name}", check=False, text=False, timeout=20)
        current = path.read_bytes()
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0 or proc.stdout == current:
        return None
    return (
        f"{path} differs from the last commit (`dvc exp run -S` writes its values there before any stage "
        f"runs): `git checkout {path}` restores the committed values"
    )


def refuse(exc: ConfigError, params_path: str | os.PathLike = "params.yaml") -> int:
    """Print the refusal (one ``error:`` line, then how to get back) to stderr; return the exit code 2."""
    print(f"error: {exc}", file=sys.stderr)
    hint = recovery_hint(params_path)
    if hint:
        print(hint, file=sys.stderr)
    sys.stderr.flush()
    return 2


__all__ = [
    "Budget",
    "check",
    "check_budget",
    "check_machine",
    "estimate",
    "recovery_hint",
    "refuse",
    "summary",
    "dvc_cache",
]
