"""Following a submitted job: its log onto stderr, its state until final, cancel on a signal."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from virgo_exps.launch.console import ConsoleFilter
from virgo_exps.launch.protocol import EXIT_INTERRUPTED, log_announcement
from virgo_exps.launch.slurm.query import JobGone, JobInfo, in_squeue, run_tool, show_job
from virgo_exps.launch.slurm.script import JobContext

POLL_S = 0.5  # seconds between two `scontrol show job`
CONFIRM_S = 1.0  # a final state of a requeueable job must hold this long (Slurm may requeue it)
LOG_TAIL_LINES = 30
CANCEL_WAIT_S = 600  # give up waiting for a cancelled job to leave squeue after this long
UNREACHABLE_S = 60  # ... or when squeue has not answered for this long (slurmctld down)


def write(text: str | bytes) -> None:
    """Write to stderr, ignoring a closed pipe: when `dvc exp run` (or the tmux pane) is gone
    the launcher must still cancel its job rather than die on EPIPE."""
    try:
        if isinstance(text, bytes):
            sys.stderr.buffer.write(text)
        else:
            sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def say(msg: str) -> None:
    write(f"launch: {msg}\n")


class LogFollower:
    """Copies what the job appends to its log onto our stderr."""

    def __init__(self, path: Path | None, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.offset = 0
        self.filter = ConsoleFilter()  # the log keeps the chatter, the console does not show it

    def set_path(self, path: Path) -> None:
        if path != self.path:
            self.flush()
            self.path, self.offset = path, 0

    def flush(self) -> None:
        """Show a last line the log ended without a newline."""
        if self.enabled:
            write(self.filter.flush())

    def poll(self) -> None:
        if not self.enabled or self.path is None:
            return
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except OSError:
            return
        if data:
            self.offset += len(data)
            write(self.filter.feed(data))


def error_lines(path: Path | None, limit: int = 5) -> list[str]:
    """The distinct "error: ..." lines of a log (which rank failed and why), first ones first."""
    if path is None:
        return []
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in text:
        line = line.strip()
        if re.match(r"(virgo: )?error: ", line) and line not in found:
            found.append(line)
    return found[:limit]


def log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return "(no log file)"
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(log {path} not readable)"
    return "\n".join(text[-lines:]) or "(log is empty)"


class SubmitInterrupted(Exception):
    pass


class Signals:
    """SIGINT/SIGTERM/SIGHUP set a flag (the watcher cancels the job and exits).

    While ``raise_now`` is set (waiting for sbatch to print the job id) the
    first signal also raises :class:`SubmitInterrupted`, so a hanging sbatch cannot
    make the launcher deaf.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self):
        self.received: int | None = None
        self.raise_now = False
        self._old: dict = {}

    def _handler(self, signum, frame):
        if self.received is None:
            self.received = signum
            if self.raise_now:
                raise SubmitInterrupted()
        else:
            say(f"{signal.Signals(signum).name} again: still cancelling the job, please wait")

    def __enter__(self):
        for s in self.SIGNALS:
            with contextlib.suppress(ValueError):  # not in the main thread
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def stop_child(proc: subprocess.Popen | None) -> int | None:
    """End ``sbatch -W`` (SIGTERM does not cancel the job); return its code if it had ended."""
    if proc is None:
        return None
    rc = proc.poll()
    if rc is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return rc


def cancel_and_wait(job_id: str, signum: int, follower: LogFollower | None = None) -> None:
    """scancel the job, then wait until squeue no longer lists it."""
    name = signal.Signals(signum).name
    say(f"{name} received: cancelling job {job_id} (scancel {job_id})")
    proc = run_tool("scancel", job_id)
    if proc.returncode != 0:
        say(f"scancel {job_id} failed: {proc.stderr.strip()}")
    start = told = answered = time.monotonic()
    while time.monotonic() - start < CANCEL_WAIT_S:
        listed = in_squeue(job_id)
        if listed is False:
            if follower:
                follower.poll()
            say(f"job {job_id} cancelled; squeue no longer lists it")
            return
        now = time.monotonic()
        if listed is not None:
            answered = now
        elif now - answered > UNREACHABLE_S:
            say(
                f"Slurm has not answered for {UNREACHABLE_S} s; giving up waiting for job {job_id} "
                f"(check with `squeue -j {job_id}`)"
            )
            return
        if now - told > 10:
            say(f"waiting for job {job_id} to end (Slurm's KillWait)...")
            told = now
        if follower:
            follower.poll()
        time.sleep(POLL_S)
    say(f"job {job_id} is still listed by squeue after {CANCEL_WAIT_S} s; check with `squeue -j {job_id}`")


