"""Process and file helpers: running commands, reading ``/proc`` (a process's stat, children, environment,
command line; the machine's memory), killing processes by pid and start time, reaping our children, the
file locks (one per workdir, one for system-wide edits), JSON files and log tails."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import SlurmSimError


def _log(msg: str) -> None:
    if os.environ.get("VIRGO_SLURMSIM_VERBOSE"):
        print(f"[slurmsim] {msg}", file=sys.stderr, flush=True)


def _run(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    _log("$ " + shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise SlurmSimError(
            f"command failed (rc={proc.returncode}): {shlex.join(cmd)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process, None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] is field 3 (state); field 4 ppid; field 22 starttime
    return rest[0], int(rest[1]), int(rest[19])


def _starttime(pid: int) -> int | None:
    st = _proc_stat(pid)
    return None if st is None else st[2]


def _alive(pid: int | None, starttime: int | None = None) -> bool:
    """True if pid runs (not a zombie) and, if given, started at starttime."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return starttime is None or st[2] == starttime


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None:
            kids.setdefault(st[1], []).append(pid)
    return kids


def _descendants(roots: Iterable[int]) -> set[int]:
    kids = _children_map()
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        for child in kids.get(pid, []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _protected_pids() -> set[int]:
    """This process and its ancestors: never signalled."""
    out = set()
    pid = os.getpid()
    while pid > 1:
        out.add(pid)
        st = _proc_stat(pid)
        if st is None:
            break
        pid = st[1]
    out.add(1)
    return out


def _kill_pids(
    pids: Iterable[tuple[int, int | None]], *, grace: float = 5.0, first_signal: int = signal.SIGTERM
) -> list[int]:
    """Signal (pid, starttime) pairs, escalate to SIGKILL after ``grace`` s.

    Returns the pids that were still alive at the end (should be empty).
    """
    protected = _protected_pids()
    targets = {pid: st for pid, st in pids if pid and pid not in protected}
    for pid, st in list(targets.items()):
        if not _alive(pid, st):
            targets.pop(pid)
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, first_signal)
    deadline = time.monotonic() + grace
    while targets and time.monotonic() < deadline:
        _reap_children()
        targets = {p: s for p, s in targets.items() if _alive(p, s)}
        if targets:
            time.sleep(0.1)
    for pid, st in targets.items():
        if _alive(pid, st):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while targets and time.monotonic() < deadline:
        _reap_children()
        targets = {p: s for p, s in targets.items() if _alive(p, s)}
        if targets:
            time.sleep(0.1)
    return sorted(targets)


def _reap_children() -> None:
    """Reap our own exited children (daemons we started with Popen)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path.name}: not found)"
    return "\n".join(text[-lines:]) or f"({path.name}: empty)"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _global_lock() -> contextlib.AbstractContextManager[None]:
    """Serialises system-wide edits (subnets, ports, /etc/hosts, munged)."""
    return _flock(Path(tempfile.gettempdir()) / "virgo-slurmsim.lock")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _mem_total_mb() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096
