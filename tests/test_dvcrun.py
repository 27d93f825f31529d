"""The one dvc runner, against the real dvc of the venv."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from virgo_exps import dvcrun

BIN = Path(sys.executable).parent


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "test")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "test@example.invalid")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    path = tmp_path / "repo"
    path.mkdir()
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=path, check=True)
    dvcrun.run(["init", "-q"], path)
    return path


def test_the_dvc_beside_the_running_python_is_used():
    assert (BIN / "dvc").exists(), "the venv has dvc"
    assert dvcrun.executable() == str(BIN / "dvc")


def test_a_failure_is_one_line_with_dvcs_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    with pytest.raises(dvcrun.DvcError) as err:
        dvcrun.run(["status"], tmp_path)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"`dvc status` failed in {tmp_path} (exit code ")
    assert "ERROR" in text and "not inside of a DVC repository" in text
    proc = dvcrun.run(["status"], tmp_path, check=False)
    assert proc.returncode != 0 and dvcrun.message(proc) in text


def test_output_is_captured(repo):
    proc = dvcrun.run(["config", "core.autostage", "true"], repo)
    assert proc.returncode == 0
    assert dvcrun.run(["config", "core.autostage"], repo).stdout.strip() == "true"


def test_a_stage_of_an_inner_dvc_does_not_see_the_outer_run(repo, monkeypatch):
    """Started from a stage of another repository's run, dvc must give its stages its own root and no
    experiment name of the outer run; their `python` is ours even when our venv is not on PATH."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    (repo / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: (env | grep ^DVC_; echo PYTHON=$(command -v python)) > seen.txt\n"
        "    outs:\n      - seen.txt\n"
    )
    outer = repo.parent / "outer"
    monkeypatch.setenv("DVC_ROOT", str(outer))
    monkeypatch.setenv("DVC_EXP_NAME", "outer-exp")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0" * 40)
    monkeypatch.setenv("DVC_STAGE", "train")
    dvcrun.run(["repro", "-q"], repo)
    seen = dict(line.split("=", 1) for line in (repo / "seen.txt").read_text().splitlines())
    assert Path(seen["DVC_ROOT"]) == repo
    assert seen["DVC_STAGE"] == "probe"
    assert "DVC_EXP_NAME" not in seen and "DVC_EXP_BASELINE_REV" not in seen
    assert seen["PYTHON"] == str(BIN / "python"), "a stage's `python` is the venv's"
    assert os.environ["DVC_EXP_NAME"] == "outer-exp", "the caller's own environment is left alone"


def test_a_command_past_its_timeout_is_stopped(repo):
    with pytest.raises(dvcrun.DvcError, match=r"^`dvc exp show --json` did not finish within 0.01 s in "):
        dvcrun.run(["exp", "show", "--json"], repo, timeout=0.01)


def test_no_dvc_anywhere_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(dvcrun.DvcError, match=r"^cannot run dvc \(dvc\): No such file or directory$"):
        dvcrun.run(["version"], tmp_path)


def test_stream_echoes_the_command_and_returns_the_exit_code(repo, capfd):
    assert dvcrun.stream(["exp", "apply", "no-such-exp"], repo) != 0
    assert dvcrun.stream(["config", "core.autostage", "false"], repo) == 0
    out = capfd.readouterr()
    assert "$ dvc exp apply no-such-exp\n" in out.out and "$ dvc config core.autostage false\n" in out.out
    assert out.err.startswith("ERROR: "), "dvc's own message reaches the terminal"
