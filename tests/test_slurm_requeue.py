"""Requeueing on a real Slurm: SIGUSR1 before the limit, snapshot, ``scontrol requeue``, resume.

* A real time limit: the machine profile ``slurm-short`` (a copy of
  machines/slurm with a 1 minute limit and the signal 10 s before it) runs a
  training of about a minute of compute. Slurm checks limits every 30 s and
  may send the signal up to 60 s early, so SIGUSR1 arrives 20-50 s into every
  run: the training is requeued at least once, maybe more (max_requeues is
  raised for that), and must end with exactly the weights and losses of an
  uninterrupted run, computed at the same time on the login node (~2 min).
* The same signal sent at once with ``scancel --signal=USR1 --batch`` to
  2-process DDP (torchrun dies of it, its workers snapshot) and Horovod jobs:
  bit-identical to an uninterrupted job.
* train.max_requeues exhausted: the job fails with exit 85 and says why.

Needs root (``slurm_cluster``).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from conftest import make_repo, sh, write_images
from test_slurm_launch import EPOCHS as SHORT_EPOCHS
from test_slurm_launch import (
    Running,
    assert_same_training,
    cluster_env,
    job_fields,
    job_id_of,
    needs_horovod,
    train_cmd,
)
from virgo_exps.launch.protocol import EXIT_INTERRUPTED
from virgo_exps.provenance import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

EPOCHS = 60  # x 64 steps: ~1 minute of compute on one core


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("slurm-requeue") / "repo")
    write_images(repo / "data" / "big.zarr", n_train=512, n_val=16)
    write_images(repo / "data" / "images.zarr")
    short = repo / "machines" / "slurm-short"
    shutil.copytree(repo / "machines" / "slurm", short)
    spec = yaml.safe_load((short / "machine.yaml").read_text())
    spec.update(time="1", signal_seconds=10, description="1 minute limit, for the time-limit test")
    (short / "machine.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return repo


def test_time_limit_requeues_and_resumes_to_the_same_result(slurm_cluster, repo):
    name = "limit"
    cmd = train_cmd(repo, name, epochs=EPOCHS, max_requeues=8, data="data/big.zarr")
    job_env = cluster_env(slurm_cluster, machine="slurm-short", extra={"DVC_EXP_NAME": name})
    run = Running(cmd, repo, job_env)
    # the uninterrupted reference, on the login node while the job runs
    ref_cmd = [a.replace(f"out/{name}/", "out/reference/") for a in cmd]
    try:
        ref = sh(ref_cmd, repo, {**job_env, "VIRGO_MACHINE": "local"}, check=False, timeout=900)
        rc = run.finish(timeout=900)
    finally:
        run.kill()
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = run.output
    assert rc == 0, out[-6000:]
    job = job_id_of(out)
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "COMPLETED" and fields["TimeLimit"] == "00:01:00"
    restarts = int(fields["Restarts"])
    assert restarts >= 1, out[-4000:]
    assert out.count("virgo: SIGUSR1") >= restarts
    assert len(re.findall(rf"requeueing job {job} \(requeue \d of at most 8\)", out)) == restarts
    assert f"job {job} requeued (restart {restarts})" in out
    assert "train: resuming from" in out and "TIMEOUT" not in out
    log = (repo / "logs" / "train" / f"{name}-{job}.out").read_text()  # appended across the runs
    assert [int(n) for n in re.findall(r"; restart (\d+);", log)] == list(range(restarts + 1))
    assert_same_training(repo / "out" / "reference", repo / "out" / name)
    assert yaml.safe_load((repo / "out" / name / "checkpoints" / "status.json").read_text())["status"] == "complete"
    # the record's cost covers every attempt that trained, not only the last
    spent = read_metrics(repo / "out" / name / "metrics.json")["cost"]
    assert spent["attempts"] == restarts + 1 and spent["slurm_job"] == int(job)


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod])])
def test_usr1_before_the_limit_requeues_and_resumes_bit_identically(slurm_cluster, repo, strategy):
    """scancel --signal=USR1 --batch is what Slurm sends signal_seconds before the time limit."""
    reference = f"full-{strategy}"
    full = sh(
        train_cmd(repo, reference, strategy, procs=2),
        repo,
        cluster_env(slurm_cluster, extra={"DVC_EXP_NAME": reference}),
        check=False,
        timeout=600,
    )
    assert full.returncode == 0, full.stderr[-4000:]
    name = f"usr1-{strategy}"
    run = Running(
        train_cmd(repo, name, strategy, procs=2), repo, cluster_env(slurm_cluster, extra={"DVC_EXP_NAME": name})
    )
    try:
        run.wait_for(rf"epoch 1/{SHORT_EPOCHS}:")
        job = job_id_of(run.output)
        slurm_cluster.slurm("scancel", "--signal=USR1", "--batch", job)
        rc = run.finish(timeout=300)
    finally:
        run.kill()
    out = run.output
    assert rc == 0, out[-5000:]
    assert "virgo: SIGUSR1" in out and f"requeueing job {job} (requeue 1 of at most 3)" in out
    assert f"job {job} requeued (restart 1)" in out and "train: resuming from" in out
    assert job_fields(slurm_cluster, job)["Restarts"] == "1"
    assert_same_training(repo / "out" / reference, repo / "out" / name)
    spent = read_metrics(repo / "out" / name / "metrics.json")["cost"]
    alone = read_metrics(repo / "out" / reference / "metrics.json")["cost"]
    assert spent["attempts"] == 2 and alone["attempts"] == 1


@pytest.mark.slurm
@pytest.mark.slow
def test_requeues_are_limited_by_max_requeues(slurm_cluster, repo):
    name = "no-requeue"
    run = Running(
        train_cmd(repo, name, epochs=400, max_requeues=0),
        repo,
        cluster_env(slurm_cluster, extra={"DVC_EXP_NAME": name}),
    )
    try:
        run.wait_for(r"epoch 1/400:")
        job = job_id_of(run.output)
        slurm_cluster.slurm("scancel", "--signal=USR1", "--batch", job)
        rc = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == EXIT_INTERRUPTED, run.output[-4000:]
    assert "train.max_requeues is 0, so the job stops here" in run.output
    assert json.loads((repo / "out" / name / "checkpoints" / "status.json").read_text())["status"] == "interrupted"
