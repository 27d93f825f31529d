"""State files against damage, each read back by the real next command a user runs (rows of the fault
matrix in docs/threat-model.md): the final snapshot a longer run continues from, its status file and
`version.lock`. Damaged, each is named and passed over or rebuilt; never resumed from, never a traceback,
and the result is the one an undamaged run gives.

Two damages need real Unix users (root, ``useradd``, ``runuser``): a file replaced by another user's (the
same bytes, their file: what a user who can write the folder leaves there), and a file its owner cannot
read (run as that owner: root reads everything).

The tests share one pipeline run (2 epochs, committed) and restore the committed files after each case.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import BIN, make_repo, sh
from virgo_exps.experiments.verify_checks import dvc_md5

pytestmark = pytest.mark.slow

OTHER = "another user's file"


def dvc(repo, *args, check=True):
    return sh([str(BIN / "dvc"), *args], repo, check=check)


@pytest.fixture(scope="module")
def other_user():
    """A Unix user who is not the one running the pipeline, nor in its group."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("creating Unix users (useradd, runuser) needs root")
    name = f"vx_other{os.getpid() % 100000}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def damage(path, how: str, request=None) -> None:
    data = bytearray(path.read_bytes())
    if how == OTHER:  # the same bytes under the same name, but another user's file
        planted = path.with_name(path.name + ".planted")
        planted.write_bytes(bytes(data))
        shutil.chown(planted, user=request.getfixturevalue("other_user"))
        os.replace(planted, path)
        return
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
    sh(["chown", "-R", f"{os.geteuid()}:{os.getegid()}", str(repo)], repo)  # git keeps a same-content file as it is
    sh(["git", "status", "--porcelain"], repo)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted", OTHER])
def test_a_damaged_final_snapshot_is_never_continued_from(ran, how, request):
    repo, reference = ran
    try:
        damage(repo / "checkpoints" / "snapshot.pt", how, request)
        out = dvc(repo, "exp", "run", "-S", "train.epochs=3")
        text = out.stdout + out.stderr
        assert "Traceback" not in text, text[-3000:]
        assert "train: resuming from" not in text and "epoch 1/3:" in text, text[-3000:]
        if how != "deleted":
            line = next(ln for ln in text.splitlines() if "not resuming from checkpoints/snapshot.pt" in ln)
            assert line.endswith("; starting afresh"), line
            if how == OTHER:
                assert "belongs to user vx_other" in line and "read only when it is yours" in line, line
            else:
                assert ("SHA-256" in line or "no checksum" in line) if how != "truncated" else "damaged" in line, line
        got = pd.read_csv(repo / "results" / "epochs.csv")[["epoch", "train_loss", "val_loss"]]
        pd.testing.assert_frame_equal(got, reference)  # afresh, the same result as continuing an intact one
        assert json.loads((repo / "checkpoints" / "status.json").read_text())["status"] == "complete"
    finally:
        restore(repo)


