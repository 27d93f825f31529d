"""Tests of slurmsim against a real Slurm (needs root).

Run: PYTHONPATH=tests python -m pytest -p slurm_fixtures tests/test_slurmsim.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import slurmsim
from conftest import wait_until
from slurmsim import FINAL_JOB_STATES, ClusterAlreadyRunning, SimCluster, network, procs, teardown

pytestmark = pytest.mark.slurm


# ----------------------------------------------------------------- helpers


def sbatch_wait(
    cluster: SimCluster, tmp_path: Path, body: str, *opts: str, timeout: float = 180
) -> tuple[int, str, str]:
    """Submit ``body`` with ``sbatch -W``; return (exit code, job id, output)."""
    script = tmp_path / f"job{time.monotonic_ns()}.sh"
    script.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    out = script.with_suffix(".out")
    proc = subprocess.run(
        ["sbatch", "-W", "--parsable", "-o", str(out), *opts, str(script)],
        env=cluster.command_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    job_id = proc.stdout.strip().split(";")[0]
    output = out.read_text() if out.exists() else ""
    return proc.returncode, job_id, output + proc.stderr


FINAL_STATES = FINAL_JOB_STATES


def sbatch_poll(
    cluster: SimCluster, tmp_path: Path, body: str, *opts: str, timeout: float = 180
) -> tuple[int, str, str]:
    """Like sbatch_wait but polls scontrol every 0.2 s instead of ``sbatch -W``
    (whose own poll backs off 2 s -> 8 s -> 32 s with MinJobAge=300)."""
    script = tmp_path / f"job{time.monotonic_ns()}.sh"
    script.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    out = script.with_suffix(".out")
    job_id = cluster.slurm("sbatch", "--parsable", "-o", str(out), *opts, str(script)).stdout.strip().split(";")[0]
    state = wait_until(
        lambda: (lambda s: s if s in FINAL_STATES else None)(job_field(cluster, job_id, "JobState")),
        timeout,
        f"job {job_id}",
        0.2,
    )
    code, sig = (int(x) for x in job_field(cluster, job_id, "ExitCode").split(":"))
    output = out.read_text() if out.exists() else ""
    return (code if not sig else 128 + sig), job_id, f"[{state}]\n{output}"


def job_field(cluster: SimCluster, job_id: str, field: str) -> str:
    text = cluster.slurm("scontrol", "show", "job", job_id).stdout
    match = re.search(rf"\b{field}=(\S+)", text)
    assert match, f"{field} not in scontrol output:\n{text}"
    return match.group(1)


def assert_torn_down(state: dict) -> None:
    """Nothing recorded in a cluster state file is left on the machine."""
    for key, rec in state.get("daemons", {}).items():
        assert not procs._alive(rec["pid"], rec["starttime"]), f"{key} still alive"
    for ns in state.get("network", {}).get("netns", []):
        assert not (slurmsim.NETNS_DIR / ns).exists(), f"netns {ns} left"
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    bridge = state.get("network", {}).get("bridge")
    if bridge:
        assert f" {bridge}:" not in links, f"bridge {bridge} left"
    for link in state.get("network", {}).get("links", []):
        assert f" {link}@" not in links and f" {link}:" not in links, f"{link} left"
    hosts = Path("/etc/hosts").read_text()
    assert f"virgo-slurmsim {state['tag']}" not in hosts, "/etc/hosts block left"
    # no process of this cluster (tag in its environment) survives
    needle = f"{slurmsim.TAG_ENV}={state['tag']}".encode()
    leftovers = [p for p in procs._all_pids() if p != os.getpid() and procs._alive(p) and procs._environ_has(p, needle)]
    assert not leftovers, [procs._cmdline(p) for p in leftovers]


# ----------------------------------------------------------------- 1 node


@pytest.mark.parametrize("code", [0, 3])
def test_sbatch_wait_propagates_exit_code(slurm_cluster, tmp_path, code):
    rc, job_id, out = sbatch_wait(
        slurm_cluster,
        tmp_path,
        f"""\
        echo "running on $(hostname)"
        exit {code}
        """,
        "-J",
        f"exit{code}",
    )
    assert rc == code, out
    assert "running on" in out
    # MinJobAge keeps the finished job visible to scontrol
    assert job_field(slurm_cluster, job_id, "ExitCode") == f"{code}:0"
    assert job_field(slurm_cluster, job_id, "JobState") == ("COMPLETED" if code == 0 else "FAILED")


def test_srun_two_tasks(slurm_cluster, tmp_path):
    rc, _, out = sbatch_wait(
        slurm_cluster,
        tmp_path,
        """\
        srun bash -c 'echo "procid=$SLURM_PROCID ntasks=$SLURM_NTASKS"'
        """,
        "--ntasks=2",
    )
    assert rc == 0, out
    lines = sorted(line for line in out.splitlines() if line.startswith("procid="))
    assert lines == ["procid=0 ntasks=2", "procid=1 ntasks=2"], out


def test_cluster_attributes(slurm_cluster):
    assert slurm_cluster.node_names == [network._short_hostname()]
    assert slurm_cluster.partition == "debug"
    assert Path(slurm_cluster.env["SLURM_CONF"]).is_file()
    states = slurm_cluster.node_states()
    assert set(states) == set(slurm_cluster.node_names)
    assert set(states.values()) <= {"idle", "mixed", "allocated"}
    assert slurm_cluster.is_running()


def _ports(cluster) -> dict[str, int]:
    conf = Path(cluster.env["SLURM_CONF"]).read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+Port)=(\d+)$", conf, re.M)}


def test_the_daemons_listen_below_the_jobs_rendezvous_ports(slurm_cluster, slurm_multinode):
    """A job's rendezvous port is 20000 + its id % 10000: no daemon of any cluster may hold one of those."""
    for cluster in (slurm_cluster, slurm_multinode):
        ports = _ports(cluster)
        assert {"SlurmctldPort", "SlurmdPort"} <= set(ports), ports
        assert all(p < 20000 for p in ports.values()), ports


