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
from virgo_exps.entry import stage_main

def run():
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    sys.stderr.buffer.write(b"bytes to stderr\\n")  # as the launcher copies a job's log
    sys.stderr.flush()
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
    assert log.read_text() == "to stdout\nto stderr\nbytes to stderr\n"
    assert "bytes to stderr" in ok.stderr
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


def store(path: Path, value: int, params: dict | None = None) -> str:
    """A store with a provenance stamp (its params); its identity, as a data stage's log names it."""
    path.mkdir(parents=True)
    stamp = {"stage": path.stem, "params": params or {}, "inputs": {}}
    (path / "zarr.json").write_text(json.dumps({"attributes": {provenance.KEY: stamp}}))
    (path / "c0").write_bytes(bytes([value]) * 64)
    return stagelog.store_id(path)


def write_log(home: Path, stage: str, name: str, text: str, age: float) -> Path:
    log = home / "logs" / stage / name
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(text)
    then = time.time() - age
    os.utime(log, (then, then))
    return log


def test_the_training_log_starts_with_the_logs_that_made_its_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = store(Path("data/raw.zarr"), 1, {"generate.seed": 1})
    images = store(Path("data/images.zarr"), 2, {"preprocess.fmax": 80})
    other_raw = "0" * 16
    home = tmp_path
    gen_old = write_log(home, "generate", "a-local-1.out", f"old\ngenerate: output data/raw.zarr id {raw}\n", 300)
    gen = write_log(home, "generate", "b-local-2.out", f"new\ngenerate: output data/raw.zarr id {raw}\n", 200)
    other = write_log(
        home, "generate", "c-local-3.out", f"other data\ngenerate: output data/raw.zarr id {other_raw}", 10
    )
    job = write_log(home, "preprocess", "b-77.out", "a job of the stage\n", 150)
    pre = write_log(
        home,
        "preprocess",
        "b-local-4.out",
        f"launch: log {job}\npreprocess: input data/raw.zarr id {raw}\n"
        f"preprocess: output data/images.zarr id {images}\n",
        100,
    )
    failed = write_log(home, "train", "b-local-5.out", f"preprocess: output data/images.zarr id {images}\n", 5)
    found = stagelog.data_logs("data/images.zarr", home)
    assert found == [gen, pre, job], found  # the newest of each, oldest first; not other data, not train's logs
    assert gen_old not in found and other not in found and failed not in found
    joined = stagelog.joined(found, home).decode()
    assert joined.startswith("==> logs/generate/b-local-2.out <==\nnew\n")
    assert "==> logs/preprocess/b-77.out <==\na job of the stage" in joined
    # The identity is the stamp's, read without reading the data: a store made with other params is
    # another store, and data no log names adds nothing (a log from an older version), without an error.
    (tmp_path / "data/images.zarr/zarr.json").write_text(
        json.dumps({"attributes": {provenance.KEY: {"stage": "images", "params": {"preprocess.fmax": 60}}}})
    )
    assert stagelog.data_logs("data/images.zarr", home) == []


def test_a_data_stage_names_its_inputs_and_its_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = store(Path("raw.zarr"), 1)
    images = store(Path("images.zarr"), 2)
    assert stagelog.output_line("preprocess", "images.zarr", inputs=("raw.zarr",)) == (
        f"preprocess: input raw.zarr id {raw}\npreprocess: output images.zarr id {images}"
    )
    plain = tmp_path / "plain.bin"  # no stamp: the identity is the content's digest
    plain.write_bytes(b"x")
    assert stagelog.store_id(plain) == provenance.data_digest(plain)


def test_a_carried_log_names_no_place_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("VIRGO_HOME", str(tmp_path / "checkout"))
    text = f"read {tmp_path}/checkout/data and {Path.home()}/.cache/x".encode()
    assert stagelog.public(text) == b"read <checkout>/data and ~/.cache/x"
