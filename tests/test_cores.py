"""Trainings on one machine hold a core slot per thread: two started at once do not share the cores.

The train stage as DVC runs it (the launcher, a real training process), twice in one checkout, the
second started while the first holds the cores, as `dvc queue start -j 2` would start them.
"""

from __future__ import annotations

import fcntl
import os
import subprocess

import pytest
import yaml

from conftest import make_repo, tool_env, train_stage_cmd, wait_until, write_images
from virgo_exps.provenance import read_metrics


def slots_held(repo) -> int:
    held = 0
    for lock in (repo / "logs" / ".slots").glob("slot-*.lock"):
        with open(lock, "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held += 1
    return held


@pytest.mark.slow
def test_a_second_training_waits_for_the_cores_the_first_one_uses(tmp_path):
    cores = os.cpu_count() or 1
    if cores < 2:
        pytest.skip("needs 2 cores")
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 2, "profile_steps": 0}})
    write_images(repo / "data" / "images.zarr")
    procs = []
    env = tool_env({"VIRGO_FAULT_STEP_SLEEP": "0.1"})
    env.pop("OMP_NUM_THREADS", None)
    for seed in (0, 1):  # two configurations: two experiments of a queue
        params = yaml.safe_load((repo / "params.yaml").read_text())
        params["train"]["seed"] = seed
        (repo / f"params-{seed}.yaml").write_text(yaml.safe_dump(params))
        cmd = train_stage_cmd(f"params-{seed}.yaml", f"out/{seed}")
        out = subprocess.PIPE
        procs.append(subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
        if seed == 0:
            wait_until(lambda: slots_held(repo) == cores, 120, "the first training to hold every core")
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[1][-3000:]
    assert f"launch: waiting for {cores} free core(s)" in outputs[1], outputs[1][-3000:]
    for seed in (0, 1):
        metrics = read_metrics(repo / "out" / str(seed) / "metrics.json")
        assert metrics["cost"]["cores"] == cores  # one process, as many threads as the slots it held
