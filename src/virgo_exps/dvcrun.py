"""Running ``dvc`` from Python: which executable, with which environment, and what a failure says.

- :func:`executable`: the ``dvc`` installed beside the running Python (the
  project's venv), else the one on ``PATH``; a venv's ``bin/`` is often not on
  ``PATH`` when a tool is started by its full path.
- :func:`env`: the caller's environment with the running Python's folder first
  on ``PATH`` (stage commands say ``python``: it is the venv's, as after
  ``source .venv/bin/activate``), and without the variables a parent ``dvc``
  sets for the stage it runs (``DVC_ROOT``, ``DVC_STAGE``, ``DVC_EXP_NAME``,
  ``DVC_EXP_BASELINE_REV``). A ``dvc`` started from inside a stage would
  otherwise hand them on to its own stages: ``DVC_ROOT`` to the wrong repository
  and the outer experiment's name to the inner one's jobs and runs.
- :func:`run`: captured output, a timeout, and one line naming the command and
  DVC's own error line when it fails. :func:`stream`: the output goes to the
  terminal, for long commands the user watches (``dvc exp run``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# What `dvc repro` / `dvc exp run` set for the commands of their stages.
RUN_SCOPED = ("DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
TIMEOUT_S = 600.0


class DvcError(RuntimeError):
    """A ``dvc`` command could not run or failed; the message is one line."""


def executable() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else (shutil.which("dvc") or "dvc")


def env(base: dict[str, str] | None = None) -> dict[str, str]:
    source = os.environ if base is None else base
    out = {k: v for k, v in source.items() if k not in RUN_SCOPED}
    out["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), source.get("PATH")) if p)
    return out


def describe(args: list[str]) -> str:
    return "`dvc " + " ".join(str(a) for a in args) + "`"


def message(proc: subprocess.CompletedProcess) -> str:
    """DVC's most telling line of a failed command: its ``ERROR:`` line, else the last line it printed."""
    lines = [ln.strip() for ln in f"{proc.stderr or ''}\n{proc.stdout or ''}".splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    if errors:
        return errors[0]
    return lines[-1] if lines else "(no message)"


def run(
    args: list[str],
    cwd: str | os.PathLike,
    *,
    check: bool = True,
    timeout: float | None = TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``cwd`` with its output captured as text.

    Raises :class:`DvcError` when dvc cannot be started or does not finish in
    ``timeout`` seconds, and, with ``check``, when it exits non-zero.
    """
    cmd = [executable(), *(str(a) for a in args)]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise DvcError(f"{describe(args)} did not finish within {timeout:g} s in {cwd}") from None
    except OSError as exc:
        raise DvcError(f"cannot run dvc ({cmd[0]}): {exc.strerror or exc}") from None
    if check and proc.returncode != 0:
        raise DvcError(f"{describe(args)} failed in {cwd} (exit code {proc.returncode}): {message(proc)}")
    return proc


def stream(
    args: list[str], cwd: str | os.PathLike, *, echo: bool = True, base_env: dict[str, str] | None = None
) -> int:
    """``dvc <args>`` in ``cwd`` with its output on ours (no timeout); its exit code.

    ``echo`` first prints the command as ``$ dvc ...``; ``base_env``: the environment to start from
    (default: ours).
    """
    if echo:
        print("$ dvc " + " ".join(str(a) for a in args), flush=True)
    cmd = [executable(), *(str(a) for a in args)]
    try:
        return subprocess.call(cmd, cwd=cwd, env=env(base_env))
    except OSError as exc:
        raise DvcError(f"cannot run dvc ({cmd[0]}): {exc.strerror or exc}") from None


def start(args: list[str], cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """``dvc <args>`` started with its output (stdout and stderr as one stream of text lines) for the
    caller to read as it comes; :class:`DvcError` when dvc cannot be started."""
    cmd = [executable(), *(str(a) for a in args)]
    try:
        return subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env()
        )
    except OSError as exc:
        raise DvcError(f"cannot run dvc ({cmd[0]}): {exc.strerror or exc}") from None
