"""Damaged data is refused loudly: every zarr chunk and the model file carry a checksum.

One real pipeline run (TINY params) in a temporary repository; then, for a chunk
of data/raw.zarr, a chunk of data/images.zarr and results/model.pt, one byte of
the object in .dvc/cache is flipped the way bit rot does it (same size, same
modification time, so DVC's own bookkeeping trusts it), the workspace file is
checked out again from that object, and the next reader must fail with a message
naming the store, the chunk and the fix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
import zarr

from conftest import make_repo, sh
from virgo_exps.modelfile import CorruptModelError, load_model
from virgo_exps.store import CorruptStoreError, compressors, read, verify_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("integrity") / "repo", {"train": {"epochs": 1}})
    sh(["dvc", "exp", "run"], repo)
    sh("git add -A && git commit -q -m 'pipeline run'", repo)
    return repo


def _cache_object(repo: Path, data: bytes) -> Path:
    md5 = hashlib.md5(data).hexdigest()
    obj = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    assert obj.is_file(), f"no cache object {obj}"
    return obj


def _rewrite_keeping_stat(path: Path, data: bytes) -> None:
    """Write ``data`` into ``path`` in place and give it back its mode and mtime."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as fh:
        fh.write(data)
    os.chmod(path, st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _flip_offset(rel: str, data: bytes) -> int:
    if rel.endswith(".pt"):  # a byte inside the weights of the largest tensor
        state = torch.load(_io(data), map_location="cpu", weights_only=True)["model"]
        big = max(state.values(), key=lambda t: t.numel()).numpy().tobytes()
        start = data.find(big)
        assert start > 0
        return start + len(big) // 2
    return len(data) // 2


def _io(data: bytes):
    import io

    return io.BytesIO(data)


CASES = [
    # (workspace file, store, stage that writes it, the next command that reads it)
    ("data/images.zarr/train/x/c.0.0.0.0", "data/images.zarr", "preprocess", ["-S", "train.seed=1"]),
    ("data/raw.zarr/strain/c.1.0.0", "data/raw.zarr", "generate", ["-S", "preprocess.split_seed=1"]),
]


def test_a_flipped_byte_in_the_weights_of_the_model_file_is_refused_by_its_loader(pipeline):
    """The model file is held by git (no DVC cache object to rot): a flipped bit in its largest tensor, in
    the workspace, is refused by the loader every reader uses, naming the file and the fix."""
    target = pipeline / "results" / "model.pt"
    good = target.read_bytes()
    assert load_model(target)["sha256"]  # the intact file loads
    bad = bytearray(good)
    bad[_flip_offset("results/model.pt", good)] ^= 0x01
    try:
        target.chmod(0o644)
        target.write_bytes(bytes(bad))
        with pytest.raises(CorruptModelError) as err:
            load_model(target)
        msg = str(err.value)
        assert msg.startswith(f"{target}: the model file is damaged (its content does not match its sha256"), msg
        assert "'dvc repro --force --single-item train'" in msg, msg
    finally:
        target.write_bytes(good)
    assert load_model(target)["sha256"]


@pytest.mark.parametrize("rel, store, stage, exp_args", CASES, ids=["images-chunk", "raw-chunk"])
def test_flipped_byte_in_the_cache_fails_the_next_reader(pipeline, rel, store, stage, exp_args):
    repo = pipeline
    target = repo / rel
    good = target.read_bytes()
    if rel.endswith(".pt"):
        assert load_model(target)["sha256"]  # the intact file loads
    else:
        assert verify_store(repo / store) == []
        assert '"crc32c"' in (repo / rel.rsplit("/", 1)[0] / "zarr.json").read_text()
    obj = _cache_object(repo, good)
    lock = (repo / "dvc.lock").read_bytes()
    bad = bytearray(good)
    bad[_flip_offset(rel, good)] ^= 0x01
    try:
        _rewrite_keeping_stat(obj, bytes(bad))
        # a fresh checkout of the output takes the damaged object; DVC notices nothing
        if target.is_symlink() or target.exists():
            target.unlink()
        sh(["dvc", "checkout"], repo)
        assert target.read_bytes() == bytes(bad)
        assert store not in sh(["dvc", "status"], repo).stdout

        if exp_args is None:  # no stage reads the model: its loader must refuse it
            with pytest.raises(CorruptModelError) as err:
                load_model(repo / rel)
            msg = str(err.value)
            assert msg.startswith(f"{repo / rel}: the model file is damaged (its content does not match its sha256")
        else:
            key = rel[len(store) + 1 :]
            assert verify_store(repo / store) == [key]
            proc = sh(["dvc", "exp", "run", *exp_args], repo, check=False)
            assert proc.returncode != 0
            out = proc.stdout + proc.stderr
            # one line from the stage, not a traceback
            msg = next((line for line in out.splitlines() if line.startswith(f"error: {store}: chunk")), "")
            assert "Traceback" not in out, out
            assert f"{store}: chunk {key} is damaged (the crc32c checksum does not match the bytes on disk)" in msg, out
            # the stage that read it wrote no result: the lock file still describes the intact run
            assert (repo / "dvc.lock").read_bytes() == lock
            assert not list((repo / "data").glob("*.partial-*"))
        # the fix is named: the damaged file is DVC's cache object here (or a copy of it)
        assert f"'dvc pull {store if exp_args else repo / rel}'" in msg
        assert f"'dvc repro --force --single-item {stage}'" in msg
        if target.is_symlink():
            assert f"link to DVC's cache object {os.path.realpath(obj)}" in msg
        else:
            assert "'dvc checkout --relink" in msg
    finally:
        _rewrite_keeping_stat(obj, good)
        sh(["git", "checkout", "--", "params.yaml", "results"], repo)  # git holds what the failed run removed
        sh(["dvc", "checkout", "--force"], repo, check=False)
    assert target.read_bytes() == good


def test_a_missing_chunk_of_an_output_is_named_by_verify(pipeline):
    """A chunk file deleted from the workspace's data/images.zarr: `virgo-exps verify` names it (zarr alone
    reads it as zeros), and `dvc checkout` brings it back."""
    repo = pipeline
    target = repo / "data/images.zarr/val/y/c.0.0.0.0"
    good = target.read_bytes()
    try:
        target.unlink()
        proc = sh(["virgo-exps", "verify"], repo, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
        assert "FAIL: data/images.zarr: chunk val/y/c.0.0.0.0 is missing; restore it with" in proc.stderr, proc.stderr
    finally:
        sh(["dvc", "checkout", "--force"], repo, check=False)
    assert target.read_bytes() == good


def test_chunk_files_lie_side_by_side_in_their_array_folder(pipeline):
    """Both stores keep one file per chunk directly in the array's folder (``c.3.0.0``) and no folder per
    chunk index, so a linked checkout (a queued experiment, a sweep task) adds one link per chunk and
    nothing more; the data is in DVC's cache once."""
    for store in ("data/raw.zarr", "data/images.zarr"):
        root = pipeline / store
        chunks = [p for p in root.rglob("c.*")]
        assert chunks and not [p for p in root.rglob("*") if p.is_dir() and p.name == "c"], store
        assert all(p.parent.joinpath("zarr.json").is_file() for p in chunks), store
        assert '"separator": "."' in (chunks[0].parent / "zarr.json").read_text(), store


def test_a_flipped_byte_raises_on_read_and_names_the_chunk(tmp_path):
    """Unit check of the codec itself: zarr's crc32c raises on one flipped bit, and
    read() turns that into one line naming store, chunk and fix."""
    import numpy as np

    root = tmp_path / "s.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    arr = group.create_array("a/x", shape=(8, 3), chunks=(4, 3), dtype="float32", compressors=compressors())
    arr[:] = np.arange(24, dtype=np.float32).reshape(8, 3)
    chunk = root / "a" / "x" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x04
    chunk.write_bytes(bytes(data))
    arr = zarr.open_group(str(root), mode="r")["a/x"]
    np.testing.assert_array_equal(read(arr, root, 0, 4), np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(ValueError, match="checksum"):
        arr[4:8]
    with pytest.raises(CorruptStoreError) as err:
        read(arr, root, 2, 8, stage="generate")
    assert str(err.value).startswith(f"{root}: chunk a/x/c/1/0 is damaged")
    assert "'dvc checkout --relink" in str(err.value) and "dvc repro --force --single-item generate" in str(err.value)
    assert verify_store(root) == ["a/x/c/1/0"]
    shutil.rmtree(root)


def test_a_missing_chunk_file_is_named_not_read_as_zeros(tmp_path):
    """zarr reads a chunk whose file is gone as the fill value (zeros), without a word; our arrays are
    written with every chunk, so a missing one is named by the reader and by verify_store."""
    import numpy as np

    from virgo_exps.store import array_options

    root = tmp_path / "s.zarr"
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    arr = group.create_array("a/x", shape=(8, 3), chunks=(4, 3), dtype="float32", **array_options())
    arr[:4] = np.arange(12, dtype=np.float32).reshape(4, 3)
    arr[4:] = 0.0  # a chunk of the fill value only: written all the same
    assert (root / "a" / "x" / "c.1.0").is_file() and verify_store(root) == []
    (root / "a" / "x" / "c.1.0").unlink()
    arr = zarr.open_group(str(root), mode="r")["a/x"]
    np.testing.assert_array_equal(arr[4:8], np.zeros((4, 3), dtype=np.float32))  # what zarr alone gives
    np.testing.assert_array_equal(read(arr, root, 0, 4), np.arange(12, dtype=np.float32).reshape(4, 3))
    with pytest.raises(CorruptStoreError) as err:
        read(arr, root, 2, 8, stage="preprocess")
    assert str(err.value).startswith(f"{root}: chunk a/x/c.1.0 is missing (the file is gone"), str(err.value)
    assert "dvc repro --force --single-item preprocess" in str(err.value)
    assert verify_store(root) == ["a/x/c.1.0"]
    # cut short (a copy interrupted): its checksum no longer matches
    arr = zarr.open_group(str(root), mode="a")["a/x"]
    arr[4:] = 1.0
    data = (root / "a" / "x" / "c.1.0").read_bytes()
    (root / "a" / "x" / "c.1.0").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStoreError, match=r"chunk a/x/c\.1\.0 is damaged"):
        read(zarr.open_group(str(root), mode="r")["a/x"], root, 0, 8)
    assert verify_store(root) == ["a/x/c.1.0"]
