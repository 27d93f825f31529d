"""Entry points of the stage scripts and the training workers: error reporting and exit codes.

:func:`stage_main` runs a stage body: the stage ends with its starter (DVC), its output is kept in the
stage's log, a configuration error is one line and exit 2, a damaged input one line and exit 3.
:func:`worker_main` does the same for a training process and names its rank when it crashes.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections.abc import Callable

from virgo_exps import container, stagelog
from virgo_exps.config import ConfigError, DamagedInputError
from virgo_exps.launch.lifetime import bind_stage_to_starter
from virgo_exps.machines import load_machine


@contextlib.contextmanager
def known_errors():
    """A configuration error exits 2, a damaged input 3, each with one line naming what and the fix."""
    try:
        yield
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except DamagedInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)


def enter_image() -> None:
    """On a local machine whose profile names a container image, start this stage again inside it
    (:func:`virgo_exps.container.enter`); a SLURM machine runs its job steps inside instead."""
    machine = load_machine()
    if machine.container is not None and machine.kind == "local":
        container.enter(machine.container)


def stage_main(run: Callable[[], int | None], log: str | None = None, image: bool = True) -> None:
    """Run a stage body; turn configuration errors into one clear line and exit 2.

    The stage ends, with every process it started, when the process that
    started it (DVC) ends or on SIGINT/SIGTERM/SIGHUP (see
    :func:`virgo_exps.launch.lifetime.bind_stage_to_starter`). With ``log``
    (the stage's name), its output is also kept in the stage's log
    (:mod:`virgo_exps.stagelog`). With ``image`` the stage runs inside the machine's container image,
    when its profile names one (:func:`enter_image`).
    """
    if image:
        with known_errors():
            enter_image()
    bind_stage_to_starter()
    if log:
        stagelog.start(log)
    try:
        with known_errors():
            code = run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def worker_main(run: Callable[[], int | None], rank: Callable[[], int]) -> None:
    """Like :func:`stage_main` for a training process: a crash names the rank."""
    try:
        with known_errors():
            code = run()
    except SystemExit:
        raise
    except BaseException as exc:
        traceback.print_exc()
        print(f"error: training process rank {rank()} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    sys.exit(code or 0)
