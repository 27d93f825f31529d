"""Start one Horovod process per Slurm task, without horovodrun (and without ssh).

Used by the batch scripts of :mod:`virgo_exps.launch.slurm`::

    srun --ntasks-per-node=P python -m virgo_exps.launch.hvd_slurm stages/train.py ... --worker

Every task derives Horovod's rank layout from Slurm's variables
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID, the step's node and
task lists) and sets what ``horovodrun --gloo`` would set for it:
HOROVOD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE/CROSS_RANK/CROSS_SIZE/HOSTNAME,
HOROVOD_CONTROLLER=gloo, HOROVOD_CPU_OPERATIONS=gloo, HOROVOD_GLOO_IFACE and
HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT.

The gloo rendezvous is Horovod's own HTTP key-value server
(``horovod.runner.http.http_server``). Task 0 runs it on MASTER_ADDR:MASTER_PORT
(set by the batch script) and starts the training script as its child; it
passes SIGUSR1/SIGTERM/SIGINT on and exits with the child's code. The other
tasks wait until the server answers, then exec the training script.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil

RENDEZVOUS_WAIT_S = float(os.environ.get("VIRGO_HVD_RENDEZVOUS_WAIT_S", "120"))


def expand_hostlist(spec: str) -> list[str]:
    """Slurm's compressed host list ("n[01-03,7],gpu1") as a list of names."""
    hosts: list[str] = []
    for item in _split_top(spec):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top(spec: str) -> list[str]:
    items, depth, cur = [], 0, ""
    for ch in spec:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            if cur:
                items.append(cur)
            cur = ""
        else:
            cur += ch
    if cur:
        items.append(cur)
    return items


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end() :]
    out = []
    for part in m.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            width = len(lo)
            out += [
                f"{head}{str(i).zfill(width)}{rest}" for i in range(int(lo), int(hi) + 1) for rest in _expand_one(tail)
            ]
        else:
            out += [f"{head}{part}{rest}" for rest in _expand_one(tail)]
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE ("2(x3),1") as a list of counts, one per node."""
    counts: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(f"cannot parse tasks per node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def layout(env: dict[str, str]) -> dict:
    """Rank layout of this task and of the whole step (block distribution)."""
    hosts = expand_hostlist(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    counts = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"])
    if len(counts) != len(hosts):
        raise ValueError(f"{len(hosts)} hosts but tasks per node {counts}")
    rank = int(env["SLURM_PROCID"])
    size = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    node = int(env.get("SLURM_NODEID", "0"))
    local_rank = int(env["SLURM_LOCALID"])
    # cross communicator of a local rank: the nodes that have a process with that local rank
    cross = [i for i, c in enumerate(counts) if c > local_rank]
    return {
        "hosts": hosts,
        "counts": counts,
        "rank": rank,
        "size": size,
        "node": node,
        "hostname": hosts[node],
        "local_rank": local_rank,
        "local_size": counts[node],
        "cross_rank": cross.index(node),
        "cross_size": len(cross),
    }


def slot_plan(hosts: list[str], counts: list[int]) -> list:
    """Horovod SlotInfo for every process (what its rendezvous server needs to know)."""
    from horovod.runner.common.util.hosts import SlotInfo

    size = sum(counts)
    plan, rank = [], 0
    for node, (host, n) in enumerate(zip(hosts, counts)):
        for local_rank in range(n):
            cross = [i for i, c in enumerate(counts) if c > local_rank]
            plan.append(
                SlotInfo(
                    hostname=host,
                    rank=rank,
                    local_rank=local_rank,
                    cross_rank=cross.index(node),
                    size=size,
                    local_size=n,
                    cross_size=len(cross),
                )
            )
            rank += 1
    return plan


def interface_towards(address: str) -> str | None:
    """Name of the network interface this host uses to reach ``address``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((address, 9))  # UDP: no packet is sent, only a route is chosen
            local = s.getsockname()[0]
        except OSError:
            return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name
    return None


def horovod_env(env: dict[str, str]) -> dict[str, str]:
    lay = layout(env)
    master = env.get("MASTER_ADDR") or lay["hosts"][0]
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000)
    addr = socket.gethostbyname(master)
    out = {
        "HOROVOD_HOSTNAME": lay["hostname"],
        "HOROVOD_RANK": str(lay["rank"]),
        "HOROVOD_SIZE": str(lay["size"]),
        "HOROVOD_LOCAL_RANK": str(lay["local_rank"]),
        "HOROVOD_LOCAL_SIZE": str(lay["local_size"]),
        "HOROVOD_CROSS_RANK": str(lay["cross_rank"]),
        "HOROVOD_CROSS_SIZE": str(lay["cross_size"]),
        "HOROVOD_CONTROLLER": "gloo",
        "HOROVOD_CPU_OPERATIONS": "gloo",
        "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
        "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port),
    }
    iface = env.get("HOROVOD_GLOO_IFACE") or interface_towards(addr)
    if iface:
        out["HOROVOD_GLOO_IFACE"] = iface
    return out


def _start_server(port: int, plan: list):
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
    from horovod.runner.util.threads import in_thread

    server = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
    server.init(plan)
    in_thread(target=server.serve_forever)
    return server


def _wait_for_server(addr: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr, port), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"hvd_slurm: no Horovod rendezvous server at {addr}:{port} after {timeout:.0f} s "
                    "(task 0 did not start it)"
                ) from exc
            time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: srun ... python -m virgo_exps.launch.hvd_slurm SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    env = dict(os.environ)
    hvd = horovod_env(env)
    env.update(hvd)
    cmd = [sys.executable, *argv]
    addr, port = hvd["HOROVOD_GLOO_RENDEZVOUS_ADDR"], int(hvd["HOROVOD_GLOO_RENDEZVOUS_PORT"])
    if hvd["HOROVOD_RANK"] != "0":
        _wait_for_server(addr, port, RENDEZVOUS_WAIT_S)
        os.execve(sys.executable, cmd, env)
    lay = layout(os.environ)
    try:
        server = _start_server(port, slot_plan(lay["hosts"], lay["counts"]))
    except OSError as exc:
        print(f"hvd_slurm: cannot start the rendezvous server on port {port}: {exc}", file=sys.stderr)
        return 1
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = child.wait()
    server.shutdown()
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
