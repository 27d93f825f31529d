"""The distribution strategies in one table: the class that runs each, and how it is started.

A row says, for one value of ``train.strategy``:

- ``strategy_class``: the :class:`~virgo_exps.train.strategies.base.Strategy`
  subclass, as ``module:Class`` (imported only when that strategy runs, so a
  missing optional package matters only to those who ask for it);
- ``local``: how the launcher starts the processes on this machine: ``plain``
  (the worker itself, one process), ``torchrun`` (``torch.distributed.run``) or
  ``horovodrun``;
- ``srun``: how the job step starts them under Slurm: ``plain`` (one task),
  ``torchrun`` (one per node, holding that node's processes) or ``hvd_slurm``
  (one Slurm task per process, :mod:`virgo_exps.launch.hvd_slurm`);
- ``deepspeed_runner``: DeepSpeed's own runner replaces torchrun on profiles
  with ``deepspeed_launcher: deepspeed``;
- ``needs_horovod``: the strategy needs a Horovod build (``make horovod``);
- ``multi_node``: whether it may span several nodes.

Torch-free. The names are :data:`virgo_exps.config.STRATEGIES` (where ``train.strategy`` is validated);
this table holds a row for each of them and no other (checked when it is imported).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from virgo_exps.config import STRATEGIES, ConfigError


@dataclass(frozen=True)
class StrategyRow:
    name: str
    strategy_class: str
    local: str
    srun: str
    deepspeed_runner: bool = False
    needs_horovod: bool = False
    multi_node: bool = True
    package: str | None = None  # the Python package it needs beyond torch (an extra of pyproject.toml)

    @property
    def task_per_process(self) -> bool:
        """One Slurm task per training process (else one task per node, or a single one)."""
        return self.srun == "hvd_slurm"

    def load(self) -> type:
        module, _, name = self.strategy_class.partition(":")
        return getattr(importlib.import_module(module), name)


_PACKAGE = "virgo_exps.train.strategies"
STRATEGY_TABLE: dict[str, StrategyRow] = {
    row.name: row
    for row in (
        StrategyRow("single", f"{_PACKAGE}.single:SingleStrategy", local="plain", srun="plain", multi_node=False),
        StrategyRow("ddp", f"{_PACKAGE}.ddp:DDPStrategy", local="torchrun", srun="torchrun"),
        StrategyRow(
            "deepspeed",
            f"{_PACKAGE}.deepspeed:DeepSpeedStrategy",
            "torchrun",
            "torchrun",
            deepspeed_runner=True,
            package="deepspeed",
        ),
        StrategyRow(
            "horovod",
            f"{_PACKAGE}.horovod:HorovodStrategy",
            "horovodrun",
            "hvd_slurm",
            needs_horovod=True,
            package="horovod",
        ),
    )
}
STRATEGY_NAMES = tuple(STRATEGY_TABLE)
if STRATEGY_NAMES != STRATEGIES:  # one owner of the names: a row without a name, or a name without a row
    raise RuntimeError(f"strategy table {STRATEGY_NAMES} differs from virgo_exps.config.STRATEGIES {STRATEGIES}")

HOROVOD_MISSING = (
    "train.strategy: 'horovod' needs Horovod, which is not built in this environment; "
    "run `make horovod` (a few minutes) or choose 'ddp' or 'deepspeed'"
)


def strategy_row(name: str) -> StrategyRow:
    """The row of ``name``; a ConfigError for an unknown strategy."""
    if name not in STRATEGY_TABLE:
        raise ConfigError(f"train.strategy: unknown strategy {name!r}")
    return STRATEGY_TABLE[name]


def horovodrun_of(python: str) -> Path:
    """``horovodrun`` of the environment ``python`` belongs to."""
    return Path(python).parent / "horovodrun"


def horovod_built(python: str) -> bool:
    """Horovod is built in the environment of ``python`` (this interpreter's): its package
    imports and ``horovodrun`` sits beside the interpreter, as ``make horovod`` leaves them."""
    return horovodrun_of(python).exists() and importlib.util.find_spec("horovod") is not None


def check_software(row: StrategyRow, python: str) -> None:
    """Refuse a strategy whose software this environment lacks (one ConfigError line)."""
    if row.needs_horovod and not horovod_built(python):
        raise ConfigError(HOROVOD_MISSING)
    if row.package and importlib.util.find_spec(row.package) is None:
        raise ConfigError(
            f"train.strategy: {row.name!r} needs the Python package '{row.package}', which is not installed in "
            f"this environment ({Path(python).parent.parent}); install it (`pip install -e .`) or choose another "
            "strategy"
        )