class _RunsCode:
    """What a planted snapshot could hold: an object whose unpickling runs a command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_snapshot_that_would_run_code_is_refused_even_with_a_matching_checksum(ran, tmp_path):
    """The checksum is not a secret: anyone who can write the file can write a matching one. What makes a
    planted snapshot harmless is that loading it builds tensors and plain values only."""
    import hashlib
    import io

    import torch

    from virgo_exps.train.snapshots import SNAPSHOT_MAGIC

    repo, reference = ran
    marker = tmp_path / "the-code-ran"
    buffer = io.BytesIO()
    torch.save({"epoch": 2, "step_in_epoch": 0, "payload": _RunsCode(marker)}, buffer)
    payload = buffer.getvalue()
    try:
        (repo / "checkpoints" / "snapshot.pt").write_bytes(
            SNAPSHOT_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
        )
        out = dvc(repo, "exp", "run", "-S", "train.epochs=3")
        text = out.stdout + out.stderr
        assert not marker.exists(), "loading the snapshot ran its code"
        line = next(ln for ln in text.splitlines() if "not resuming from checkpoints/snapshot.pt" in ln)
        assert "it holds more than tensors and plain values" in line and line.endswith("starting afresh"), line
        got = pd.read_csv(repo / "results" / "epochs.csv")[["epoch", "train_loss", "val_loss"]]
        pd.testing.assert_frame_equal(got, reference)
    finally:
        restore(repo)


def test_state_files_their_owner_cannot_read_are_named_by_the_next_command(ran, other_user, tmp_path):
    """Unreadable (mode 000) to the user who runs the pipeline, in their own checkout: DVC names the final
    snapshot before any stage runs, version.lock is written again, and the report stage names metrics.json;
    never a traceback, and nothing changed that was not asked for."""
    import sys

    from conftest import ROOT
    from test_share import User, _open_for_traversal, _user_python

    repo, reference = ran
    opened = _open_for_traversal([tmp_path / "x", sys.prefix, ROOT / "src"])
    try:
        os.chmod(tmp_path, 0o755)
        copy, home = tmp_path / "repo", tmp_path / "home"
        shutil.copytree(repo, copy, symlinks=True)
        home.mkdir()
        for path in (copy, home):
            sh(["chown", "-R", f"{other_user}:", str(path)], tmp_path)
        user = User(other_user, home, copy, _user_python(tmp_path, other_user))

        def unreadable(rel: str, cmd: list[str]) -> str:
            (copy / rel).chmod(0)
            out = user.run(cmd, check=False)
            text = out.stdout + out.stderr
            assert "Traceback" not in text, text[-3000:]
            return text

        # DVC hashes the outputs it tracks before any stage runs: it refuses with one line naming the file,
        # and changes nothing.
        text = unreadable("checkpoints/snapshot.pt", ["dvc", "exp", "run", "-S", "train.epochs=3"])
        said = [ln for ln in text.splitlines() if ln.startswith("ERROR")]
        assert len(said) == 1 and "Permission denied" in said[0] and "checkpoints/snapshot.pt" in said[0], text
        (copy / "checkpoints" / "snapshot.pt").chmod(0o644)
        assert user.run(["git", "status", "--porcelain"]).stdout == ""

        text = unreadable("version.lock", ["dvc", "repro", "environment"])
        assert "environment: version.lock: it cannot be read (Permission denied); writing it again" in text, text
        # The same environment, but for the interpreter: the test user may run another build of this Python.
        same = [ln for ln in (copy / "version.lock").read_text().splitlines() if not ln.startswith("python:")]
        assert same == [ln for ln in (repo / "version.lock").read_text().splitlines() if not ln.startswith("python:")]

        text = unreadable("results/metrics.json", ["dvc", "repro", "--force", "--single-item", "report"])
        assert "error: results/metrics.json: cannot be read (Permission denied)" in text, text[-3000:]
    finally:
        for folder, mode in reversed(opened):
            os.chmod(folder, mode)
        uid = __import__("pwd").getpwnam(other_user).pw_uid
        for leftover in Path("/dev/shm").glob(f"virgo-data-{uid}*"):
            shutil.rmtree(leftover, ignore_errors=True)


# The trainer never reads the status file (only a batch script does, for one value): two damages suffice.
@pytest.mark.parametrize("how", ["garbage line", OTHER])
def test_a_damaged_status_file_is_rewritten_and_the_snapshot_still_used(ran, how, request):
    """The status file is what a batch script reads to decide on a requeue; the trainer trusts only the
    verified snapshot, and writes the status file again (as the user's own)."""
    repo, reference = ran
    try:
        damage(repo / "checkpoints" / "status.json", how, request)
        out = dvc(repo, "exp", "run", "-S", "train.epochs=3")
        text = out.stdout + out.stderr
        assert "train: resuming from checkpoints/snapshot.pt at epoch 3" in text, text[-3000:]
        got = pd.read_csv(repo / "results" / "epochs.csv")[["epoch", "train_loss", "val_loss"]]
        pd.testing.assert_frame_equal(got, reference)
        assert json.loads((repo / "checkpoints" / "status.json").read_text())["status"] == "complete"
        assert (repo / "checkpoints" / "status.json").stat().st_uid == os.geteuid()
    finally:
        restore(repo)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted", OTHER])
def test_a_damaged_version_lock_is_rewritten_and_nothing_reruns(ran, how, request):
    repo, _ = ran
    committed = (repo / "version.lock").read_bytes()
    try:
        damage(repo / "version.lock", how, request)
        out = dvc(repo, "repro")
        text = out.stdout + out.stderr
        assert "Traceback" not in text, text[-3000:]
        assert "environment: wrote version.lock" in text, text[-3000:]
        assert (repo / "version.lock").read_bytes() == committed
        assert (repo / "version.lock").stat().st_uid == os.geteuid()
        if how == OTHER:
            assert "environment: version.lock: it belongs to user vx_other" in text, text[-3000:]
        for stage in ("generate", "preprocess", "train", "report"):
            assert f"Running stage '{stage}'" not in text, text[-3000:]
        assert sh(["git", "status", "--porcelain"], repo).stdout == ""
    finally:
        restore(repo)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted", OTHER])
def test_a_damaged_metrics_file_is_named_by_the_report_stage_and_verify(ran, how, request):
    repo, _ = ran
    try:
        damage(repo / "results" / "metrics.json", how, request)
        out = dvc(repo, "repro", "--force", "--single-item", "report", check=False)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "Traceback" not in text, text[-3000:]
        said = {"deleted": "cannot be read (No such file or directory)", OTHER: "not read: it belongs to user vx_other"}
        said = said.get(how, "not a metrics file (not JSON")
        assert f"error: results/metrics.json: {said}" in text, text[-3000:]
        checked = sh([str(BIN / "virgo-exps"), "verify"], repo, check=False)
        assert checked.returncode == 1 and "Traceback" not in checked.stdout + checked.stderr, checked.stderr
        assert "FAIL: results/metrics.json" in checked.stderr or how == "deleted", checked.stderr
    finally:
        restore(repo)


# -- a data stage killed at several points -----------------------------------------------------------------

BIGGER = {"generate": {"n_samples": 192, "chunk_size": 16}}


def files_under(pattern: str, repo) -> int:
    return sum(1 for folder in repo.glob(pattern) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("kills") / "repo", BIGGER)
    dvc(repo, "repro", "preprocess")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "data"], repo)
    return repo


