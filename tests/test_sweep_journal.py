"""A damaged Optuna journal is named, never read as fewer trials or a traceback.

The journal is made by the sweep's own ask and tell (real Optuna); each damage
is then read by the command a user runs, `virgo-exps sweep page`, which must
stop with one line naming the file and the fix (exit 3), and by the next ask
of a continued search.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import BIN, sh, tool_env
from virgo_exps.config import DamagedInputError
from virgo_exps.sweeps import search
from virgo_exps.sweeps import spec as sweep_spec

SPEC = """
name: lr-journal
metric: val_loss
direction: minimize
trials: 6
parallel: 1
seed: 3
parameters:
  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}
"""


@pytest.fixture
def sweep(tmp_path):
    """A team store holding one search sweep with 3 trials asked and 2 told."""
    store = tmp_path / "store"
    (store / "experiments.git").mkdir(parents=True)
    (store / "virgo-share.json").write_text(json.dumps({"group": "users"}))
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(SPEC)
    s = sweep_spec.load(spec_file)
    directory = store / "sweeps" / s.name
    directory.mkdir(parents=True)
    (directory / "sweep.json").write_text(json.dumps({"spec": s.to_dict(), "job_id": None}))
    for n in range(3):
        assert search.ask(s, directory)[0] == n
    search.tell(s, directory, 0, 0.5, "complete")
    search.tell(s, directory, 1, 0.7, "complete")
    return s, store, directory


def page(store, name, tmp_path):
    return sh(
        [str(BIN / "virgo-exps"), "sweep", "page", name, "--store", str(store), "--out", str(tmp_path / "page")],
        tmp_path,
        tool_env(),
        check=False,
    )


def refused(proc) -> str:
    assert proc.returncode == 3, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_an_intact_journal_is_read(sweep):
    s, _, directory = sweep
    assert search.journal_refusal(directory) is None
    trials = search.open_study(s, directory).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "RUNNING"]


def test_a_garbage_line_is_named(sweep, tmp_path):
    s, store, directory = sweep
    journal = directory / "optuna.journal"
    n = len(journal.read_bytes().splitlines())
    with open(journal, "ab") as fh:
        fh.write(b"this is not json\n")
    line = refused(page(store, s.name, tmp_path))
    assert f"{journal}: line {n + 1} is not an Optuna journal record (damaged)" in line, line
    with pytest.raises(DamagedInputError, match="not an Optuna journal record"):
        search.ask(s, directory)  # a continued search asks nothing of a damaged study


def test_a_truncated_journal_is_not_read_as_fewer_trials(sweep, tmp_path):
    s, store, directory = sweep
    journal = directory / "optuna.journal"
    data = journal.read_bytes()
    cut = data[: data.rindex(b"\n", 0, len(data) * 2 // 3) + 1]  # two thirds, at a line's end
    journal.write_bytes(cut)
    line = refused(page(store, s.name, tmp_path))
    assert f"{journal}: {len(cut)} bytes, shorter than the {len(data)} it had" in line, line


def test_a_line_cut_short_and_a_changed_record_are_named(sweep, tmp_path):
    s, store, directory = sweep
    journal = directory / "optuna.journal"
    data = journal.read_bytes()
    journal.write_bytes(data + b'{"op_code": 4, "worker')  # a writer killed in the middle of a record
    assert "its last line is cut short" in refused(page(store, s.name, tmp_path))
    changed = data.replace(b'"op_code":', b'"op_code" :', 1)
    journal.write_bytes(changed + b"\n" * (len(data) - len(changed)))
    assert "changed since they were written" in refused(page(store, s.name, tmp_path))


def test_a_deleted_journal_is_named_not_started_afresh(sweep, tmp_path):
    s, store, directory = sweep
    journal = directory / "optuna.journal"
    journal.unlink()
    line = refused(page(store, s.name, tmp_path))
    assert f"{journal}: missing, but optuna.journal.mark records trials" in line, line
    with pytest.raises(DamagedInputError, match="missing"):
        search.ask(s, directory)  # a continued search does not start numbering again


def test_a_journal_the_team_cannot_read_is_named(sweep):
    """Mode 000, read by a teammate (a member of the folder's group: root reads everything)."""
    import grp
    import os
    import pwd
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import ROOT
    from test_share import User, _open_for_traversal, _user_python

    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("creating a Unix user (useradd, runuser) needs root")
    s, store, directory = sweep
    name = f"vx_mate{os.getpid() % 100000}"
    group = grp.getgrgid(os.stat(directory).st_gid).gr_name
    subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/sh", "--groups", group, name], check=True, capture_output=True
    )
    base = Path(tempfile.mkdtemp(prefix="vx-journal-"))  # a place other users reach (pytest's is root's only)
    opened = _open_for_traversal([sys.prefix, ROOT / "src"])
    try:
        os.chmod(base, 0o755)
        shared = base / "store"
        shutil.copytree(store, shared)  # the store as the team has it: folders 2770, files 0660
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o2770 if path.is_dir() else 0o660)
        journal = shared / "sweeps" / s.name / "optuna.journal"
        journal.chmod(0)
        mate = User(name, Path(pwd.getpwnam(name).pw_dir), base, _user_python(base, name))
        page_dir = str(Path(mate.home) / "page")
        cmd = ["python", "-m", "virgo_exps.cli.main", "sweep", "page", s.name, "--store", str(shared)]
        out = mate.run([*cmd, "--out", page_dir], check=False)
        line = refused(out)
        assert f"{journal}: cannot be read (Permission denied); check its permissions" in line, line
        journal.chmod(0o660)
        journal.parent.chmod(0o2750)  # a sweep folder the team cannot write: no lock file can be made
        line = refused(mate.run([*cmd, "--out", page_dir], check=False))
        assert "optuna.journal.lock: the journal cannot be locked (Permission denied)" in line, line
    finally:
        for folder, mode in reversed(opened):
            os.chmod(folder, mode)
        subprocess.run(["userdel", "--remove", name], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_a_journal_of_a_user_outside_the_team_is_not_read(sweep, tmp_path):
    """Replaced by a file whose owner is not in the group of the sweep's folder (needs root)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("creating a Unix user (useradd) needs root")
    s, store, directory = sweep
    name = f"vx_jnl{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True, capture_output=True)
    try:
        journal = directory / "optuna.journal"
        planted = directory / "planted"
        planted.write_bytes(journal.read_bytes())
        shutil.chown(planted, user=name)
        os.replace(planted, journal)
        line = refused(page(store, s.name, tmp_path))
        assert f"{journal}: not read: it belongs to user {name}, not to the team's group" in line, line
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def test_a_lost_task_is_failed_in_every_record(sweep, tmp_path, monkeypatch):
    """Trial 2's task was cancelled (`scancel`) while it trained: the queue no longer has it (an squeue that
    answers with an empty queue, the stand-in for Slurm here), its record says running, Optuna says
    RUNNING and its MLflow run was left RUNNING. After `sweep status`, all say it failed, and the page
    counts what status counts."""
    import os

    from mlflow.tracking import MlflowClient

    s, store, directory = sweep
    exp = s.experiment(2)
    (directory / "tasks").mkdir()
    task = {"index": 2, "job_id": "77", "trial": 2, "experiment": exp, "state": "running", "overrides": {}}
    task["attempts"] = [{"started": 1000.0, "ended": None, "cores": 2, "gpus": 0}]
    (directory / "tasks" / "2.json").write_text(json.dumps(task))
    record = json.loads((directory / "sweep.json").read_text())
    (directory / "sweep.json").write_text(json.dumps({**record, "job_id": "77"}))
    db = directory / "work" / exp / "mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.create_run(client.create_experiment("virgo-exps"), run_name=exp)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\nexit 0\n")
    (fake / "squeue").chmod(0o755)
    env = tool_env({"PATH": f"{fake}:{os.environ['PATH']}"})
    out = sh([str(BIN / "virgo-exps"), "sweep", "status", s.name, "--store", str(store)], tmp_path, env).stdout
    assert "0 running" in out and "failed: " + exp + " (the task left the queue without finishing)" in out, out
    assert search.open_study(s, directory).trials[2].state.name == "FAIL"
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    page_dir = tmp_path / "page"
    sh([str(BIN / "virgo-exps"), "sweep", "page", s.name, "--store", str(store), "--out", str(page_dir)], tmp_path, env)
    text = (page_dir / "index.html").read_text()
    assert "1 failed, 0 running" in text, text[:2000]


def test_the_trials_mlflow_runs_are_merged_into_the_team_stores_store(sweep, tmp_path):
    """Each trial logged into its clone's own store; `sweep status` merges the finished runs, with their
    params, curves and status, into <store>/mlflow/mlflow.db, once, in the store's group."""
    import grp
    import stat

    from mlflow.tracking import MlflowClient

    s, store, directory = sweep
    made = {}
    for number, status in ((0, "FINISHED"), (1, "FINISHED"), (2, "RUNNING")):
        exp = s.experiment(number)
        db = directory / "work" / exp / "mlflow" / "mlflow.db"
        db.parent.mkdir(parents=True)
        client = MlflowClient(tracking_uri=f"sqlite:///{db}")
        run = client.create_run(client.create_experiment("virgo-exps"), run_name=exp)
        client.log_param(run.info.run_id, "train.lr", str(0.01 * (number + 1)))
        for epoch in (1, 2, 3):
            client.log_metric(run.info.run_id, "val_loss", 1.0 / (epoch + number), step=epoch)
        child = client.create_run(run.info.experiment_id, run_name=f"{exp}-rank0", tags={"mlflow.parentRunId": "x"})
        client.set_terminated(child.info.run_id)
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status=status)
        made[exp] = run.info.run_id
    cmd = [str(BIN / "virgo-exps"), "sweep", "status", s.name, "--store", str(store)]
    out = sh(cmd, tmp_path, tool_env()).stdout
    uri = f"sqlite:///{store / 'mlflow' / 'mlflow.db'}"
    assert f"MLflow: the finished trials in {uri} (experiment sweep-{s.name})" in out, out
    sh(cmd, tmp_path, tool_env())  # a second status merges nothing twice
    team = MlflowClient(tracking_uri=uri)
    runs = team.search_runs([team.get_experiment_by_name(f"sweep-{s.name}").experiment_id])
    assert sorted(r.info.run_name for r in runs) == [s.experiment(0), s.experiment(1)]  # no rank runs, none running
    for r in runs:
        number = int(r.data.tags["trial"])
        assert r.info.status == "FINISHED" and r.data.tags["sweep"] == s.name
        assert r.data.params["train.lr"] == str(0.01 * (number + 1))
        curve = team.get_metric_history(r.info.run_id, "val_loss")
        assert [(m.step, m.value) for m in curve] == [(e, 1.0 / (e + number)) for e in (1, 2, 3)]
    folder = store / "mlflow"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2770 and folder.stat().st_gid == grp.getgrnam("users").gr_gid
    assert stat.S_IMODE((folder / "mlflow.db").stat().st_mode) == 0o660
