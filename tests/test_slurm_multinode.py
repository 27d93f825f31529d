"""Training on 2 nodes of a real Slurm cluster (network namespaces, 1 CPU each; root needed).

DDP (torchrun per node, c10d rendezvous on the first node) and Horovod (one
srun task per process, gloo rendezvous through virgo_exps.hvd_slurm) with
train.nodes=2, train.procs_per_node=1: both ranks take part, on different nodes.
A node killed under a job: NODE_FAIL fails the stage (sbatch -W would say 0),
a requeued job is followed to its end on the other node.
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import make_repo, sh, write_images
from test_slurm_launch import Running, cluster_env, job_fields, job_id_of, needs_horovod, train_cmd

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("slurm-multinode") / "repo")
    write_images(repo / "data" / "images.zarr")
    return repo


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod])])
def test_two_nodes_one_process_each(slurm_multinode, repo, strategy):
    name = f"nodes-{strategy}"
    env = cluster_env(slurm_multinode, extra={"DVC_EXP_NAME": name})
    proc = sh(train_cmd(repo, name, strategy, procs=1, nodes=2, epochs=3), repo, env, check=False, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    job = job_id_of(out)
    nodes = slurm_multinode.node_names
    fields = job_fields(slurm_multinode, job)
    assert fields["NumNodes"] == "2" and fields["JobState"] == "COMPLETED"
    log = (repo / "logs" / "train" / f"{name}-{job}.out").read_text()
    assert f"on 2 node(s): {fields['NodeList']}" in log
    assert f"rendezvous {nodes[0]}:" in log
    metrics = json.loads((repo / "out" / name / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["nodes"] == 2 and metrics["strategy"] == strategy


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
        assert json.loads((repo / "out" / name / "metrics.json").read_text())["epochs"] == 60
    else:
        assert fields["JobState"] == "NODE_FAIL"
        assert rc != 0, out[-5000:]
        assert f"job {job} (virgo-train-{name}) ended NODE_FAIL with exit code 1" in out
