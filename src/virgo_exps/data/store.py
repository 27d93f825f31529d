"""Small helpers shared by the data stages: atomic publication of zarr
directories, stale-partial clean-up, the compression codec and progress lines.

Atomic publication
------------------
A stage never writes into its final output path. It writes into a sibling
``<out>.partial-<pid>``, writes ``complete: true`` into the root attributes
as its very last write, and only then renames the directory onto ``<out>``.
A process killed at any point therefore leaves either the previous complete
store or nothing at ``<out>``, never a half-written one. Leftover partial
directories of processes that no longer run are removed by the next run.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

# Suffix of our own temporary siblings: ``.partial-<pid>`` (a local run) and
# ``.old-<pid>`` (the previous store, moved aside while the new one is renamed
# into place).
_OWN_TEMP = re.compile(r"^\.(partial|old)-(\d+)$")


def partial_path(out: Path) -> Path:
    """The temporary sibling this process writes into before publishing ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete ``<out>.partial-<pid>`` / ``<out>.old-<pid>`` siblings of dead processes.

    Directories of a process that still runs on this machine are left alone
    (two runs writing the same output is a user error, but we do not make it
    worse by deleting the other run's work). Returns what was removed.
    """
    out = Path(out)
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    prefix = out.name
    for entry in parent.iterdir():
        if not entry.name.startswith(prefix):
            continue
        m = _OWN_TEMP.match(entry.name[len(prefix):])
        if m is None or _pid_alive(int(m.group(2))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def remove_write_leftovers(root: Path) -> int:
    """Remove temporary chunk files (``*.partial``) that zarr's local store
    leaves behind when a writer is killed between writing and renaming a chunk.
    The chunks themselves are renamed into place atomically, so a chunk file
    that exists is always whole."""
    n = 0
    for path in Path(root).rglob("*.partial"):
        if path.is_file():
            path.unlink(missing_ok=True)
            n += 1
    return n


def publish(partial: Path, out: Path) -> None:
    """Rename the finished ``partial`` directory onto ``out``.

    An existing ``out`` is first moved aside and deleted afterwards, so the
    window in which ``out`` does not exist is two renames long, and ``out``,
    whenever it exists, is a complete store.
    """
    partial, out = Path(partial), Path(out)
    old = None
    if out.exists() or out.is_symlink():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def fsync_tree(root: Path) -> None:
    """Best-effort flush of a directory tree's metadata before publication."""
    try:
        fd = os.open(str(root), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def compressors():
    """The codec used for every array we write.

    Blosc with zstd and byte shuffle: float32 noise is close to incompressible
    (the low mantissa bits are random), but shuffling groups the exponent and
    high mantissa bytes, which zstd does compress, at a speed that keeps the
    codec far from being the bottleneck.
    """
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=4)]


def format_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


class Progress:
    """Prints ``done/total``, rate and ETA to stderr every ``every_s`` seconds
    or every 10 % of the work, whichever comes first."""

    def __init__(self, label: str, total: int, unit: str = "samples", enabled: bool = True, every_s: float = 5.0):
        self.label, self.total, self.unit = label, max(int(total), 0), unit
        self.enabled = enabled
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.last_t = self.t0
        self.last_decile = 0
        self.done = 0

    def update(self, done: int) -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.perf_counter()
        decile = int(10 * done / self.total) if self.total else 10
        if now - self.last_t >= self.every_s or decile > self.last_decile:
            self.last_t, self.last_decile = now, decile
            self._print(now)

    def _print(self, now: float) -> None:
        elapsed = now - self.t0
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        left = (self.total - self.done) / rate if rate and rate == rate and rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"[{self.label}] {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.1f} {self.unit}/s, elapsed {format_seconds(elapsed)}, ETA {format_seconds(left)}",
            file=sys.stderr,
            flush=True,
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
