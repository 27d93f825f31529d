"""The node's data copies against other users of the node (docs/threat-model.md).

The victim is this test process (the trainer's ImageDataset, in-process); the
others are real Unix users made with ``useradd``, acting through ``runuser``
with plain shell commands in a world-writable sticky folder like /dev/shm:
one tries to read a copy while it is mapped, one plants files and folders
under the names the trainer uses. The trainer must map only what it made, and
what it made must be unreadable by them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import write_images
from virgo_exps.train.data import ImageDataset
from virgo_exps.train.nodecopy import PREFIX

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"),
    reason="creating Unix users (useradd, runuser) needs root",
)


@pytest.fixture(scope="module")
def others():
    """Two users who are not the trainer: a reader and a planter."""
    tag = f"{os.getpid() % 100000}"
    names = [f"vx_read{tag}", f"vx_plant{tag}"]
    made = []
    try:
        for name in names:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
            made.append(name)
        yield names
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)


def as_user(user: str, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", "sh", "-c", script], capture_output=True, text=True, cwd="/")


@pytest.fixture
def shared(tmp_path):
    """A folder like /dev/shm that every user reaches: anyone may create files, nobody may remove another's
    (mode 1777), under /dev/shm itself where it exists."""
    where = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else "/tmp"
    base = Path(tempfile.mkdtemp(prefix="virgo-tests-shared-", dir=where))
    os.chmod(base, 0o1777)
    store = tmp_path / "images.zarr"
    write_images(store, seed=11)
    try:
        yield base, store
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_copy_is_owner_only_whatever_the_umask(others, shared):
    reader, _ = others
    base, store = shared
    old = os.umask(0o002)  # the umask the README recommends for teams
    try:
        with ImageDataset(store, "train", node_dir=base) as ds:
            path = ds.copy_path
            assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            for p in path.parent.iterdir():
                assert not stat.S_IMODE(p.lstat().st_mode) & 0o077, p
            proc = as_user(reader, f"ls '{base}' && cat '{path}' > /dev/null")
            assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
            assert path.parent.name in proc.stdout  # the shared folder itself was readable: the copy's was not
    finally:
        os.umask(old)


def test_files_planted_under_the_trainers_names_are_never_mapped(others, shared, capfd, tmp_path):
    _, planter = others
    base, store = shared
    uid = os.getuid()
    with ImageDataset(store, "train", node_dir=tmp_path / "elsewhere") as ds:  # the names and the true data
        truth_x, truth_y = ds.x.numpy().copy(), ds.y.numpy().copy()
        name, nbytes = ds.copy_path.name, ds.copy_path.stat().st_size
    # The attack of the report: same names and sizes, all 7.0, in the shared folder itself, and a folder
    # under the name of the trainer's own folder, and a link under the next name.
    sevens = np.full(nbytes // 4, 7.0, np.float32).tobytes()
    (base / "sevens").write_bytes(sevens)
    os.chmod(base / "sevens", 0o644)
    mine = f"{PREFIX}{uid}"
    script = (
        f"cd '{base}' && cp sevens '{name}' && mkdir -m 777 '{mine}' && cp sevens '{mine}/{name}' "
        f"&& mkdir -m 777 own && ln -s own '{mine}.1'"
    )
    proc = as_user(planter, script)
    assert proc.returncode == 0, proc
    capfd.readouterr()
    with ImageDataset(store, "train", node_dir=base) as ds:
        assert np.array_equal(ds.x.numpy(), truth_x) and np.array_equal(ds.y.numpy(), truth_y)
        assert ds.copy_path.parent == base / f"{mine}.2"
        assert ds.copy_path.stat().st_uid == uid
    err = capfd.readouterr().err
    assert f"ignoring {base / mine}: a folder of uid" in err, err
    assert f"ignoring {base / (mine + '.1')}: a link of uid" in err, err


def test_a_damaged_copy_of_ours_is_made_again(shared, capfd):
    base, store = shared
    with ImageDataset(store, "train", node_dir=base) as holder:
        truth = holder.x.numpy().copy()
        path = holder.copy_path
        with open(path, "r+b") as fh:  # one value changed, size unchanged (a stray write, bit rot)
            fh.seek(100)
            fh.write(np.float32(7.0).tobytes())
        capfd.readouterr()
        with ImageDataset(store, "train", node_dir=base) as again:
            assert np.array_equal(again.x.numpy(), truth)
        err = capfd.readouterr().err
        assert f"not using {path}: its content does not match its SHA-256 record; making it again" in err, err


def test_a_copy_without_its_digest_record_is_made_again(shared, capfd):
    base, store = shared
    with ImageDataset(store, "train", node_dir=base) as holder:
        record = holder.copy_path.with_suffix(".sha256")
        record.unlink()
        capfd.readouterr()
        with ImageDataset(store, "train", node_dir=base) as again:
            assert np.array_equal(again.x.numpy(), holder.x.numpy())
        assert "its SHA-256 record is missing; making it again" in capfd.readouterr().err
        assert record.is_file()


def test_a_truncated_copy_of_ours_is_made_again(shared, capfd):
    base, store = shared
    with ImageDataset(store, "train", node_dir=base) as holder:
        truth = holder.x.numpy().copy()
        path = holder.copy_path
        size = path.stat().st_size
        os.truncate(path, size // 2)  # a copy cut short (a full /dev/shm while it was written)
        capfd.readouterr()
        with ImageDataset(store, "train", node_dir=base) as again:
            assert np.array_equal(again.x.numpy(), truth)
            assert again.copy_path.stat().st_size == size
        err = capfd.readouterr().err
        assert f"not using {path}" in err and "making it again" in err, err
