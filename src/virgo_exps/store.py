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

import itertools
import os
import re
import shutil
import sys
import time
from pathlib import Path

import google_crc32c

from virgo_exps import fsio
from virgo_exps.config import DamagedInputError

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
    try:  # a killed process whose parent died too stays a zombie until init reaps it: it writes nothing
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
    except (OSError, IndexError):
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
        m = _OWN_TEMP.match(entry.name[len(prefix) :])
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
    out = Path(out)
    fsio.move_into_place(partial, out, aside=out.with_name(f"{out.name}.old-{os.getpid()}"))


# Best-effort flush of a folder's entries before publication.
fsync_tree = fsio.fsync_dir


def compressors():
    """The codecs of every array we write: compression, then a checksum.

    Blosc with zstd and byte shuffle: float32 noise is close to incompressible
    (the low mantissa bits are random), but shuffling groups the exponent and
    high mantissa bytes, which zstd does compress, at a speed that keeps the
    codec far from being the bottleneck. Then zarr's ``crc32c`` codec appends
    a CRC-32C of the compressed bytes to every chunk file and checks it on
    every read, so a damaged chunk fails loudly instead of decoding into wrong
    numbers (see :func:`read`).
    """
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=4), Crc32cCodec()]


# --------------------------------------------------------------------------
# Integrity on read
# --------------------------------------------------------------------------


class CorruptStoreError(DamagedInputError):
    """A chunk of one of our stores does not match its checksum."""


def array_options() -> dict:
    """What every array we write is created with (``create_array(..., **array_options())``): the codecs
    of :func:`compressors`, every chunk written, and chunk files side by side in the array's folder
    (``c.3.0.0``), not one folder per index (``c/3/0/0``). A linked checkout (a queued experiment, a
    sweep task) makes one link per chunk file; with nested keys it made two folders per chunk as well, so
    its disk grew with the data."""
    return {
        "compressors": compressors(),
        "chunk_key_encoding": {"name": "default", "separator": "."},
        # Every chunk is written, also one that holds only the fill value: a chunk file that is not
        # there is then damage (zarr would read it as the fill value, zeros, without a word).
        "config": {"write_empty_chunks": True},
    }


def restore_hint(store: Path | str, damaged: Path | str | None = None, stage: str | None = None) -> str:
    """How to repair the DVC-tracked output ``store`` whose file ``damaged`` is
    corrupt; ``stage`` is the stage that writes it."""
    rerun = f"'dvc repro --force --single-item {stage}'" if stage else "'dvc repro --force' of the stage that writes it"
    if damaged is not None and Path(damaged).is_symlink():
        target = Path(os.path.realpath(damaged))
        if ".dvc" in target.parts and "cache" in target.parts:
            return (
                f"the file is a link to DVC's cache object {target}, so the cache itself is damaged: delete that "
                f"object, then 'dvc pull {store}' (from a remote) or rerun {rerun}"
            )
    return (
        f"restore it from DVC's cache with 'dvc checkout --relink {store}' or from a remote with "
        f"'dvc pull {store}' (if the copy in .dvc/cache is damaged too, delete it and rerun {rerun})"
    )


def _has_checksum(array) -> bool:
    return any(type(c).__name__ == "Crc32cCodec" for c in array.metadata.codecs)


def _chunk_file(root: Path, array, coords: tuple[int, ...]) -> tuple[str, Path]:
    key = (
        f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
        if array.path
        else array.metadata.encode_chunk_key(coords)
    )
    return key, Path(root) / key


def chunk_ok(path: Path) -> bool:
    """Whether a chunk file written with the ``crc32c`` codec carries a matching checksum."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        return False
    return google_crc32c.value(data[:-4]) == int.from_bytes(data[-4:], "little")


def _chunk_files(root: Path | str, array, rows: tuple[int, int] | None = None):
    """(key, path) of each chunk file of ``array`` (of rows ``[start, stop)`` along the first axis)."""
    grid = [-(-s // c) for s, c in zip(array.shape, array.chunks)]
    if rows is not None and grid:
        grid_first = range(rows[0] // array.chunks[0], -(-rows[1] // array.chunks[0]))
    else:
        grid_first = range(grid[0]) if grid else range(1)
    for coords in itertools.product(grid_first, *(range(g) for g in grid[1:])):
        yield _chunk_file(Path(root), array, coords)


def damaged_chunks(root: Path | str, array, rows: tuple[int, int] | None = None) -> list[str]:
    """Keys (``<array>/c.0.0``, or ``<array>/c/0/0`` in a store with nested keys) of the chunk files of
    ``array`` in the store at ``root`` whose crc32c checksum does not match their bytes; only chunks
    holding rows ``[start, stop)`` along the first axis when ``rows`` is given. (A missing chunk file:
    :func:`missing_chunks`.)"""
    if not _has_checksum(array):
        return []
    return [key for key, path in _chunk_files(root, array, rows) if path.is_file() and not chunk_ok(path)]


def missing_chunks(root: Path | str, array, rows: tuple[int, int] | None = None) -> list[str]:
    """Keys of the chunk files of ``array`` (of ``rows``) that are not there. Our arrays (those with the
    checksum codec) are written with every chunk (:func:`array_options`), so each one is damage; zarr
    would read it as the fill value."""
    if not _has_checksum(array):
        return []
    return [key for key, path in _chunk_files(root, array, rows) if not path.is_file()]


def damage_error(
    root: Path | str, bad: list[str], stage: str | None = None, missing: bool = False
) -> CorruptStoreError:
    """The error for damaged (or ``missing``) chunks ``bad`` of the store at ``root``: one line
    naming the store, the chunk(s) and how to restore them."""
    if len(bad) == 1:
        what = f"chunk {bad[0]} is"
    else:
        what = f"{len(bad)} chunks ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) are"
    why = (
        "missing (the file is gone; zarr would read it as zeros)"
        if missing
        else "damaged (the crc32c checksum does not match the bytes on disk)"
    )
    return CorruptStoreError(f"{root}: {what} {why}; {restore_hint(root, Path(root) / bad[0], stage)}")


def read(array, root: Path | str, start: int | None = None, stop: int | None = None, stage: str | None = None):
    """``array[start:stop]`` (rows along the first axis) as a numpy array,
    refusing damaged data: a chunk whose checksum does not match, or whose file is
    missing, raises :class:`CorruptStoreError` naming the store ``root``, the chunk
    and the fix (``stage``: the stage that writes the store, for the message)."""
    # numpy: the command line imports this module (verify) and starts faster without it
    import numpy as np

    n = array.shape[0] if array.shape else 0
    rows = (0 if start is None else start, n if stop is None else min(stop, n))
    try:
        data = np.asarray(array[start:stop])
    except Exception as exc:
        bad = damaged_chunks(root, array, rows)
        if bad:
            raise damage_error(root, bad, stage) from exc
        raise
    gone = missing_chunks(root, array, rows) if array.shape else []
    if gone:
        raise damage_error(root, gone, stage, missing=True)
    return data


def verify_store(root: Path | str) -> list[str]:
    """Keys of every chunk of every array of the zarr group at ``root`` whose
    checksum does not match, or whose file is missing (empty: the store is intact)."""
    import zarr

    group = zarr.open_group(str(root), mode="r")
    bad: list[str] = []
    for _, member in sorted(group.members(max_depth=None), key=lambda kv: kv[0]):
        if isinstance(member, zarr.Array):
            bad += damaged_chunks(root, member) + missing_chunks(root, member)
    return bad


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
