"""One copy of a split per node: the ranks of a node map one decompressed file, and
the file goes when the job ends, whether it ends normally, fails or is killed.

The jobs are the train stage as DVC runs it (launcher, real torchrun, 2 DDP ranks
on CPU) on a store in the preprocess stage's layout; the node's folder for copies
is a temporary one (``VIRGO_NODE_DATA``) so that other runs on this machine do not
show up in it. Which processes map the copy is read from ``/proc/<pid>/maps``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_repo, mappings_of, tool_env, train_stage_cmd, wait_until, write_images
from virgo_exps.train.data import ImageDataset
from virgo_exps.train.nodecopy import PREFIX, split_digest


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("shared") / "repo")
    write_images(repo / "data" / "images.zarr", seed=7)
    return repo


def start(repo: Path, name: str, node: Path, env: dict | None = None, epochs: int = 2) -> subprocess.Popen:
    """The train stage with 2 DDP ranks, its own process group (so that a test can kill all of it)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(
        strategy="ddp", procs_per_node=2, epochs=epochs, global_batch_size=8, warmup_steps=2, profile_steps=2
    )
    (repo / f"params-{name}.yaml").write_text(yaml.safe_dump(params))
    cmd = train_stage_cmd(f"params-{name}.yaml", f"out/{name}")
    full_env = tool_env({"VIRGO_NODE_DATA": str(node), **(env or {})})
    return subprocess.Popen(
        cmd, cwd=repo, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def mappings(node: Path) -> dict[int, set[tuple[int, str]]]:
    """Per process of this machine, the (inode, path) of the files under ``node`` it maps."""
    found: dict[int, set[tuple[int, str]]] = {}
    for pid, inode, path in mappings_of(str(node) + "/"):
        found.setdefault(pid, set()).add((inode, path))
    return found


def copies(node: Path) -> list[str]:
    """The files of this user's folder for data copies under ``node`` (virgo_exps.train.nodecopy.private_dir)."""
    mine = node / f"{PREFIX}{os.getuid()}"
    return sorted(p.name for p in mine.iterdir() if p.name.startswith(PREFIX)) if mine.is_dir() else []


def train_maps(node: Path) -> dict[int, set[tuple[int, str]]]:
    return {pid: {m for m in ms if "-train.f32" in m[1]} for pid, ms in mappings(node).items()}


def gone(pid: int) -> bool:
    """Whether a process has ended (its files closed: no process or a zombie)."""
    try:
        return "\tZ" in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
    except (OSError, IndexError):
        return True


def unlocked(node: Path) -> bool:
    """Whether no process holds a lock on a copy under ``node`` (each lock can be taken exclusively)."""
    for lock in node.glob(f"{PREFIX}*/{PREFIX}*.lock"):
        with open(lock, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False
            fcntl.flock(fh, fcntl.LOCK_UN)
    return True


def two_ranks(node: Path) -> dict[int, set[tuple[int, str]]] | None:
    """What each process maps of the training split's copy, once 2 processes map it."""
    found = {pid: ms for pid, ms in train_maps(node).items() if ms}
    return found if len(found) == 2 else None


@pytest.mark.slow
def test_two_ranks_map_one_copy_which_goes_with_the_job(project, tmp_path):
    node = tmp_path / "node"
    proc = start(project, "normal", node, env={"VIRGO_FAULT_STEP_SLEEP": "0.2"})
    try:
        both = wait_until(lambda: two_ranks(node), 300, "2 ranks mapping the training split")
        # two processes, one inode: one copy of the training split on the node
        assert len({m for ms in both.values() for m in ms}) == 1, both
        train_file = next(iter(next(iter(both.values()))))[1]
        assert [n for n in copies(node) if n.endswith("-train.f32")] == [Path(train_file).name]
        size = os.path.getsize(train_file)
        assert size == 64 * (3 + 1) * 16 * 16 * 4  # x and y of the 64 training samples, float32, once
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, output[-3000:]
    assert copies(node) == [], "the copy outlived the job"


@pytest.mark.slow
def test_a_job_whose_rank_raises_removes_its_copy(project, tmp_path):
    node = tmp_path / "node"
    proc = start(project, "crash", node, env={"VIRGO_FAULT_CRASH": "1:3"})
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "training process rank 1 failed" in output, output[-3000:]
    assert copies(node) == [], "the copy outlived the failed job"


@pytest.mark.slow
def test_a_killed_job_leaves_a_copy_that_the_next_start_removes(project, tmp_path):
    node = tmp_path / "node"
    proc = start(project, "killed", node, env={"VIRGO_FAULT_STEP_SLEEP": "0.5"})
    try:
        ranks = wait_until(lambda: two_ranks(node), 300, "2 ranks mapping the training split")
        for pid in ranks:  # torchrun starts its ranks in sessions of their own: each is killed by its pid
            os.kill(pid, signal.SIGKILL)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    wait_until(lambda: all(gone(pid) for pid in ranks), 60, "the killed ranks to be gone")
    # A killed rank's main thread can show as a zombie while its other threads still exit and keep its
    # files (and so its locks) open: wait until the kernel has released every lock of the job.
    wait_until(lambda: unlocked(node), 60, "the killed job's locks to be released")
    stale = [n for n in copies(node) if n.endswith(".f32")]
    assert any(n.endswith("-train.f32") for n in stale), copies(node)  # SIGKILL: no chance to clean up
    # The next start on this node, here of another store, removes what nobody maps any more.
    other = tmp_path / "other.zarr"
    write_images(other, seed=8)
    with ImageDataset(other, "train", node_dir=node) as ds:
        stem = ds.copy_path.stem
        assert copies(node) == sorted([ds.copy_path.name, f"{stem}.create", f"{stem}.lock", f"{stem}.sha256"])
    assert copies(node) == []


def test_the_copy_holds_the_split_and_is_named_by_its_content(tmp_path):
    import zarr

    store = tmp_path / "images.zarr"
    write_images(store, seed=3)
    node = tmp_path / "node"
    first = split_digest(store, "train")
    with ImageDataset(store, "train", node_dir=node) as a, ImageDataset(store, "train", node_dir=node) as b:
        assert os.stat(a.copy_path).st_ino == os.stat(b.copy_path).st_ino
        group = zarr.open_group(str(store), mode="r")
        assert np.array_equal(a.x.numpy(), group["train/x"][:]) and np.array_equal(b.y.numpy(), group["train/y"][:])
        x, y = a.batch([5, 0, 63])
        assert np.array_equal(x.numpy(), group["train/x"][[5, 0, 63]])
        maps = [ln.split() for ln in Path("/proc/self/maps").read_text().splitlines() if str(a.copy_path) in ln]
        assert maps and {m[1] for m in maps} == {"r--s"}  # mapped shared and read-only, both data sets
    assert copies(node) == []
    # One value changed: another digest, so a copy of the old content is never mapped for the new.
    group = zarr.open_group(str(store), mode="r+")
    x = group["train/x"][:]
    x[10, 0, 0, 0] += 1
    group["train/x"][:] = x
    assert split_digest(store, "train") != first
    with ImageDataset(store, "train", node_dir=node) as c:
        assert c.x[10, 0, 0, 0].item() == x[10, 0, 0, 0]
