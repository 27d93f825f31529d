"""Every stage's log, kept in the main checkout and carried with the experiment.

A stage's own output (what DVC shows while it runs) is also written to
``logs/<stage>/<experiment>-local-<pid>.out`` in the main checkout, the name the
launcher gives a local run's log (:mod:`virgo_exps.launch.protocol`), so that
``virgo-exps failures`` finds a failed data stage as it finds a failed
training. Inside a SLURM job the job's own log is the log, and nothing is
written here.

A data stage ends its log with lines naming the identity of its inputs and
of its output (:func:`output_line`): the SHA-256 of a store's provenance
stamp (its params and its inputs' digests, from which a deterministic stage
makes the same bytes), read from the store's attributes without reading its
data. The training's log (``results/train.log``, held by git and so carried
by ``dvc exp push/pull``) begins with the logs of the data stages that made
the data it trained on, followed from the data back through those lines
(:func:`data_logs`): a teammate who pulls the experiment reads how its data,
its training and (in ``results/report/report.log``) its report were made.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from pathlib import Path

from virgo_exps import provenance
from virgo_exps.launch import protocol
from virgo_exps.paths import experiment_name, main_checkout, repo_root

_LINE = re.compile(r"^(?P<stage>[\w-]+): (?P<kind>input|output) (?P<path>\S+) id (?P<id>[0-9a-f]{16,})$", re.M)
_TAIL = 8192  # the identity lines are the log's last; no need to read a long log whole

_current: StageLog | None = None


class _Tee(io.TextIOBase):
    """Writes go to the stream (DVC's output) and to the log file."""

    def __init__(self, stream, sink):
        self._stream = stream
        self._sink = sink

    def write(self, text: str) -> int:
        self._stream.write(text)
        try:
            self._sink.write(text)
        except (OSError, ValueError):  # a full disk or a closed file must not end the stage
            pass
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        try:
            self._sink.flush()
        except (OSError, ValueError):
            pass

    @property
    def buffer(self) -> _BinaryTee:
        """The byte side (what writes bytes to ``sys.stderr.buffer`` uses: a job's log copied as it is)."""
        return _BinaryTee(self._stream.buffer, self._sink)

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self):
        return getattr(self._stream, "encoding", "utf-8")


class _BinaryTee:
    """Bytes to the stream's buffer and, as text, to the log file."""

    def __init__(self, raw, sink):
        self._raw = raw
        self._sink = sink

    def write(self, data: bytes) -> int:
        self._raw.write(data)
        try:
            self._sink.write(bytes(data).decode(errors="replace"))
        except (OSError, ValueError):
            pass
        return len(data)

    def flush(self) -> None:
        self._raw.flush()
        try:
            self._sink.flush()
        except (OSError, ValueError):
            pass


class StageLog:
    """The log file of one stage process; :meth:`text` is what it holds so far."""

    def __init__(self, path: Path, handle):
        self.path = path
        self._handle = handle

    def text(self) -> str:
        self._handle.flush()
        return self.path.read_text(errors="replace")


def start(stage: str) -> StageLog | None:
    """Copy this process's stdout and stderr into the stage's log (None: inside a SLURM job, or the
    folder cannot be written, where the stage runs on without a log of its own)."""
    global _current
    if os.environ.get("SLURM_JOB_ID"):
        return None
    path = protocol.stage_log_dir(main_checkout(), stage) / protocol.local_log_name(experiment_name(), os.getpid())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "x", encoding="utf-8", errors="replace", buffering=1)
    except OSError:
        return None
    sys.stdout = _Tee(sys.stdout, handle)
    sys.stderr = _Tee(sys.stderr, handle)
    _current = StageLog(path, handle)
    return _current


def current() -> StageLog | None:
    """This process's stage log, if :func:`start` opened one."""
    return _current


def store_id(path: str | os.PathLike) -> str:
    """A store's identity: the SHA-256 of its provenance stamp, or of its bytes when it has none."""
    stamp = provenance.read_store_stamp(path) if Path(path).is_dir() else None
    if stamp:
        return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:16]
    return provenance.data_digest(path)


def output_line(stage: str, out: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> str:
    """The last lines of a data stage's log: the identity of each input and of its output."""
    lines = [f"{stage}: input {p} id {store_id(p)}" for p in inputs]
    return "\n".join([*lines, f"{stage}: output {out} id {store_id(out)}"])


def public(text: bytes) -> bytes:
    """``text`` with this workspace, the main checkout and the home folder written as ``<workspace>``,
    ``<checkout>`` and ``~``: a log that travels to teammates and into commits names no place of this
    machine."""
    places = {str(repo_root()): "<workspace>", str(main_checkout()): "<checkout>", str(Path.home()): "~"}
    for where in sorted(places, key=len, reverse=True):
        if len(where) > 1:
            text = text.replace(where.encode(), places[where].encode())
    return text


def _tail(path: Path) -> str:
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - _TAIL))
        return fh.read().decode(errors="replace")


def data_logs(data: str | os.PathLike, home: Path | None = None, skip: tuple[str, ...] = ("train",)) -> list[Path]:
    """The logs of the data stages that made ``data``: the newest log whose output line names its identity,
    then, through that log's input lines, those that made its inputs; oldest first, each followed by the job
    logs it announced."""
    home = home or main_checkout()
    logs_dir = home / "logs"
    if not Path(data).exists() or not logs_dir.is_dir():
        return []
    made: dict[str, tuple[float, Path, list[str]]] = {}  # id -> (mtime, log, ids of its inputs)
    for stage_dir in logs_dir.iterdir():
        if not stage_dir.is_dir() or stage_dir.name in skip or stage_dir.name == "failed":
            continue
        for log in stage_dir.glob("*.out"):
            try:
                mtime, tail = log.stat().st_mtime, _tail(log)
            except OSError:
                continue
            lines = list(_LINE.finditer(tail))
            inputs = [m.group("id") for m in lines if m.group("kind") == "input"]
            for m in lines:
                if m.group("kind") == "output" and (m.group("id") not in made or made[m.group("id")][0] < mtime):
                    made[m.group("id")] = (mtime, log, inputs)
    chosen: list[tuple[float, Path]] = []
    todo, seen = [store_id(data)], set()
    while todo:
        ident = todo.pop()
        if ident in seen or ident not in made:
            continue
        seen.add(ident)
        mtime, log, inputs = made[ident]
        chosen.append((mtime, log))
        todo += inputs
    out: list[Path] = []
    for _, log in sorted(set(chosen)):
        out.append(log)
        try:
            jobs = protocol.announced_logs(log.read_text(errors="replace"))
        except OSError:
            jobs = []
        out += [Path(p) for p in jobs if Path(p).is_file()]
    return list(dict.fromkeys(out))


def joined(logs: list[Path], home: Path | None = None) -> bytes:
    """The logs one after the other, each under a ``==> logs/<stage>/<name> <==`` line."""
    home = home or main_checkout()
    parts = []
    for log in logs:
        try:
            name = log.resolve().relative_to(home.resolve()).as_posix()
        except ValueError:
            name = log.name
        try:
            parts.append(f"==> {name} <==\n".encode() + log.read_bytes())
        except OSError as exc:
            parts.append(f"==> {name}: not readable ({exc.strerror}) <==\n".encode())
    return b"\n".join(parts)
