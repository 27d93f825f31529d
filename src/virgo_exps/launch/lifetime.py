"""A stage lives only as long as the process that started it: process lifetime on Linux.

:func:`bind_stage_to_starter` makes a stage process end, with everything it started, when DVC (or the
shell that started it) ends: signal handlers that stop every descendant, ``prctl(PR_SET_PDEATHSIG)``,
and a watching thread where a shell stands between DVC and the stage. :func:`end_processes` stops
processes (SIGTERM, then SIGKILL after a grace period); :func:`descendants` finds them. Every read of
``/proc/<pid>/stat`` goes through :func:`proc_stat`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_GRACE_S = 5.0  # a process asked to stop (SIGTERM) is killed after this long
TRAIN_STOP_GRACE_S = 30.0  # ... a training, which first finishes its step and writes its snapshot
_starter: int | None = None  # pid of the process that started this stage


def _prctl():
    """libc's ``prctl``, or None (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``signum`` to this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``).

    False where the kernel cannot do it (not Linux). The request holds across
    ``exec`` and is not inherited by children: each process asks for itself.
    """
    prctl = _prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0


def dies_with_parent_hook():
    """A ``preexec_fn`` that only calls an already resolved ``prctl`` (no import, no lock after fork)."""
    prctl = _prctl()
    if prctl is None:
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


@dataclass(frozen=True)
class ProcStat:
    comm: str  # the command name
    state: str  # R, S, D, Z (zombie), X (dead), ...
    ppid: int
    starttime: int  # clock ticks after boot: with the pid, names one process


def proc_stat(pid: int | str) -> ProcStat | None:
    """``/proc/<pid>/stat`` of ``pid``, or None (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")].decode(errors="replace")
    return ProcStat(comm, fields[0].decode(), int(fields[1]), int(fields[19]))


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first level first), read from /proc; [] elsewhere."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        st = proc_stat(entry) if entry.isdigit() else None
        if st is not None:
            children.setdefault(st.ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not); where /proc does not say, whether it can be signalled."""
    st = proc_stat(pid)
    if st is not None:
        return st.state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_processes(pids: list[int], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each process, then SIGKILL whatever is still there after ``grace`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _starter_ended(signum: int) -> bool:
    """Whether ``signum`` came because the stage's starter ended (for the message only)."""
    if _starter is None or signum != signal.SIGTERM:
        return False
    # The kernel signals as soon as the starting thread exits; the rest of the process may
    # take a moment longer to go.
    deadline = time.monotonic() + 0.5
    while True:
        if os.getppid() != _starter or not alive(_starter):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def stop_reason(signum: int) -> str:
    if _starter_ended(signum):
        return f"the process that started this stage (pid {_starter}) ended"
    return f"{signal.Signals(signum).name} received"


def _stop_stage(signum, frame) -> None:
    """Signal handler of a stage process: end everything it started, then exit 128 + signal."""
    why = stop_reason(signum)
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: reentrant write
        print(f"stage: {why}; stopping its processes", file=sys.stderr, flush=True)
    me = os.getpid()
    for _ in range(3):  # a process may start another while the first ones end
        pids = descendants(me)
        if not pids:
            break
        end_processes(pids)
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: reentrant write
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(128 + signum)


def bind_stage_to_starter() -> None:
    """Make this stage process end, with everything it started, when its starter ends.

    SIGINT, SIGTERM and SIGHUP (those not ignored already, as under ``nohup``)
    end every descendant (SIGTERM, then SIGKILL after :data:`STOP_GRACE_S`) and
    exit 128 + signal. While the launcher runs a training, its own handlers
    take over (forward to the training processes, or cancel the SLURM job) and
    restore these after.

    Run by DVC (``DVC_STAGE`` is set), the stage also gets SIGTERM when DVC
    ends, even by SIGKILL: DVC runs ``$SHELL -c <cmd>``; bash and zsh replace
    themselves by the command, so DVC is the parent and the kernel sends the
    signal (``prctl(PR_SET_PDEATHSIG)``); a shell that stays in between (dash,
    tcsh) is looked through: a thread watches DVC instead.
    """
    global _starter
    for s in STOP_SIGNALS:
        with contextlib.suppress(ValueError):  # not in the main thread
            if signal.getsignal(s) != signal.SIG_IGN:
                signal.signal(s, _stop_stage)
    if not os.environ.get("DVC_STAGE"):
        return
    _starter = os.getppid()
    parent = proc_stat(_starter)
    if parent is not None and parent.state not in ("Z", "X") and parent.comm in SHELLS and parent.ppid > 1:
        _starter = parent.ppid
        watched = proc_stat(_starter)
        if watched is not None and watched.state not in ("Z", "X"):
            threading.Thread(
                target=_watch_starter, args=(_starter, watched.starttime), daemon=True, name="virgo-starter-watch"
            ).start()
        return
    if die_with_parent(signal.SIGTERM) and _orphaned():
        # the starter ended before the kernel watched it: nobody waits for this stage
        os.kill(os.getpid(), signal.SIGTERM)


SHELLS = frozenset({"sh", "dash", "ash", "bash", "zsh", "ksh", "mksh", "csh", "tcsh", "fish"})
WATCH_S = 0.5  # how often the thread looks at a starter behind a shell


def _watch_starter(pid: int, started: int) -> None:
    while True:
        time.sleep(WATCH_S)
        now = proc_stat(pid)
        if now is None or now.state in ("Z", "X") or now.starttime != started:  # ended (or its pid reused)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _orphaned() -> bool:
    """Whether the starter already ended before :func:`die_with_parent` took effect."""
    if os.getppid() != _starter:
        return True
    # Ended even before Python ran this code: reparented to init, and the process group
    # the starter led (DVC run from a shell leads its own) is gone. DVC running as the
    # container's process 1 keeps its group, so it is not taken for dead.
    pgid = os.getpgid(0)
    return _starter == 1 and pgid not in (1, os.getpid()) and not alive(pgid)
