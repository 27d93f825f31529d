"""Machine profiles: ``machines/<name>/machine.yaml`` and its scripts.

A profile says how commands run on one machine: directly (``kind: local``) or
through SLURM (``kind: slurm``, with partition, account, GPUs, time limit and
a setup script sourced at the start of every job), and optionally inside a
container image (``container:``, see :mod:`virgo_exps.container`). Adding a cluster means
adding a folder; no Python changes.

Which profile is in use is *not* a param, so switching machines does not
invalidate DVC's cache: it comes from ``VIRGO_MACHINE``, else from the
git-ignored file ``machines/active`` in the main checkout, else ``local``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from virgo_exps import container as _container
from virgo_exps.config import REQUIRED, ConfigError, read_yaml, spec, validate
from virgo_exps.paths import main_checkout, repo_root

KINDS = ("local", "slurm")
DEEPSPEED_LAUNCHERS = ("torchrun", "deepspeed")
GPU_OPTIONS = ("gpus-per-node", "gres")


def _one_of(*options) -> dict:
    return {"check": lambda v: v in options, "allowed": "one of " + ", ".join(options)}


_WHOLE = {"check": lambda v: v >= 0, "allowed": "a whole number >= 0"}
_TIME_HINT = ' (quote it, e.g. "2:00:00": YAML reads 2:00:00 unquoted as the number 7200)'


@dataclass(frozen=True)
class Machine:
    """One profile: ``name`` and ``path`` come from its folder, every other field from its machine.yaml,
    checked by the same validator as params.yaml (:func:`virgo_exps.config.validate`)."""

    name: str
    path: Path
    kind: str = spec(REQUIRED, **_one_of(*KINDS), doc="run directly (local) or through SLURM")
    description: str = spec("", None, "a string", "what the machine is, in one line")
    max_procs: int = spec(0, **_WHOLE, doc="local: processes allowed at once (0: number of cores)")
    partition: str | None = spec(None, None, "a partition name or null (the default)", "SLURM partition")
    account: str | None = spec(None, None, "a budget name or null", "SLURM account")
    gpus_per_node: int = spec(0, **_WHOLE, doc="GPUs requested per node")
    cpus_per_task: int = spec(1, lambda v: v >= 1, "a whole number >= 1", "CPU cores per training process")
    mem: str | None = spec(None, None, 'a size such as "16G", or null', "memory per node")
    time: str = spec("01:00:00", None, 'a quoted time such as "02:00:00"', "time limit", hint=_TIME_HINT)
    signal_seconds: int = spec(60, **_WHOLE, doc="SIGUSR1 this long before the time limit")
    setup: str | None = spec(None, None, "a file of the profile folder, or null", "script sourced at job start")
    sbatch_extra: tuple[str, ...] = spec((), None, "a list of sbatch options", "more #SBATCH lines")
    env: dict[str, str] = spec({}, None, "a mapping of names to values", "variables exported in the job")
    gpu_option: str = spec("gpus-per-node", **_one_of(*GPU_OPTIONS), doc="--gpus-per-node=N or --gres=gpu:N")
    srun_extra: tuple[str, ...] = spec((), None, "a list of srun options", "options added to every srun")
    slurm_conf: str | None = spec(None, None, "a path or null", "slurm.conf of this cluster, when not the default")
    deepspeed_launcher: str = spec(
        "torchrun", **_one_of(*DEEPSPEED_LAUNCHERS), doc="how DeepSpeed runs start: torchrun or `deepspeed`"
    )
    data_tasks: int = spec(
        0, **_WHOLE, doc="slurm: a data stage that splits its work (Virgo: generate) as a job array of this many tasks"
    )
    stall_limit: int = spec(
        1800, **_WHOLE, doc="seconds a training rank may go without progress before the run ends (0: never)"
    )
    container: _container.Container | None = spec(
        None,
        None,
        "a mapping (runtime, image, bind, gpu) or null",
        "run every stage (local) or every srun step (slurm) inside this image; null: directly",
    )

    def slurm_conf_path(self) -> Path | None:
        """``slurm_conf`` resolved: ``~`` and ``$VARS`` expanded, relative paths from the main checkout."""
        if not self.slurm_conf:
            return None
        path = Path(os.path.expandvars(os.path.expanduser(self.slurm_conf)))
        return path if path.is_absolute() else main_checkout() / path

    @property
    def setup_script(self) -> Path | None:
        return (self.path / self.setup) if self.setup else None


def machines_dir() -> Path:
    return repo_root() / "machines"


def active_machine_name() -> str:
    name = os.environ.get("VIRGO_MACHINE")
    if name:
        return name.strip()
    marker = main_checkout() / "machines" / "active"
    if marker.exists():
        text = marker.read_text().strip()
        if text:
            return text
    return "local"


def available() -> list[str]:
    root = machines_dir()
    return sorted(p.name for p in root.iterdir() if (p / "machine.yaml").exists()) if root.exists() else []


# The profiles this process has read and checked, by file and its size and time: every caller (the first
# stage's checks, the launcher, version.lock, the sweep submit) gets the same one, read once.
_LOADED: dict[tuple[str, int, int], Machine] = {}


def load_machine(name: str | None = None) -> Machine:
    """The profile ``name`` (default: the active one), read and checked once per process (again only when
    its machine.yaml changes)."""
    name = name or active_machine_name()
    path = machines_dir() / name
    spec_file = path / "machine.yaml"
    try:
        st = spec_file.stat()
        key = (str(spec_file.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        key = None
    if key is not None and key in _LOADED:
        return _LOADED[key]
    shown = spec_file.relative_to(repo_root()) if spec_file.is_relative_to(repo_root()) else spec_file
    if not spec_file.exists():
        raise ConfigError(
            f"machine {name!r}: no {shown}; "
            f"available machines: {', '.join(available()) or 'none'} (set VIRGO_MACHINE or machines/active)"
        )
    raw = read_yaml(spec_file, "machine profile")
    if isinstance(raw, dict) and "generate_tasks" in raw:  # the key's earlier name
        raise ConfigError(f"{shown}: generate_tasks: now named data_tasks (the same meaning); rename the key")
    raw_container = raw.pop("container", None) if isinstance(raw, dict) else None
    values = validate(Machine, raw, str(shown), sep=": ", refusal="{key}: {value!r}; expected {allowed}")
    values["container"] = _container.parse(raw_container, str(shown))
    machine = Machine(name=name, path=path, **values)
    if machine.setup_script is not None and not machine.setup_script.exists():
        raise ConfigError(f"{shown}: setup: {machine.setup} does not exist in {path}; add it or set setup: null")
    if key is not None:
        _LOADED[key] = machine
    return machine
