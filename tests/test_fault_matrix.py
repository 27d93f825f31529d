"""State files against damage, each read back by the real next command a user runs (rows of the fault
matrix in docs/threat-model.md): the final snapshot a longer run continues from, its status file and
`version.lock`. Damaged, each is named and passed over or rebuilt; never resumed from, never a traceback,
and the result is the one an undamaged run gives.

The tests share one pipeline run (2 epochs, committed) and restore the committed files after each case.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import BIN, make_repo, sh

pytestmark = pytest.mark.slow


def dvc(repo, *args, check=True):
    return sh([str(BIN / "dvc"), *args], repo, check=check)


def damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: 2 * len(data) // 3]))
    elif how == "garbage line":
        path.write_bytes(b"\x00\xffnot what we wrote\n" + bytes(data))
    elif how == "deleted":
        path.unlink()
    else:
        raise ValueError(how)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("faults") / "repo")
    dvc(repo, "repro")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "results"], repo)
    # The reference: the committed 2-epoch run continued to 3 from its intact snapshot, which equals
    # 3 epochs in one go (tests/test_resume_trust.py).
    out = dvc(repo, "exp", "run", "-S", "train.epochs=3")
    assert "train: resuming from checkpoints/snapshot.pt at epoch 3" in out.stdout + out.stderr, out.stderr[-2000:]
    reference = pd.read_csv(repo / "results" / "epochs.csv")[["epoch", "train_loss", "val_loss"]]
    restore(repo)
    return repo, reference


def restore(repo) -> None:
    sh(["git", "checkout", "-q", "--", "."], repo)
    sh(["git", "status", "--porcelain"], repo)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted"])
def test_a_damaged_final_snapshot_is_never_continued_from(ran, how):
    repo, reference = ran
    try:
        damage(repo / "checkpoints" / "snapshot.pt", how)
        out = dvc(repo, "exp", "run", "-S", "train.epochs=3")
        text = out.stdout + out.stderr
        assert "Traceback" not in text, text[-3000:]
        assert "train: resuming from" not in text and "epoch 1/3:" in text, text[-3000:]
        if how != "deleted":
            line = next(ln for ln in text.splitlines() if "not resuming from checkpoints/snapshot.pt" in ln)
            assert line.endswith("; starting afresh"), line
            assert ("SHA-256" in line or "no checksum" in line) if how != "truncated" else "damaged" in line, line
        got = pd.read_csv(repo / "results" / "epochs.csv")[["epoch", "train_loss", "val_loss"]]
        pd.testing.assert_frame_equal(got, reference)  # afresh, the same result as continuing an intact one
        assert json.loads((repo / "checkpoints" / "status.json").read_text())["status"] == "complete"
    finally:
        restore(repo)


def test_a_damaged_status_file_is_rewritten_and_the_snapshot_still_used(ran):
    """The status file is what a batch script reads to decide on a requeue; the trainer trusts only the
    verified snapshot, and writes the status file again."""
    repo, reference = ran
    try:
        damage(repo / "checkpoints" / "status.json", "garbage line")
        out = dvc(repo, "exp", "run", "-S", "train.epochs=3")
        text = out.stdout + out.stderr
        assert "train: resuming from checkpoints/snapshot.pt at epoch 3" in text, text[-3000:]
        got = pd.read_csv(repo / "results" / "epochs.csv")[["epoch", "train_loss", "val_loss"]]
        pd.testing.assert_frame_equal(got, reference)
        assert json.loads((repo / "checkpoints" / "status.json").read_text())["status"] == "complete"
    finally:
        restore(repo)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted"])
def test_a_damaged_version_lock_is_rewritten_and_nothing_reruns(ran, how):
    repo, _ = ran
    committed = (repo / "version.lock").read_bytes()
    try:
        damage(repo / "version.lock", how)
        out = dvc(repo, "repro")
        text = out.stdout + out.stderr
        assert "Traceback" not in text, text[-3000:]
        assert "environment: wrote version.lock" in text, text[-3000:]
        assert (repo / "version.lock").read_bytes() == committed
        for stage in ("generate", "preprocess", "train", "report"):
            assert f"Running stage '{stage}'" not in text, text[-3000:]
        assert sh(["git", "status", "--porcelain"], repo).stdout == ""
    finally:
        restore(repo)
