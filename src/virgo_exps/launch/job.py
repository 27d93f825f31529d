"""What a stage asks of the launcher: one typed job spec for every stage.

A stage builds a :class:`JobSpec` and hands it to
:func:`virgo_exps.launch.launcher.launch`, which runs it on the active machine
(directly, torchrun, horovodrun, or a SLURM job). Nothing else is passed: the
launcher reads neither the stage's params nor its command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virgo_exps.launch.protocol import NO_FILES, WorkerFiles
from virgo_exps.launch.strategy_table import StrategyRow, strategy_row

if TYPE_CHECKING:
    from virgo_exps.config import TrainConfig


@dataclass(frozen=True)
class JobSpec:
    """One piece of work of a stage.

    ``argv`` is the worker (a python script and its arguments), run by each
    process. ``strategy``, ``nodes`` and ``procs_per_node`` say how many
    processes and how they start (see :mod:`virgo_exps.launch.strategy_table`).
    ``array`` > 0 makes it a job array of that many single-process tasks, each
    running ``argv`` with ``--part <task> --parts <array> --workers <cpus>``.
    ``max_requeues``: time-outs and preemptions a job survives by requeueing.
    ``files``: what the worker reads and writes that the launcher must know.
    """

    stage: str
    argv: tuple[str, ...]
    strategy: str = "single"
    nodes: int = 1
    procs_per_node: int = 1
    array: int = 0
    max_requeues: int = 0
    files: WorkerFiles = NO_FILES

    def __post_init__(self) -> None:
        object.__setattr__(self, "argv", tuple(self.argv))
        if self.array < 0:
            raise ValueError(f"JobSpec.array: {self.array}; expected 0 (no array) or a number of tasks")
        if self.array and (self.nodes, self.procs_per_node, self.strategy) != (1, 1, "single"):
            raise ValueError("JobSpec: the tasks of a job array are single processes on one node")

    @property
    def row(self) -> StrategyRow:
        """The strategy's row of the table (how its processes start), resolved here for every reader."""
        return strategy_row(self.strategy)

    @classmethod
    def training(cls, stage: str, argv, cfg: TrainConfig, files: WorkerFiles = NO_FILES) -> JobSpec:
        """The processes of a training as ``cfg`` (``params.train``) asks for them."""
        return cls(
            stage=stage,
            argv=tuple(argv),
            strategy=cfg.strategy,
            nodes=cfg.nodes,
            procs_per_node=cfg.procs_per_node,
            max_requeues=cfg.max_requeues,
            files=files,
        )

    @classmethod
    def job_array(cls, stage: str, argv, tasks: int, max_requeues: int = 0, files: WorkerFiles = NO_FILES) -> JobSpec:
        """``tasks`` independent single-process tasks (the work split by ``--part``)."""
        if tasks < 1:
            raise ValueError(f"JobSpec.job_array: {tasks} tasks; expected at least 1")
        return cls(stage=stage, argv=tuple(argv), array=tasks, max_requeues=max_requeues, files=files)


def dry_run_requested() -> bool:
    """``VIRGO_DRY_RUN`` set: show what would be started or submitted, start nothing."""
    return os.environ.get("VIRGO_DRY_RUN", "").strip().lower() not in ("", "0", "false", "no")
