"""Machine profiles: ``machines/<name>/machine.yaml`` and its scripts.

A profile says how commands run on one machine: directly (``kind: local``) or
through SLURM (``kind: slurm``, with partition, account, GPUs, time limit and
a setup script sourced at the start of every job). Adding a cluster means
adding a folder; no Python changes.

Which profile is in use is *not* a param, so switching machines does not
invalidate DVC's cache: it comes from ``VIRGO_MACHINE``, else from the
git-ignored file ``machines/active`` in the main checkout, else ``local``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from virgo_exps.config import ConfigError
from virgo_exps.paths import main_checkout, repo_root

KINDS = ("local", "slurm")


@dataclass(frozen=True)
class Machine:
    name: str
    kind: str
    path: Path
    description: str = ""
    max_procs: int = 0  # local: processes allowed at once (0: number of cores)
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    time: str = "01:00:00"
    signal_seconds: int = 60  # SIGUSR1 this long before the time limit
    setup: str | None = None  # script sourced at job start, relative to the profile folder
    sbatch_extra: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    gpu_option: str = "gpus-per-node"  # how GPUs are requested: --gpus-per-node=N or --gres=gpu:N
    srun_extra: tuple[str, ...] = ()  # options added to every srun of a job (e.g. --cpu-bind=none)
    slurm_conf: str | None = None  # slurm.conf of this cluster, when it is not the system's default
    deepspeed_launcher: str = "torchrun"  # how DeepSpeed runs start: torchrun, or DeepSpeed's own `deepspeed`
    generate_tasks: int = 0  # slurm: the generate stage as a job array of this many tasks (0: on the login node)

    def slurm_conf_path(self) -> Path | None:
        """``slurm_conf`` resolved: ``~`` and ``$VARS`` expanded, relative paths from the main checkout."""
        if not self.slurm_conf:
            return None
        path = Path(os.path.expandvars(os.path.expanduser(self.slurm_conf)))
        return path if path.is_absolute() else main_checkout() / path

    @property
    def setup_script(self) -> Path | None:
        return (self.path / self.setup) if self.setup else None


_FIELDS = {
    "description": str,
    "kind": str,
    "max_procs": int,
    "partition": (str, type(None)),
    "account": (str, type(None)),
    "gpus_per_node": int,
    "cpus_per_task": int,
    "mem": (str, type(None)),
    "time": str,
    "signal_seconds": int,
    "setup": (str, type(None)),
    "sbatch_extra": list,
    "env": dict,
    "gpu_option": str,
    "srun_extra": list,
    "slurm_conf": (str, type(None)),
    "generate_tasks": int,
    "deepspeed_launcher": str,
}
DEEPSPEED_LAUNCHERS = ("torchrun", "deepspeed")
GPU_OPTIONS = ("gpus-per-node", "gres")


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


def load_machine(name: str | None = None) -> Machine:
    name = name or active_machine_name()
    path = machines_dir() / name
    spec_file = path / "machine.yaml"
    if not spec_file.exists():
        shown = spec_file.relative_to(repo_root()) if spec_file.is_relative_to(repo_root()) else spec_file
        raise ConfigError(
            f"machine {name!r}: no {shown}; "
            f"available machines: {', '.join(available()) or 'none'} (set VIRGO_MACHINE or machines/active)"
        )
    raw = yaml.safe_load(spec_file.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{spec_file}: expected a mapping")
    for key, value in raw.items():
        if key not in _FIELDS:
            raise ConfigError(f"{spec_file}: unknown key {key!r}; allowed: {', '.join(sorted(_FIELDS))}")
        if not isinstance(value, _FIELDS[key]):
            hint = (
                ' (quote it, e.g. "2:00:00": YAML reads 2:00:00 unquoted as the number 7200)' if key == "time" else ""
            )
            raise ConfigError(f"{spec_file}: {key}: wrong type {type(value).__name__}{hint}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{spec_file}: kind: {kind!r}; expected one of {', '.join(KINDS)}")
    if raw.get("gpu_option", "gpus-per-node") not in GPU_OPTIONS:
        raise ConfigError(f"{spec_file}: gpu_option: {raw['gpu_option']!r}; expected one of {', '.join(GPU_OPTIONS)}")
    for key in ("generate_tasks", "gpus_per_node", "max_procs", "signal_seconds"):
        if isinstance(raw.get(key), bool) or raw.get(key, 0) < 0:
            raise ConfigError(f"{spec_file}: {key}: {raw[key]!r}; expected a whole number >= 0")
    if raw.get("cpus_per_task", 1) < 1 or isinstance(raw.get("cpus_per_task"), bool):
        raise ConfigError(f"{spec_file}: cpus_per_task: {raw['cpus_per_task']!r}; expected a whole number >= 1")
    if raw.get("deepspeed_launcher", "torchrun") not in DEEPSPEED_LAUNCHERS:
        raise ConfigError(
            f"{spec_file}: deepspeed_launcher: {raw['deepspeed_launcher']!r}; "
            f"expected one of {', '.join(DEEPSPEED_LAUNCHERS)}"
        )
    raw["sbatch_extra"] = tuple(str(x) for x in raw.get("sbatch_extra", []))
    raw["srun_extra"] = tuple(str(x) for x in raw.get("srun_extra", []))
    raw["env"] = {str(k): str(v) for k, v in (raw.get("env") or {}).items()}
    machine = Machine(name=name, path=path, **raw)
    if machine.setup_script is not None and not machine.setup_script.exists():
        raise ConfigError(f"{spec_file}: setup: {machine.setup} does not exist in {path}")
    return machine