def lock_md5(repo, stage: str) -> str:
    import yaml

    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["outs"][0]["md5"]


@pytest.mark.parametrize("stage,out", [("generate", "data/raw.zarr"), ("preprocess", "data/images.zarr")])
@pytest.mark.parametrize("point", ["its first chunk written", "half its chunks written"])
def test_a_data_stage_killed_while_it_writes_reruns_to_the_same_bytes(data_repo, stage, out, point):
    """`dvc repro` killed (SIGKILL to its process group, as a lost login session) while the stage writes its
    store: nothing half-written is published or left behind, and the rerun writes the very same bytes."""
    import signal

    from conftest import tool_env, wait_until

    repo = data_repo
    want = lock_md5(repo, stage)
    total = files_under(out, repo)
    need = 1 if point.startswith("its first") else max(2, total // 2)
    proc = subprocess.Popen(
        [str(BIN / "dvc"), "repro", "--force", "-s", stage],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: files_under(f"{out}.partial-*", repo) >= need, 300, f"{need} file(s) of {out}", 0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    def running_here() -> list[int]:  # the killed run's processes, until they have exited (zombies aside)
        import psutil

        found = []
        for proc_ in psutil.process_iter(["cwd", "status"]):
            if (proc_.info["cwd"] or "").startswith(str(repo)) and proc_.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc_.pid)
        return found

    wait_until(lambda: not running_here(), 60, "the killed run's processes to exit")
    published = repo / out
    if published.exists():  # DVC removes the output before a forced run; if one is there, it is whole
        files = [(p.relative_to(published).as_posix(), p.read_bytes()) for p in published.rglob("*") if p.is_file()]
        assert dvc_md5(files) == want
    again = dvc(repo, "repro", "--force", "-s", stage)
    assert "Traceback" not in again.stdout + again.stderr
    assert lock_md5(repo, stage) == want
    assert not list(repo.glob(f"{out}.partial-*")), list(repo.glob(f"{out}.partial-*"))  # the killed run's: gone
    assert sh(["git", "status", "--porcelain"], repo).stdout == ""
    status = dvc(repo, "status", "--json").stdout
    assert stage not in status, status


def test_a_partial_store_of_a_dead_or_zombie_writer_is_removed_and_a_live_ones_kept(tmp_path):
    """A killed stage whose parent died too stays a zombie until init reaps it (in some containers, a long
    while): it writes nothing more, so its partial store goes; a running writer's stays."""
    import sys

    from conftest import wait_until
    from virgo_exps import store

    out = tmp_path / "raw.zarr"
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", 30, "a zombie")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid in (zombie.pid, live.pid, 2**22 + 1):  # the last: no such process
            (tmp_path / f"raw.zarr.partial-{pid}").mkdir()
        removed = sorted(p.name for p in store.remove_stale_partials(out))
        assert removed == sorted([f"raw.zarr.partial-{zombie.pid}", f"raw.zarr.partial-{2**22 + 1}"])
        assert (tmp_path / f"raw.zarr.partial-{live.pid}").is_dir()
    finally:
        live.kill()
        live.wait()
        zombie.wait()


# -- the team store's and a sweep's records ----------------------------------------------------------------


@pytest.fixture(scope="module")
def store_repo(tmp_path_factory):
    import grp

    base = tmp_path_factory.mktemp("records")
    repo = make_repo(base / "repo")
    group = grp.getgrgid(os.getgid()).gr_name
    sh([str(BIN / "virgo-exps"), "share", "--dir", str(base / "store"), "--group", group], repo)
    return repo, base / "store", group


def a_grid_sweep(store, name: str) -> object:
    """A sweep folder as `sweep submit` and two array tasks leave it: task 0 done, task 1 done."""
    from virgo_exps.sweeps import spec as sweep_spec

    spec = sweep_spec.from_grid(name, ["train.lr=0.001,0.002"], parallel=1)
    folder = store / "sweeps" / name
    (folder / "tasks").mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"spec": spec.to_dict(), "job_id": None}))
    for index in (0, 1):
        record = {"index": index, "trial": index, "experiment": f"{name}-00{index}", "job_id": None}
        record.update(overrides=spec.grid[index], state="done", metric=0.5 + index, exit_code=0)
        (folder / "tasks" / f"{index}.json").write_text(json.dumps(record))
    return folder


