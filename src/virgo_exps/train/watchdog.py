"""Noticing a training rank that stops making progress.

Every rank keeps its progress (epoch, step, where in the step) in memory, and
a thread of the rank writes it, when it changed, to a small heartbeat file,
``beat-<rank>`` in the run's snapshot folder (``.virgo/snapshots/<key>/`` of
the main checkout, on the file system every node of a job sees), about once
a second, also while the training thread waits in a collective. Rank 0 watches them from a thread. A
rank whose heartbeat has not changed for the machine profile's
``stall_limit`` seconds (measured on rank 0's own clock, so clocks of other
nodes do not matter) has stopped making progress: rank 0 marks it in the
run's status file (``"status": "stalled"``, with the rank, host, epoch and
step), says so in one line, and ends the run (exit :data:`EXIT_STALLED`);
the launcher then stops the other ranks, the stuck one included. The last
complete snapshot stays, so the next run resumes from it.

Progress is a training step started, its loss computed, the step done, a
validation batch done. When the others wait in a collective for a stuck rank
they stand still too; the rank named is the one furthest behind. The limit must
cover the longest stretch without one (a snapshot written to a slow file
system, the first rank decompressing a split); 0 turns the watch off.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from virgo_exps.launch.protocol import STATUS_FILE, STATUS_STALLED
from virgo_exps.machines import load_machine

# The exit code of a run ended because a rank stopped making progress.
EXIT_STALLED = 5
# A rank's heartbeat thread writes its progress this often (seconds), when it changed.
BEAT_EVERY = 1.0
# Where in a step a rank is: a rank waiting in a collective is further along than the one it waits for.
# (The stop check is the collective every rank joins before a step.)
STOP_CHECK, STEP_STARTED, LOSS_COMPUTED, STEP_DONE, VALIDATING = 0, 1, 2, 3, 4


class Heartbeat:
    """One rank's progress: ``beat`` only updates memory (cheap at every step); a thread writes it to the
    rank's file when it changed, also while the training thread waits inside a collective."""

    def __init__(self, folder: Path | None, rank: int):
        self.path = Path(folder) / f"beat-{rank}" if folder is not None else None  # None: beats go nowhere
        self.host = socket.gethostname()
        self.progress = (0, 0, STEP_STARTED, 0)
        self._written = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, epoch: int, step: int, phase: int = STEP_DONE, sub: int = 0) -> None:
        self.progress = (epoch, step, phase, sub)

    def start(self) -> Heartbeat:
        if self.path is not None:
            self._write()
            self._thread = threading.Thread(target=self._loop, name="virgo-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(BEAT_EVERY):
            self._write()

    def _write(self) -> None:
        progress = self.progress
        if progress == self._written:
            return
        epoch, step, phase, sub = progress
        text = json.dumps({"host": self.host, "epoch": epoch, "step": step, "phase": phase, "sub": sub})
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(text)
            os.replace(tmp, self.path)
            self._written = progress
        except OSError:
            pass  # a heartbeat that cannot be written shows as a stall, with the rank named

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _order(beat: dict | None) -> tuple:
    if not beat:
        return (-1,)
    return tuple(beat.get(k, 0) for k in ("epoch", "step", "phase", "sub"))


class Watchdog(threading.Thread):
    """Rank 0's watch over the heartbeats of ``world`` ranks; ``on_stall`` gets the one line and the
    stalled rank's last heartbeat (or None) and ends the run. When several ranks stand still (the others
    wait in a collective for the stuck one), the one named is the furthest behind."""

    def __init__(self, folder: Path, world: int, limit: float, on_stall: Callable[[str, int, dict | None], None]):
        super().__init__(name="virgo-watchdog", daemon=True)
        self.folder, self.world, self.limit, self.on_stall = Path(folder), world, float(limit), on_stall
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def _read(self, rank: int) -> tuple[str | None, dict | None]:
        try:
            text = (self.folder / f"beat-{rank}").read_text()
            return text, json.loads(text)
        except (OSError, ValueError):
            return None, None

    def run(self) -> None:
        seen: dict[int, tuple[str | None, float]] = {}
        interval = max(0.2, min(5.0, self.limit / 4))
        while not self._stop.wait(interval):
            now = time.monotonic()
            beats = {}
            for rank in range(self.world):
                text, beats[rank] = self._read(rank)
                if rank not in seen or seen[rank][0] != text:
                    seen[rank] = (text, now)
            stalled = [r for r in range(self.world) if now - seen[r][1] > self.limit]
            if not stalled:
                continue
            rank = min(stalled, key=lambda r: (_order(beats[r]), seen[r][1]))
            last = beats[rank]
            where = (
                f"on {last.get('host')} (last seen at epoch {last.get('epoch')}, step {last.get('step')})"
                if last
                else "(it never reported)"
            )
            line = (
                f"train: rank {rank} {where} made no progress for {self.limit:.0f} s (stall_limit of the "
                "machine profile); ending the run: the next run resumes from the last snapshot"
            )
            self.on_stall(line, rank, last)
            return


def end_on_stall(status_file: Path | None, before_exit: Callable[[], None] | None = None):
    """The usual ``on_stall``: mark the run's status file, print the line, end the process."""

    def handler(line: str, rank: int, last: dict | None) -> None:
        if status_file is not None:
            try:
                record = {"status": STATUS_STALLED, "rank": rank, **(last or {}), "message": line}
                status_file.write_text(json.dumps(record) + "\n")
            except OSError:
                pass
        print(f"error: {line}", file=sys.stderr, flush=True)
        if before_exit is not None:
            try:
                before_exit()
            except Exception:  # ending the run matters more than its bookkeeping
                pass
        os._exit(EXIT_STALLED)

    return handler


def watch(folder: Path, world: int, before_exit: Callable[[], None] | None = None) -> Watchdog | None:
    """Rank 0's watch over the heartbeats of ``world`` ranks in ``folder``, started, with the machine
    profile's ``stall_limit``; None when the limit is 0 (no watch). A stall marks ``folder``'s status file."""
    try:
        limit = load_machine().stall_limit
    except Exception:  # a profile that cannot be read was refused by the first stage; keep the default
        limit = 1800
    if not limit:
        return None
    dog = Watchdog(folder, world, limit, end_on_stall(folder / STATUS_FILE, before_exit))
    dog.start()
    return dog


def start_watch(
    folder: Path, rank: int, world: int, is_main: bool, epoch: int, step: int, before_exit: Callable[[], None]
) -> tuple[Heartbeat, Watchdog | None]:
    """This rank's heartbeat in ``folder``, started at (``epoch``, ``step``), and on the main rank the watch
    over every rank's (:func:`watch`); stop both when the run ends."""
    folder.mkdir(parents=True, exist_ok=True)
    heart = Heartbeat(folder, rank)
    heart.beat(epoch, step, STEP_STARTED)
    heart.start()
    return heart, (watch(folder, world, before_exit) if is_main else None)