def watch(job_id: str, ctx: JobContext, sbatch: subprocess.Popen | None, signals: Signals, follow: bool = True) -> int:
    """Wait for the job's final state; return the stage's exit code."""
    follower = LogFollower(ctx.log_file(job_id), enabled=follow)
    last: tuple | None = None
    candidate: tuple[JobInfo, float] | None = None  # a final state waiting for confirmation
    info: JobInfo | None = None
    next_poll = 0.0
    silent_since = told_silent = 0.0
    sbatch_rc: int | None = None
    while True:
        if signals.received is not None:
            stop_child(sbatch)
            cancel_and_wait(job_id, signals.received, follower)
            return 128 + signals.received
        now = time.monotonic()
        if now >= next_poll:
            next_poll = now + POLL_S
            if sbatch is not None and sbatch_rc is None:
                sbatch_rc = sbatch.poll()
            try:
                info = show_job(job_id)
            except JobGone:
                follower.poll()
                if sbatch is not None:
                    while (rc := sbatch.poll()) is None and signals.received is None:
                        time.sleep(0.1)
                    if rc is None:
                        stop_child(sbatch)
                        return 128 + signals.received
                    say(f"job {job_id} is no longer known to Slurm; sbatch -W returned {rc}")
                    return _finish(job_id, ctx, None, rc, follower)
                say(f"job {job_id} is no longer known to Slurm; its outcome is lost (see its log)")
                return _finish(job_id, ctx, None, 1, follower)
            if info is not None:
                follower.set_path(ctx.log_of(info))
                key = (info.state, info.restarts, info.nodes, info.reason)
                if key != last:
                    _report_change(info, last)
                    last = key
                if info.final:
                    immediate = info.state == "COMPLETED" or not info.requeue
                    if candidate is None or (candidate[0].state, candidate[0].restarts) != (info.state, info.restarts):
                        candidate = (info, now)
                    if immediate or now - candidate[1] >= CONFIRM_S:
                        stop_child(sbatch)
                        return _finish(job_id, ctx, info, info.stage_exit_code(), follower)
                else:
                    candidate = None
            elif sbatch is not None and sbatch_rc is not None:
                # scontrol cannot answer and sbatch -W is done: its code is all we have.
                say(f"scontrol cannot show job {job_id}; using sbatch -W's exit code {sbatch_rc}")
                return _finish(job_id, ctx, None, sbatch_rc, follower)
            if info is None:
                silent_since = silent_since or now
                if now - silent_since > 60 and now - told_silent > 60:
                    say(f"scontrol does not answer about job {job_id} (slurmctld busy or down?); still waiting")
                    told_silent = now
            else:
                silent_since = 0.0
        follower.poll()
        time.sleep(0.1)


def _report_change(info: JobInfo, last: tuple | None) -> None:
    if last is not None and info.restarts > last[1]:
        say(f"job {info.job_id} requeued (restart {info.restarts}); waiting for it to run again")
    if info.state == "PENDING":
        say(f"job {info.job_id} pending" + (f" ({info.reason})" if info.reason not in ("", "None") else ""))
    elif info.state == "RUNNING":
        say(f"job {info.job_id} running on {info.num_nodes} node(s): {info.nodes}")
    elif not info.final:
        say(f"job {info.job_id} {info.state}")


def _finish(job_id: str, ctx: JobContext, info: JobInfo | None, rc: int, follower: LogFollower) -> int:
    time.sleep(0.05)
    follower.poll()
    follower.flush()
    log = follower.path
    state = info.state if info else "UNKNOWN"
    nodes = info.nodes if info else "?"
    if rc == 0:
        say(f"job {job_id} {state} on {nodes}; log {log}")
        return 0
    name = info.name if info and info.name else ctx.job_name
    what = f"job {job_id} ({name}) ended {state} with exit code {rc} on nodes {nodes}"
    hint = ""
    if state == "NODE_FAIL":
        hint = " (a node failed; running the stage again continues from the last snapshot)"
    elif state == "TIMEOUT":
        hint = " (time limit reached before the training stopped; raise the machine's time or signal_seconds)"
    elif rc == EXIT_INTERRUPTED:
        hint = " (the training was interrupted and not requeued; running the stage again continues from the snapshot)"
    errors = "".join(f"launch:   {line}\n" for line in error_lines(log))
    write(
        f"launch: error: {what}{hint}\n{log_announcement(log)}; its last {LOG_TAIL_LINES} lines:\n"
        f"{log_tail(log)}\n"
        f"launch: error: {what}{hint}\n" + (f"launch: errors reported in the log:\n{errors}" if errors else "")
    )
    return rc
