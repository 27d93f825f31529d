"""``version.lock``: the exact environment that produced a result.

It holds only what can change results (Python, the versions of the packages
`make run` installs, plus Horovod when train.strategy is horovod, the CUDA,
cuDNN and NCCL that torch was built with) and nothing that changes between
identical runs (no timestamps, no host names), so an unchanged environment
gives a byte-identical file and DVC reruns nothing downstream.

The machine profile is validated here but not recorded: switching between
machines must not invalidate DVC's cache. A container image the stages run in
is recorded (``image``: its digest): another image is another environment,
and DVC reruns what depends on it. The trainer records the machine,
the hosts and the devices a run used in its metrics and in MLflow, where they
are known (the login node that runs this stage may have no GPU at all).
"""

from __future__ import annotations

import importlib.util
import platform
import sys
from importlib import metadata
from pathlib import Path

import yaml

from virgo_exps import container
from virgo_exps.machines import load_machine

# What `make run` installs (pyproject.toml, pinned) and the results depend on.
PACKAGES = ("torch", "deepspeed", "dvc", "mlflow", "zarr", "numpy", "scipy", "pandas", "virgo-exps")
# Installed only for the strategy that uses it (`make run` builds Horovod only
# when train.strategy is horovod): recorded only then, so that a fresh clone and
# `make run` on another machine write the same version.lock.
STRATEGY_PACKAGES = {"horovod": ("horovod",)}


def _strategy_from(params_path: str | Path) -> str | None:
    """``train.strategy`` of a params file, or None when there is none to read
    (the environment stage has validated the file before)."""
    try:
        params = yaml.safe_load(Path(params_path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    train = params.get("train") if isinstance(params, dict) else None
    return train.get("strategy") if isinstance(train, dict) else None


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _torch_gpu_build() -> str | None:
    """``torch.version.cuda`` (or ``.hip`` for a ROCm build) read from torch's ``version.py`` without
    importing torch (about a second on every run of this stage); a build that cannot be read that way
    is imported."""
    spec = importlib.util.find_spec("torch")
    where = list(spec.submodule_search_locations or []) if spec else []
    try:
        version_spec = importlib.util.spec_from_file_location("_virgo_torch_version", Path(where[0]) / "version.py")
        module = importlib.util.module_from_spec(version_spec)
        version_spec.loader.exec_module(module)
        return module.cuda or getattr(module, "hip", None)
    except (IndexError, OSError, AttributeError, ImportError):
        import torch

        return torch.version.cuda or getattr(torch.version, "hip", None)


def _torch_build() -> dict:
    """CUDA, cuDNN and NCCL that torch was built with (on ROCm: MIOpen and RCCL, as torch reports them).
    A CPU build has none of them, so torch itself is only imported for a GPU build."""
    if not _torch_gpu_build():
        return {"cuda": "none", "cudnn": "none", "nccl": "none"}
    import torch

    build = {
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
        "nccl": "none",
    }
    try:
        build["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # a CUDA build on a node without a driver
        pass
    return build


def collect(
    machine_name: str | None = None, strategy: str | None = None, params_path: str | Path = "params.yaml"
) -> dict:
    """The environment record. ``strategy`` (default: ``train.strategy`` of
    ``params_path``) adds the packages only that strategy uses."""
    machine = load_machine(machine_name)  # a broken profile stops the pipeline before any stage runs
    if strategy is None:
        strategy = _strategy_from(params_path)
    names = PACKAGES + STRATEGY_PACKAGES.get(strategy or "", ())
    info: dict = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": f"{platform.system()}-{platform.machine()}",
        "packages": {name: _version(name) for name in names},
        "torch_build": _torch_build(),
    }
    # The image the stages run in: the one this process runs in, else the one the profile's job steps use.
    # Without one the key is left out, so an environment outside any image writes the file it always did.
    image = container.current()
    if image is None and machine.container is not None:
        image = container.check(machine.container)
    if image is not None:
        info["image"] = image
    return info


def render(info: dict) -> str:
    header = "# Written by the 'environment' stage; do not edit. Only what changes results.\n"
    return header + yaml.safe_dump(info, sort_keys=True, default_flow_style=False)
