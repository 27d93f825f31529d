"""What of a stage's worker output reaches the console: progress and results, not library chatter.

The launcher copies every line a worker prints into the stage's log file and
onto the console of `dvc exp run`. The log keeps everything; the console skips
the lines of :data:`CHATTER` (messages of PyTorch, DeepSpeed and MLflow that
repeat per rank or per run and say nothing about the experiment) and a summary
line that only repeats one already shown. ``VIRGO_CONSOLE=all`` shows every line.

:func:`tee` does it for a stream read line by line (a local run's pipe);
:class:`ConsoleFilter` for text that arrives in arbitrary chunks (a SLURM job's
log file followed while it grows).
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO

# One probe message of the PyTorch profiler; two ranks writing at once can put two on one line
# ("...] profiler_stopUSDT:...] profiler_stop") and the second newline on a line of its own.
_USDT = re.compile(r"USDT:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+\] profiler_(?:start|stop)")

# (what it is, pattern searched in the line). Each was seen on the console of a real run.
CHATTER: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "PyTorch profiler probes, one line per rank and profiled step range",
        re.compile(rf"^(?:{_USDT.pattern})+\s*$"),
    ),
    (
        "c10d's reverse lookup of a peer address, failing where nodes have no DNS",
        re.compile(r"\[c10d\] The hostname of the client socket cannot be retrieved\b"),
    ),
    (
        "DeepSpeed's accelerator detection, once per rank",
        re.compile(r"\[real_accelerator\.py:\d+:\w+\] Setting (?:ds_)?accelerator to "),
    ),
    (
        "DeepSpeed's just-in-time build of its shared-memory op, once per rank",
        re.compile(r"^DeepSpeed deepspeed\.ops\.\S+ built successfully\s*$"),
    ),
    (
        "MLflow creating the tables of a new tracking database",
        re.compile(r"\bINFO mlflow\.store\.db\.utils: (?:Creating initial MLflow database|Updating database) tables"),
    ),
)

# "[preprocess] wrote data/images.zarr: {...}" and "preprocess: {...}": the same summary twice.
_SUMMARY = re.compile(r"^(?:\[(?P<tag>[\w-]+)\] .*?|(?P<stage>[\w-]+)): (?P<summary>\{.*\})\s*$")


def _text(line: str | bytes) -> str:
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    return line.rstrip("\r\n")


def chatter_reason(line: str | bytes) -> str | None:
    """Why ``line`` is chatter (the description in :data:`CHATTER`), or None when it is not."""
    text = _text(line)
    for why, pattern in CHATTER:
        if pattern.search(text):
            return why
    return None


def is_chatter(line: str | bytes) -> bool:
    """True when ``line`` is library chatter: it belongs in the log file, not on the console."""
    return chatter_reason(line) is not None


def show_everything() -> bool:
    return os.environ.get("VIRGO_CONSOLE", "").strip().lower() == "all"


class ConsoleFilter:
    """Decides, line by line, what reaches the console; remembers the summaries already shown.

    :meth:`show` takes one line; :meth:`feed` takes bytes as they come (a line may be split
    between two calls: its start is held until its end arrives) and returns what to show;
    :meth:`flush` returns a last line that had no newline.
    """

    def __init__(self, enabled: bool | None = None):
        self.enabled = (not show_everything()) if enabled is None else enabled
        self._summaries: set[str] = set()
        self._partial = b""
        self._owed_newlines = 0

    def show(self, line: bytes) -> bytes | None:
        """What the console shows of ``line`` (one line, its newline included): the line, the line
        without the profiler probes merged into it, or None."""
        if not self.enabled:
            return line
        text = _text(line)
        if not text.strip():
            if self._owed_newlines:  # the newline of a probe message merged into an earlier line
                self._owed_newlines -= 1
                return None
            return line
        probes = len(_USDT.findall(text))
        if probes:
            rest = _USDT.sub("", text)
            if not rest.strip():
                self._owed_newlines += probes - 1
                return None
            self._owed_newlines += probes
            return self.show(rest.encode() + b"\n")
        if is_chatter(text):
            return None
        summary = _SUMMARY.match(text)
        if summary:
            body = summary.group("summary")
            if body in self._summaries:
                return None
            self._summaries.add(body)
        return line

    def feed(self, data: bytes) -> bytes:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return b"".join(filter(None, (self.show(line + b"\n") for line in lines)))

    def flush(self) -> bytes:
        rest, self._partial = self._partial, b""
        return (self.show(rest) or b"") if rest else b""


def _write(console: BinaryIO, data: bytes) -> None:
    """Write to the console, ignoring a closed one: with `dvc exp run` (or its terminal) gone
    the log must still get every line and the launcher must still see the worker end."""
    if not data:
        return
    try:
        console.write(data)
        console.flush()
    except (OSError, ValueError):
        pass


def tee(stream: BinaryIO, log: BinaryIO, console: BinaryIO, filt: ConsoleFilter | None = None) -> None:
    """Copy ``stream`` until its end: every line to ``log`` (flushed at once), the lines that are
    not chatter to ``console``."""
    filt = filt or ConsoleFilter()
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        shown = filt.show(line)
        if shown:
            _write(console, shown)
