"""Every stage keeps its log in the main checkout, and the training's log starts with the logs of the data
stages that made its data (found by the digest each data stage's last line names).

The whole route (`dvc exp run`, `dvc exp push`, a teammate's `dvc exp pull` and `virgo-exps logs`) is in
tests/test_share.py; here the parts, with real processes and files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT, tool_env
from virgo_exps import provenance, stagelog

STAGE = """
import sys
from virgo_exps.cli.main import stage_main

def run():
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if sys.argv[1:] == ["fail"]:
        raise RuntimeError("the stage broke")
    return 0

stage_main(run, log="generate")
"""


def run_stage(home: Path, *args: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    env = tool_env({"VIRGO_HOME": str(home), "DVC_EXP_NAME": "exp-a", **(extra or {})})
    env.pop("SLURM_JOB_ID", None)
    env.update(extra or {})
    return subprocess.run(
        [sys.executable, "-c", STAGE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_stage_keeps_its_output_and_its_traceback_in_its_log(tmp_path):
    ok = run_stage(tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "to stdout" in ok.stdout and "to stderr" in ok.stderr  # DVC still sees everything
    [log] = (tmp_path / "logs" / "generate").glob("exp-a-local-*.out")
    assert log.read_text() == "to stdout\nto stderr\n"
    failed = run_stage(tmp_path, "fail")
    assert failed.returncode != 0
    [log2] = set((tmp_path / "logs" / "generate").glob("exp-a-local-*.out")) - {log}
    text = log2.read_text()
    assert "Traceback" in text and "RuntimeError: the stage broke" in text
    # `virgo-exps failures` finds the failed data stage by its log, as it finds a failed training.
    from virgo_exps.experiments.failures import _stage_logs

    assert log2 in _stage_logs(tmp_path)["exp-a"]


def test_inside_a_slurm_job_the_jobs_log_is_the_log(tmp_path):
    done = run_stage(tmp_path, extra={"SLURM_JOB_ID": "123"})
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "logs").exists()


def store(path: Path, value: int, inputs: dict[str, str] | None = None) -> str:
    path.mkdir(parents=True)
    stamp = {"stage": path.stem, "params": {}, "inputs": inputs or {}}
    (path / "zarr.json").write_text(json.dumps({"attributes": {provenance.KEY: stamp}}))
    (path / "c0").write_bytes(bytes([value]) * 64)
    return provenance.data_digest(path)


def write_log(home: Path, stage: str, name: str, text: str, age: float) -> Path:
    log = home / "logs" / stage / name
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    then = time.time() - age
    os.utime(log, (then, then))
    return log


def test_the_training_log_starts_with_the_logs_that_made_its_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = store(Path("data/raw.zarr"), 1)
    images = store(Path("data/images.zarr"), 2, {"data/raw.zarr": raw})
    home = tmp_path
    gen_old = write_log(home, "generate", "a-local-1.out", f"old\ngenerate: output data/raw.zarr digest {raw}\n", 300)
    gen = write_log(home, "generate", "b-local-2.out", f"new\ngenerate: output data/raw.zarr digest {raw}\n", 200)
    other = write_log(
        home, "generate", "c-local-3.out", "other data\ngenerate: output data/raw.zarr digest " + "0" * 16, 10
    )
    job = write_log(home, "preprocess", "b-77.out", "a job of the stage\n", 150)
    pre = write_log(
        home,
        "preprocess",
        "b-local-4.out",
        f"launch: log {job}\npreprocess: output data/images.zarr digest {images}\n",
        100,
    )
    failed = write_log(home, "train", "b-local-5.out", f"preprocess: output data/images.zarr digest {images}\n", 5)
    found = stagelog.data_logs("data/images.zarr", home)
    assert found == [gen, pre, job], found  # newest of each, oldest first; not other data, not train's logs
    assert gen_old not in found and other not in found and failed not in found
    joined = stagelog.joined(found, home).decode()
    assert joined.startswith("==> logs/generate/b-local-2.out <==\nnew\n")
    assert "==> logs/preprocess/b-77.out <==\na job of the stage" in joined
    # Data that no log names: nothing to add (a log from an older version), and no error.
    (tmp_path / "data/images.zarr/c0").write_bytes(b"changed")
    assert stagelog.data_logs("data/images.zarr", home) == [gen]  # its stamp still names the raw data


def test_a_carried_log_names_no_place_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRGO_HOME", str(tmp_path / "checkout"))
    text = f"read {tmp_path}/checkout/data and {Path.home()}/.cache/x".encode()
    assert stagelog.public(text) == b"read <checkout>/data and ~/.cache/x"
