"""Training on several nodes of a real Slurm cluster (network namespaces, 1 CPU a node; root needed).

The scaling sweep of the study, as users run it: ``dvc exp run --queue -S
train.strategy=ddp,deepspeed,horovod -S train.nodes=1,2`` and ``dvc queue start
-j 2`` with ``VIRGO_MACHINE=simcluster`` (the profile finds the cluster through
its ``slurm_conf``). Every 2-node run (DDP and DeepSpeed: torchrun per node, c10d
rendezvous on the first node; Horovod: one srun task per process) has its
ranks on two different nodes and follows the single-process loss trajectory
on the same global batch; the scalability report is built from the sweep.
A node killed under a job: NODE_FAIL fails the stage (sbatch -W would say 0),
a requeued job is followed to its end on the other node.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import BIN, make_repo, sh, tool_env, write_images
from test_slurm_launch import HOROVOD, Running, cluster_env, job_fields, job_id_of, train_cmd
from test_sweeps import dvc, exp_rows, queue_start, queued_names, stop_workers, wait_queue
from virgo_exps.provenance import read_metrics

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

RTOL = 1e-4  # as in test_trainer.py: only the order of floating-point sums differs
STRATEGIES = ["ddp", "deepspeed"] + (["horovod"] if HOROVOD else [])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("slurm-multinode") / "repo")
    write_images(repo / "data" / "images.zarr")
    return repo


@pytest.fixture(scope="module")
def sweep_repo(tmp_path_factory, slurm_multinode):
    """The pipeline run once on the local machine (single process) and committed: the reference."""
    repo = make_repo(tmp_path_factory.mktemp("node-sweep") / "repo", {"train": {"epochs": 3}})
    dvc(repo, "exp", "run")
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "baseline: single process on the local machine"], repo)
    # Where machines/simcluster/machine.yaml looks for the cluster `make cluster` starts.
    (repo / ".slurmsim").symlink_to(slurm_multinode.workdir, target_is_directory=True)
    yield repo
    stop_workers(repo)


def _committed(repo, rev: str, path: str) -> str:
    return sh(["git", "show", f"{rev}:{path}"], repo).stdout


def test_node_scaling_sweep_through_the_queue(slurm_multinode, sweep_repo):
    repo = sweep_repo
    env = tool_env({"VIRGO_MACHINE": "simcluster"})  # no SLURM_CONF: the profile's slurm_conf is used
    queued = dvc(
        repo, "exp", "run", "--queue", "-S", f"train.strategy={','.join(STRATEGIES)}", "-S", "train.nodes=1,2", env=env
    )
    names = queued_names(queued)
    assert len(names) == 2 * len(STRATEGIES), queued.stdout
    queue_start(repo, 2, env=env)
    status = wait_queue(repo, names, timeout=1200)
    failed = {n: dvc(repo, "queue", "logs", n, check=False).stdout[-3000:] for n in names if status[n] != "Success"}
    assert not failed, failed

    reference = pd.read_csv(repo / "results" / "epochs.csv")
    assert reference["val_loss"].iloc[-1] < reference["val_loss"].iloc[0]  # it learned: not two flat lines
    rows = exp_rows(repo)
    nodes = slurm_multinode.node_names
    seen = set()
    for name in names:
        run = rows[name]
        train = run["data"]["params"]["params.yaml"]["data"]["train"]
        metrics = run["data"]["metrics"]["results/metrics.json"]["data"]
        described = run["data"]["params"]["results/run.json"]["data"]  # shown by DVC as params
        strategy, n = train["strategy"], train["nodes"]
        seen.add((strategy, n))
        assert (described["strategy"], metrics["nodes"], metrics["world_size"]) == (strategy, n, n), metrics
        assert described["machine"] == "simcluster" and metrics["hosts"] == n, (metrics, described)
        ranks = json.loads(_committed(repo, run["rev"], "results/ranks.json"))
        assert len(ranks) == n and {r["host"] for r in ranks} <= set(nodes), ranks
        assert len({r["host"] for r in ranks}) == n, f"{strategy}: ranks not on {n} different nodes: {ranks}"
        # The job log is in the main checkout, under the experiment's name.
        logs = list((repo / "logs" / "train").glob(f"{name}-*.out"))
        assert len(logs) == 1 and logs[0].name != f"{name}-local", logs
        log = logs[0].read_text()
        assert f"on {n} node(s):" in log and "machine simcluster" in log, log[-2000:]
        if n == 2:
            assert f"rendezvous {nodes[0]}:" in log
            got = pd.read_csv(io.StringIO(_committed(repo, run["rev"], "results/epochs.csv")))
            assert len(got) == len(reference) == 3
            np.testing.assert_allclose(
                got["train_loss"], reference["train_loss"], rtol=RTOL, err_msg=f"{strategy} on 2 nodes"
            )
            np.testing.assert_allclose(
                got["val_loss"], reference["val_loss"], rtol=RTOL, err_msg=f"{strategy} on 2 nodes"
            )
    assert seen == {(s, n) for s in STRATEGIES for n in (1, 2)}

    # The scalability report over the sweep: one series per strategy, speedup against its own 1 node.
    out = repo / "results" / "scalability"
    printed = sh([str(BIN / "python"), "-m", "virgo_exps.cli.scalability", "--out", str(out)], repo).stdout
    doc = json.loads((out / "scalability.json").read_text())
    groups = {(g["series"], g["world_size"]): g for g in doc["groups"]}
    for strategy in STRATEGIES:
        one, two = groups[(strategy, 1)], groups[(strategy, 2)]
        assert two["nodes"] == 2 and two["baseline"] == f"{strategy} @ 1 (1x1)", two
        assert two["speedup"] == pytest.approx(one["epoch_time_s"] / two["epoch_time_s"])
        assert strategy in printed
    for png in ("epoch_time.png", "speedup.png", "efficiency.png", "throughput.png", "computation.png"):
        assert (out / png).stat().st_size > 1000


def _profile(repo, name: str, **changes) -> str:
    folder = repo / "machines" / name
    if not folder.exists():
        shutil.copytree(repo / "machines" / "slurm", folder)
        spec = yaml.safe_load((folder / "machine.yaml").read_text())
        spec.update(changes)
        (folder / "machine.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return name


@pytest.mark.parametrize("requeue", [False, True], ids=["no-requeue", "requeue"])
def test_node_failure(slurm_multinode, repo, requeue):
    """NODE_FAIL is a failure even though sbatch -W returns 0; a requeued job is waited for to the end."""
    cluster = slurm_multinode
    name = f"node-fail-{'requeue' if requeue else 'final'}"
    machine = "slurm" if requeue else _profile(repo, "slurm-norequeue", sbatch_extra=["--no-requeue"])
    env = cluster_env(cluster, machine=machine, extra={"DVC_EXP_NAME": name})
    run = Running(train_cmd(repo, name, epochs=60), repo, env)
    node = None
    try:
        run.wait_for(r"epoch 3/60:", timeout=180)
        job = job_id_of(run.output)
        node = job_fields(cluster, job)["NodeList"]
        cluster.kill_node(node)
        rc = run.finish(timeout=240)
    finally:
        run.kill()
        if node is not None:
            cluster.restart_node(node, timeout=120)
    out = run.output
    fields = job_fields(cluster, job)
    if requeue:
        assert rc == 0, out[-5000:]
        assert f"job {job} requeued (restart 1)" in out and "train: resuming from" in out
        assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1"
        assert read_metrics(repo / "out" / name / "metrics.json")["epochs"] == 60
    else:
        assert fields["JobState"] == "NODE_FAIL"
        assert rc != 0, out[-5000:]
        assert f"job {job} (virgo-train-{name}) ended NODE_FAIL with exit code 1" in out
