"""The node's one decompressed copy of a split, shared by the ranks of the node.

:class:`virgo_exps.train.data.ImageDataset` does not read a split into every process. The ranks of
one node share one decompressed copy of it: the first rank to arrive
decompresses the split, chunk by chunk, into a file on node-local storage
(``/dev/shm`` when the split fits in it and in memory, else the node's
``TMPDIR``), written under a temporary name and renamed into place, and every
rank maps that file read-only. The node's memory for data is then one copy
whatever its number of ranks, and a split larger than memory is read through
the page cache instead of refused.

The file is named by a digest of the split's content (the store's metadata and,
per chunk file, its name, size and the crc32c checksum the preprocess stage
appends to it; the bytes themselves when a chunk carries no checksum), so a
changed store never maps a stale copy. The copy is made from checksummed reads,
so it holds the split's verified content; a chunk damaged later without a change
to its checksum (bit rot in a cache object) has the same name, and while a job of
the node still maps the intact copy a new job maps it too: it trains on the right
data, and the damage is reported by the next job that decompresses the split.
Nobody else reads or replaces it. The copies live in a folder of the user's
own (``virgo-data-<uid>`` in ``/dev/shm`` or ``TMPDIR``), created with mode
0700; one that exists but is not the user's own folder (another user's, a
link, a file) is passed over, with one line, for the next name
(``virgo-data-<uid>.1``, ...). Every file in it is created exclusively, mode
0600, without following links, and a copy found there is mapped only when it
is a regular file of the user's, of the right size, whose content matches the
SHA-256 written beside it when it was made; any other is removed and made
again, with one line (docs/threat-model.md).

Who may remove it is settled with
``flock`` on a lock file beside it, which the kernel releases when a process
dies however it dies:

- every process that maps the copy holds a *shared* lock on ``<name>.lock``;
- the copy is written under an *exclusive* lock on ``<name>.create``, so only
  one process of the node writes it and the others wait and map it;
- a process that closes the data set tries to turn its lock exclusive: this
  succeeds only for the last holder, which removes the copy (a normal end, and
  a rank that raised: the interpreter's exit closes the data set too);
- a job killed with SIGKILL leaves its copy behind, unlocked: every process
  that opens a data set first removes each copy whose lock it can take
  exclusively, i.e. that nobody maps any more.

A lock file removed by such a clean-up while another process was about to lock
it is detected (the locked file is no longer the one at the path) and opened
again, so two processes never believe they share a copy they do not.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import stat
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil

from virgo_exps.store import read

# Environment variable naming the one folder for the node's copies (tests,
# or a site whose node-local storage is elsewhere); by default /dev/shm, then TMPDIR.
NODE_DIR_ENV = "VIRGO_NODE_DATA"
PREFIX = "virgo-data-"
SUFFIX = ".f32"
DIGEST = ".sha256"
# A copy goes to /dev/shm only if it leaves this share of that file system and
# of the available memory free.
SHM_FRACTION = 0.8


def open_group(path: Path):
    import zarr

    group = zarr.open_group(str(path), mode="r")
    if not group.attrs.get("complete", False):
        raise RuntimeError(f"{path}: the preprocessed store is incomplete; rerun the preprocess stage")
    return group


def node_dirs(bases: list[Path] | None = None) -> list[Path]:
    """Where the node's copies may live, in order of preference: the user's own folder in each of
    ``bases``, by default ``VIRGO_NODE_DATA`` (alone, when set), else /dev/shm and TMPDIR; the first
    also holds the lock files."""
    if bases:
        pass
    elif os.environ.get(NODE_DIR_ENV):
        bases = [Path(os.environ[NODE_DIR_ENV])]
    else:
        bases = []
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
            bases.append(shm)
        tmp = Path(tempfile.gettempdir())
        if tmp not in bases:
            bases.append(tmp)
    out = [d for d in (private_dir(b) for b in bases) if d is not None]
    if not out:
        raise RuntimeError(
            f"no folder of this user's (uid {os.getuid()}) can be made for the node's data copies in "
            f"{', '.join(map(str, bases))}; set {NODE_DIR_ENV} to a folder of your own on node-local storage"
        )
    return out


# How many names (virgo-data-<uid>, .1, .2, ...) are tried in one place before it is given up.
PRIVATE_TRIES = 8
_WARNED: set[str] = set()


def _warn_once(line: str) -> None:
    if line not in _WARNED:
        _WARNED.add(line)
        print(line, file=sys.stderr, flush=True)


def private_dir(base: Path) -> Path | None:
    """This user's own folder for data copies in ``base`` (mode 0700), created if missing; None if every
    name is taken by something that is not such a folder (another user's, a link, a file)."""
    uid = os.getuid()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _warn_once(f"data copies: cannot use {base} ({exc.strerror}); trying the next place")
        return None
    for i in range(PRIVATE_TRIES):
        folder = base / f"{PREFIX}{uid}{f'.{i}' if i else ''}"
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            _warn_once(f"data copies: cannot use {base} ({exc.strerror}); trying the next place")
            return None
        st = os.lstat(folder)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.chmod(folder, 0o700)  # ours: owner-only whatever the umask was (an older layout)
            return folder
        kind = "a link" if stat.S_ISLNK(st.st_mode) else "not a folder" if not stat.S_ISDIR(st.st_mode) else "a folder"
        _warn_once(
            f"data copies: ignoring {folder}: {kind} of uid {st.st_uid}, not this user's (uid {uid}); "
            "using the next name"
        )
    _warn_once(f"data copies: every name for this user's folder in {base} is taken by others; trying the next place")
    return None


def split_digest(root: Path, split: str) -> str:
    """SHA-256 of a split's content: the store's metadata and every chunk file's name, size and checksum."""
    root = Path(root)
    h = hashlib.sha256()
    meta = [root / "zarr.json", root / ".zattrs", root / ".zgroup"]
    for f in meta:
        if f.is_file():
            h.update(f"{f.name}\0".encode() + f.read_bytes())
    base = root / split
    for f in sorted(p for p in base.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if f.name in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
            h.update(f.read_bytes())
            continue
        with open(f, "rb") as fh:
            if _chunk_has_crc(f, root):
                # the crc32c codec appends a checksum of the chunk's bytes: its last 4 bytes
                fh.seek(max(0, size - 4))
                h.update(fh.read(4))
            else:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


_CRC_CACHE: dict[Path, bool] = {}


def _chunk_has_crc(chunk: Path, root: Path) -> bool:
    """Whether the array a chunk file belongs to was written with the crc32c codec (zarr v3 metadata)."""
    for parent in chunk.parents:
        if parent == root or root not in parent.parents:
            return False
        meta = parent / "zarr.json"
        if meta.is_file():
            if meta not in _CRC_CACHE:
                try:
                    codecs = json.loads(meta.read_text()).get("codecs", [])
                except (OSError, ValueError):
                    codecs = []
                _CRC_CACHE[meta] = any(c.get("name") == "crc32c" for c in codecs if isinstance(c, dict))
            return _CRC_CACHE[meta]
    return False


def _lock_path_matches(fh, path: Path) -> bool:
    """Whether the open file ``fh`` is still the file at ``path`` (a clean-up may have removed it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _locked(path: Path, mode: int):
    """Open ``path`` (created if missing) and flock it with ``mode``, retrying if it was removed meanwhile."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        fh = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(fh, mode)
        except BaseException:
            fh.close()
            raise
        if _lock_path_matches(fh, path):
            return fh
        fh.close()


def _remove_copy(name: str, dirs: list[Path]) -> None:
    """Remove a copy, its partial writes and its create lock (the caller holds ``<name>.lock`` exclusively)."""
    for d in dirs:
        (d / f"{name}{SUFFIX}").unlink(missing_ok=True)
        (d / f"{name}{DIGEST}").unlink(missing_ok=True)
        for tmp in d.glob(f"{name}{SUFFIX}.tmp-*"):
            tmp.unlink(missing_ok=True)
    (dirs[0] / f"{name}.create").unlink(missing_ok=True)


def remove_stale_copies(dirs: list[Path] | None = None) -> list[str]:
    """Remove the copies that no process maps any more (left by a job that was killed) from this user's
    folders ``dirs`` (default: node_dirs()); return their names."""
    dirs = dirs or node_dirs()
    removed = []
    for lock in sorted(dirs[0].glob(f"{PREFIX}{os.getuid()}-*.lock")):
        try:
            fh = os.fdopen(os.open(lock, os.O_RDWR | os.O_NOFOLLOW), "r+b")
        except OSError:
            continue
        with fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # mapped by a running process
            if not _lock_path_matches(fh, lock):
                continue
            name = lock.name[: -len(".lock")]
            _remove_copy(name, dirs)
            lock.unlink(missing_ok=True)
            removed.append(name)
    return removed


def _fits_in_shm(need: int, d: Path) -> bool:
    if not str(d).startswith("/dev/shm"):
        return False
    free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
    return need <= SHM_FRACTION * min(free, psutil.virtual_memory().available)


def _decompress(root: Path, group, split: str, target: Path) -> str:
    """Write ``<split>/x`` then ``<split>/y`` as raw float32 into ``target``, chunk by chunk, atomically,
    with the SHA-256 of what was written beside it (``<name>.sha256``); return that digest."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as fh:
            for key in ("x", "y"):
                arr = group[f"{split}/{key}"]
                step = max(1, arr.chunks[0])
                for start in range(0, arr.shape[0], step):
                    # checksummed reads: a damaged chunk stops training with the store, the chunk and the fix
                    block = np.ascontiguousarray(
                        read(arr, root, start, start + step, stage="preprocess"), dtype=np.float32
                    )
                    view = memoryview(block).cast("B")
                    digest.update(view)
                    fh.write(view)
        _write_private(_digest_path(target), digest.hexdigest() + "\n")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def _digest_path(copy: Path) -> Path:
    return copy.with_name(copy.name[: -len(SUFFIX)] + DIGEST)


def _write_private(path: Path, text: str) -> None:
    """Write a small file of this user's, mode 0600, created exclusively under a temporary name, renamed."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _content_digest(fd: int, nbytes: int) -> str:
    h = hashlib.sha256()
    with mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm:
        for start in range(0, nbytes, 1 << 24):
            h.update(mm[start : start + (1 << 24)])
    return h.hexdigest()


def copy_refusal(path: Path, nbytes: int) -> str | None:
    """Why the file at ``path`` is not a copy this user may map (None: it is): it must be a regular
    file of this user's, mode 0600, of ``nbytes`` bytes, whose content matches its recorded SHA-256."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_uid != os.getuid():
            return f"owned by uid {st.st_uid}, not this user"
        if stat.S_IMODE(st.st_mode) & 0o077:
            return f"mode {stat.S_IMODE(st.st_mode):o}, readable or writable by others"
        if st.st_size != nbytes:
            return f"{st.st_size} bytes, expected {nbytes}"
        try:
            want = _digest_path(path).read_text().strip()
        except OSError:
            return "its SHA-256 record is missing"
        if nbytes and _content_digest(fd, nbytes) != want:
            return "its content does not match its SHA-256 record"
        return None
    finally:
        os.close(fd)


class NodeCopy:
    """One split of a store, decompressed once per node and mapped read-only (see the module's docstring)."""

    def __init__(self, root: Path, group, split: str, bases: list[Path] | None = None):
        self.dirs = node_dirs(bases)
        xa, ya = group[f"{split}/x"], group[f"{split}/y"]
        self.shapes = (tuple(xa.shape), tuple(ya.shape))
        self.nbytes = (int(np.prod(xa.shape)) + int(np.prod(ya.shape))) * 4
        self.name = f"{PREFIX}{os.getuid()}-{split_digest(root, split)[:32]}-{split}"
        remove_stale_copies(self.dirs)
        self._hold = _locked(self.dirs[0] / f"{self.name}.lock", fcntl.LOCK_SH)
        try:
            with contextlib.closing(_locked(self.dirs[0] / f"{self.name}.create", fcntl.LOCK_EX)):
                self.path = self._find()
                if self.path is None:
                    where = next((d for d in self.dirs if _fits_in_shm(self.nbytes, d)), self.dirs[-1])
                    _decompress(root, group, split, where / f"{self.name}{SUFFIX}")
                    self.path = where / f"{self.name}{SUFFIX}"
            self._map()
        except BaseException:
            self.release()
            raise

    def _find(self) -> Path | None:
        """A copy of this split already on the node that may be mapped; another file of its name is removed
        (the caller holds the create lock), with one line."""
        for d in self.dirs:
            p = d / f"{self.name}{SUFFIX}"
            if not os.path.lexists(p):
                continue
            why = copy_refusal(p, self.nbytes)
            if why is None:
                return p
            print(f"data copies: not using {p}: {why}; making it again", file=sys.stderr, flush=True)
            p.unlink(missing_ok=True)
            _digest_path(p).unlink(missing_ok=True)
        return None

    def _map(self) -> None:
        flags = mmap.MAP_SHARED
        if str(self.path).startswith("/dev/shm"):
            flags |= mmap.MAP_POPULATE  # already in memory: map every page now, not on first touch
        with os.fdopen(os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as fh:
            self._mm = mmap.mmap(fh.fileno(), self.nbytes, flags=flags, prot=mmap.PROT_READ) if self.nbytes else None
        nx = int(np.prod(self.shapes[0]))
        if self._mm is None:
            self.x = np.zeros(self.shapes[0], np.float32)
            self.y = np.zeros(self.shapes[1], np.float32)
        else:
            self.x = np.frombuffer(self._mm, np.float32, nx, 0).reshape(self.shapes[0])
            self.y = np.frombuffer(self._mm, np.float32, int(np.prod(self.shapes[1])), nx * 4).reshape(self.shapes[1])

    def release(self) -> None:
        """Unmap; the last process of the node that holds the copy removes it."""
        self.x = self.y = None
        mm, self._mm = getattr(self, "_mm", None), None
        if mm is not None:
            with contextlib.suppress(BufferError):  # a tensor still refers to it: unmapped when it goes
                mm.close()
        hold, self._hold = getattr(self, "_hold", None), None
        if hold is None:
            return
        with hold:
            try:
                # Only the last holder gets the exclusive lock (a failed attempt drops the shared one).
                fcntl.flock(hold, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
            lock = self.dirs[0] / f"{self.name}.lock"
            if _lock_path_matches(hold, lock):
                _remove_copy(self.name, self.dirs)
                lock.unlink(missing_ok=True)
