"""``version.lock``: the exact environment that produced a result.

It holds only what can change results (Python, package versions, the CUDA,
cuDNN and NCCL that torch was built with) and nothing that changes between
identical runs (no timestamps, no host names), so an unchanged environment
gives a byte-identical file and DVC reruns nothing downstream.

The machine profile is validated here but not recorded: switching between
machines must not invalidate DVC's cache. The trainer records the machine,
the hosts and the devices a run used in its metrics and in MLflow, where they
are known (the login node that runs this stage may have no GPU at all).
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import yaml

from .machines import load_machine

PACKAGES = ("torch", "deepspeed", "horovod", "dvc", "mlflow", "zarr", "numpy", "scipy", "pandas", "virgo-exps")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect(machine_name: str | None = None) -> dict:
    import torch

    load_machine(machine_name)  # a broken profile stops the pipeline before any stage runs
    info: dict = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "platform": f"{platform.system()}-{platform.machine()}",
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_build": {
            "cuda": torch.version.cuda or "none",
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
            "nccl": "none",
        },
    }
    if torch.version.cuda:
        try:
            info["torch_build"]["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # a CUDA build on a node without a driver
            pass
    return info


def render(info: dict) -> str:
    header = "# Written by the 'environment' stage; do not edit. Only what changes results.\n"
    return header + yaml.safe_dump(info, sort_keys=True, default_flow_style=False)