def test_a_name_another_cluster_added_gets_a_block_of_its_own(tmp_path, monkeypatch):
    """The one-node fallback: a host name that resolves only through another cluster's block of
    /etc/hosts is added again, in this cluster's block, so that it outlives the other cluster."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    monkeypatch.setattr(network, "HOSTS_FILE", hosts)
    network._hosts_add("aaaaaa", [("127.0.0.1", "nodeq")])
    assert network._in_managed_block("nodeq") and not network._in_managed_block("localhost")
    network._hosts_add("bbbbbb", [("127.0.0.1", "nodeq")])
    assert network._hosts_remove("aaaaaa")
    assert hosts.read_text().splitlines() == [
        "127.0.0.1 localhost",
        "# >>> virgo-slurmsim bbbbbb (managed block, removed on stop)",
        "127.0.0.1 nodeq",
        "# <<< virgo-slurmsim bbbbbb",
    ]
    assert network._hosts_remove("bbbbbb") and hosts.read_text() == "127.0.0.1 localhost\n"


# ----------------------------------------------------------------- 2 nodes

EXCHANGE = """\
import os, socket, subprocess, sys, time
rank = int(os.environ["SLURM_PROCID"])
nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                       capture_output=True, text=True, check=True).stdout.split()
addr = socket.gethostbyname(nodes[0])
port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
me = socket.gethostname()
if rank == 0:
    srv = socket.create_server((addr, port))
    srv.settimeout(60)
    conn, peer_addr = srv.accept()
    peer = conn.recv(256).decode()
    conn.sendall(me.encode())
else:
    deadline = time.time() + 60
    while True:
        try:
            conn = socket.create_connection((addr, port), timeout=5)
            break
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.2)
    conn.sendall(me.encode())
    peer = conn.recv(256).decode()
