"""Inputs with bounds, refused by the first stage before DVC touches anything.

Each case runs the real command a user runs (`virgo-exps check`, or `dvc repro`
of the pipeline) and reads its one-line refusal.
"""

from __future__ import annotations

import pytest
import yaml

from conftest import BIN, make_repo, sh, tool_env

ALIAS_BOMB = "\n".join(
    [
        "a: &a [x, x, x, x, x, x, x, x, x, x]",
        "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]",
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]",
        "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]",
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]",
        "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]",
        "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]",
        "report: {title: *g}",
    ]
)


def check(repo):
    return sh([str(BIN / "virgo-exps"), "check"], repo, check=False, timeout=120)


def one_error(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(
    "text, says",
    [
        (ALIAS_BOMB, "params.yaml: line 2: YAML aliases (*a) are not allowed in a params file"),
        ("report:\n  title: " + "x" * 10_000_000 + "\n", "params.yaml: larger than 64 KiB"),
        ("report:\n  title: " + "x" * 1000 + "\n", "report.title: a string of 1000 characters; at most 500"),
        (b"\xff\xfe garbage", "params.yaml: not UTF-8 text"),
    ],
    ids=["alias-bomb", "10MB-title", "long-title", "not-text"],
)
def test_oversized_params_are_refused_with_one_line(repo, text, says):
    path = repo / "params.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert says in one_error(check(repo))


def test_a_sweep_file_and_a_machine_profile_have_the_same_bounds(repo):
    (repo / "bomb.yaml").write_text(ALIAS_BOMB)
    proc = sh([str(BIN / "virgo-exps"), "sweep", "submit", "bomb.yaml"], repo, check=False, timeout=120)
    assert "YAML aliases (*a) are not allowed in a sweep file" in proc.stderr, proc.stderr[-2000:]
    (repo / "machines" / "local" / "machine.yaml").write_text(ALIAS_BOMB)
    assert "YAML aliases (*a) are not allowed in a machine profile" in one_error(check(repo))


@pytest.mark.slow
def test_an_emptied_params_file_stops_the_pipeline_before_dvc_deletes_data(tmp_path):
    repo = make_repo(tmp_path / "repo")
    env = tool_env()
    sh(["dvc", "repro", "generate"], repo, env, timeout=600)
    raw = repo / "data" / "raw.zarr"
    assert (raw / "zarr.json").is_file()
    (repo / "params.yaml").write_text("")
    proc = sh(["dvc", "repro"], repo, env, check=False, timeout=600)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "error: generate.seed: missing from params.yaml, and stage 'generate' of dvc.yaml needs it" in out, out
    assert (raw / "zarr.json").is_file(), "the data went before the refusal"
    # One key gone: the same, naming that key.
    sh(["git", "checkout", "params.yaml"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    del params["train"]["warmup_steps"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert "train.warmup_steps: missing from params.yaml, and stage 'train'" in one_error(check(repo))


def test_an_unreachable_tracking_server_is_refused_by_check(repo):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = tool_env({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    proc = sh([str(BIN / "virgo-exps"), "check"], repo, env, check=False, timeout=120)
    line = one_error(proc)
    assert line.startswith(f"error: MLFLOW_TRACKING_URI: no MLflow server answers at http://127.0.0.1:{port} ("), line