def sweep_status(repo, store, name: str):
    return sh([str(BIN / "virgo-exps"), "sweep", "status", name, "--store", str(store)], repo, check=False)


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", OTHER])
def test_a_damaged_task_record_is_a_failed_trial_named_with_its_fix(store_repo, how, request):
    repo, store, _ = store_repo
    name = "tasks-" + how.replace(" ", "-").replace("'", "")
    folder = a_grid_sweep(store, name)
    damage(folder / "tasks" / "1.json", how, request)
    out = sweep_status(repo, store, name)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Traceback" not in text, text[-3000:]
    assert "2 trials: 1 done, 0 running, 0 pending, 1 failed" in out.stdout, out.stdout
    assert f"{folder / 'tasks' / '1.json'} is damaged (" in out.stdout and "run it again" in out.stdout, out.stdout
    assert f"best so far: {name}-000" in out.stdout  # the damaged one is never a result


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted", OTHER])
def test_a_damaged_sweep_record_is_named_in_one_line(store_repo, how, request):
    repo, store, _ = store_repo
    name = "record-" + how.replace(" ", "-").replace("'", "")
    folder = a_grid_sweep(store, name)
    damage(folder / "sweep.json", how, request)
    out = sweep_status(repo, store, name)
    text = out.stdout + out.stderr
    assert out.returncode in (2, 3) and "Traceback" not in text, text[-3000:]
    said = "no sweep.json; not a sweep dir" if how == "deleted" else "sweep.json: not a sweep record ("
    assert len(out.stderr.strip().splitlines()) == 1 and said in out.stderr, out.stderr


@pytest.mark.parametrize("how", ["flipped byte", "truncated", "garbage line", "deleted", OTHER])
def test_a_damaged_store_marker_is_named_and_share_writes_it_again(store_repo, how, request):
    repo, store, group = store_repo
    name = "marker-" + how.replace(" ", "-").replace("'", "")
    a_grid_sweep(store, name)
    marker = store / "virgo-share.json"
    kept = marker.read_bytes()
    damage(marker, how, request)
    out = sweep_status(repo, store, name)
    text = out.stdout + out.stderr
    assert out.returncode in (2, 3) and "Traceback" not in text, text[-3000:]
    if how == "deleted":
        assert f"--store {store}: not a team store (no virgo-share.json)" in out.stderr, out.stderr
    else:
        assert "virgo-share.json: the team store's marker is damaged (" in out.stderr, out.stderr
    again = sh([str(BIN / "virgo-exps"), "share", "--dir", str(store), "--group", group], repo)
    if how != "deleted":
        assert "virgo-share.json (it was damaged: written again)" in again.stdout, again.stdout
    assert json.loads(marker.read_bytes())["group"] == json.loads(kept)["group"]
    assert sweep_status(repo, store, name).returncode == 0