print(f"rank={rank} host={me} peer={peer}", flush=True)
"""


def test_multinode_tcp_between_nodes(slurm_multinode, tmp_path):
    (tmp_path / "exchange.py").write_text(EXCHANGE)
    rc, _, out = sbatch_wait(
        slurm_multinode,
        tmp_path,
        f"""\
        srun {sys.executable} {tmp_path / "exchange.py"}
        """,
        "--nodes=2",
        "--ntasks-per-node=1",
    )
    assert rc == 0, out
    n1, n2 = slurm_multinode.node_names
    lines = sorted(line for line in out.splitlines() if line.startswith("rank="))
    assert lines == [f"rank=0 host={n1} peer={n2}", f"rank=1 host={n2} peer={n1}"], out


GLOO = """\
import os, socket, subprocess
import torch, torch.distributed as dist
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
first = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                       capture_output=True, text=True, check=True).stdout.split()[0]
port = 21000 + int(os.environ["SLURM_JOB_ID"]) % 20000
dist.init_process_group("gloo", init_method=f"tcp://{socket.gethostbyname(first)}:{port}",
                        rank=rank, world_size=world)
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(f"rank={rank} host={socket.gethostname()} sum={t.item():g}", flush=True)
dist.destroy_process_group()
"""


def test_multinode_gloo_all_reduce(slurm_multinode, tmp_path):
    pytest.importorskip("torch")
    (tmp_path / "gloo.py").write_text(GLOO)
    rc, _, out = sbatch_poll(
        slurm_multinode,
        tmp_path,
        f"""\
        srun {sys.executable} {tmp_path / "gloo.py"}
        """,
        "--nodes=2",
        "--ntasks-per-node=1",
    )
    assert rc == 0, out
    n1, n2 = slurm_multinode.node_names
    lines = sorted(line for line in out.splitlines() if line.startswith("rank="))
    assert lines == [f"rank=0 host={n1} sum=3", f"rank=1 host={n2} sum=3"], out


def test_multinode_attributes(slurm_multinode):
    c = slurm_multinode
    assert len(c.node_names) == len(c.node_addresses) == 2
    assert len(set(c.node_names)) == 2
    for name, addr in zip(c.node_names, c.node_addresses):
        assert c.slurm("scontrol", "show", "node", name).stdout.count(f"NodeAddr={addr}") == 1
    # a second cluster's names never collide with ours
    other = SimCluster(c.workdir.parent / "elsewhere", nodes=2)
    assert not set(other.node_names) & set(c.node_names)
    assert other.bridge_name != c.bridge_name


# ----------------------------------------------------------------- lifecycle


def test_lifecycle_four_nodes_kill_restart(tmp_path):
    """4 nodes x 2 CPUs next to the session clusters; a node dies mid-job and
    comes back; teardown leaves nothing behind and may be repeated."""
    from slurm_fixtures import start_cluster

    cluster = start_cluster(tmp_path / "c4", nodes=4, cpus_per_node=2)
    state = json.loads(cluster.state_path.read_text())
    try:
        assert len(set(cluster.node_addresses)) == 4
        with pytest.raises(ClusterAlreadyRunning):
            SimCluster(tmp_path / "c4", nodes=4).start()

        rc, _, out = sbatch_wait(
            cluster,
            tmp_path,
            """\
            srun bash -c 'echo "task=$SLURM_PROCID host=$(hostname)"'
            """,
            "--nodes=4",
            "--ntasks-per-node=2",
        )
        assert rc == 0, out
        hosts = [line.split("host=")[1] for line in out.splitlines() if line.startswith("task=")]
        assert sorted(hosts) == sorted(cluster.node_names * 2), out

        # a requeueable job on the last node; the node dies under it
        victim = cluster.node_names[-1]
        log = tmp_path / "victim.out"
        job_id = cluster.slurm(
            "sbatch",
            "--parsable",
            "--requeue",
            f"--nodelist={victim}",
            "--open-mode=append",
            "-o",
            str(log),
            "-J",
            "victim",
            "--wrap",
            "echo start on $(hostname); exec sleep 600",
        ).stdout.strip()
        wait_until(lambda: log.exists() and "start on" in log.read_text(), 60, "victim job to start")
        assert job_field(cluster, job_id, "JobState") == "RUNNING"
        on_node = cluster.node_pids(victim)
        killed = cluster.kill_node(victim)
        assert set(on_node) <= set(killed)
        assert cluster.node_pids(victim) == []
        assert not any(procs._alive(p) for p in killed)

        wait_until(
            lambda: cluster.node_states().get(victim, "").startswith("down"),
            cluster.slurmd_timeout * 3 + 60,
            "slurmctld to mark the node down",
        )
        wait_until(lambda: int(job_field(cluster, job_id, "Restarts")) >= 1, 30, "the job to be requeued")
        cluster.restart_node(victim)
        assert cluster.node_states()[victim] in {"idle", "mixed", "allocated"}
        wait_until(lambda: log.read_text().count("start on") >= 2, 90, "the requeued job to run again")
        assert job_field(cluster, job_id, "JobState") == "RUNNING"
    finally:
        cluster.stop()
    assert not cluster.state_path.exists()
    assert_torn_down(state)
    cluster.stop()  # idempotent
    slurmsim.stop_from_state(tmp_path / "c4")
    assert_torn_down(state)


def test_cli_up_status_down(tmp_path):
    from slurm_fixtures import _require_slurm

    _require_slurm(multinode=True)
    workdir = tmp_path / "cli"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    cli = [sys.executable, "-m", "slurmsim"]
    up = subprocess.run(
        [*cli, "up", "--dir", str(workdir), "--nodes", "2"], capture_output=True, text=True, env=env, timeout=120
    )
    state_path = workdir / slurmsim.STATE_FILE
    try:
        assert up.returncode == 0, up.stderr
        assert f"export SLURM_CONF={workdir / 'slurm.conf'}" in up.stdout
        state = json.loads(state_path.read_text())
        status = subprocess.run(
            [*cli, "status", "--dir", str(workdir)], capture_output=True, text=True, env=env, timeout=60
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "idle" in status.stdout
        again = subprocess.run(
            [*cli, "up", "--dir", str(workdir), "--nodes", "2"], capture_output=True, text=True, env=env, timeout=120
        )
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        down = subprocess.run(
            [*cli, "down", "--dir", str(workdir)], capture_output=True, text=True, env=env, timeout=120
        )
    assert down.returncode == 0, down.stderr
    assert not state_path.exists()
    assert_torn_down(state)
    status = subprocess.run(
        [*cli, "status", "--dir", str(workdir)], capture_output=True, text=True, env=env, timeout=60
    )
    assert status.returncode == 1


def test_a_veth_end_the_kernel_removes_with_its_namespace_during_teardown_is_not_an_error(tmp_path, monkeypatch):
    """The race `make cluster-down` lost once: a node's namespace goes, the kernel removes the veth pair
    with it, after teardown saw our end and before it deleted it (`ip link del` says "Cannot find device").
    Reproduced with a real namespace and veth pair, the namespace deleted between the check and the delete:
    teardown completes; a device that is still there after a failed delete stays an error."""
    import shutil

    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces and veth pairs need root and iproute2")
    tag = f"vr{os.getpid() % 100000}"
    ns, host_end, ns_end = f"{tag}ns", f"{tag}h", f"{tag}n"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end], check=True)
        subprocess.run(["ip", "link", "set", ns_end, "netns", ns], check=True)
        cluster = slurmsim.SimCluster(tmp_path / "c", nodes=2)
        cluster._state = {"network": {"netns": [], "links": [host_end]}, "daemons": {}}
        real = network._link_exists
        raced = []

        def seen_then_gone(name: str) -> bool:
            there = real(name)
            if name == host_end and there and not raced:
                raced.append(name)
                subprocess.run(["ip", "netns", "del", ns], check=True)
                deadline = time.monotonic() + 30
                while real(host_end) and time.monotonic() < deadline:  # the kernel's cleanup is asynchronous
                    time.sleep(0.05)
                assert not real(host_end), "the veth pair outlived its namespace"
            return there

        monkeypatch.setattr(teardown, "_link_exists", seen_then_gone)
        cluster._teardown()  # before the fix: SlurmSimError("teardown incomplete: Cannot find device ...")
        assert raced == [host_end] and not real(host_end)
        assert not cluster.state_path.exists()
    finally:
        subprocess.run(["ip", "link", "del", host_end], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
