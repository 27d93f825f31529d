"""What `virgo-exps` prints: defaults said to be defaults, and no traceback when its reader goes away."""

from __future__ import annotations

import subprocess

from conftest import BIN, sh, tool_env, update_params


def test_params_says_it_lists_defaults_and_what_the_file_changes(repo):
    update_params(repo, {"train": {"lr": 0.0003}})
    out = sh([str(BIN / "virgo-exps"), "params"], repo).stdout
    assert out.startswith("Every key of params.yaml with its DEFAULT value")
    assert "  lr: 0.001  #" in out  # the listing shows the default
    assert "params.yaml here sets" in out and "  train.lr = 0.0003 (default 0.001)" in out


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(repo):
    proc = subprocess.Popen(
        [str(BIN / "virgo-exps"), "params"],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # like `| head -0`: gone before the first line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_run_without_a_git_identity_says_so_before_dvc(repo, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in tool_env().items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"))
    proc = sh([str(BIN / "virgo-exps"), "run"], repo, env, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: git has no user name and email here"), proc.stderr
    assert "$ dvc exp run" not in proc.stdout and "Running stage" not in proc.stdout


def test_run_refuses_params_the_machine_cannot_run_before_dvc(repo):
    update_params(repo, {"train": {"strategy": "ddp", "nodes": 2}})
    proc = sh([str(BIN / "virgo-exps"), "run"], repo, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: train.nodes"), proc.stderr
    assert "$ dvc exp run" not in proc.stdout and "Running stage" not in proc.stdout
