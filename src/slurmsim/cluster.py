"""The cluster: :class:`SimCluster` (its options, names and state file, starting it and stopping it) and
:func:`stop_from_state`. Its other parts are mixins: the network (:mod:`slurmsim.network`), accounting
(:mod:`slurmsim.accounting`), slurm.conf and the daemons (:mod:`slurmsim.daemons`), teardown
(:mod:`slurmsim.teardown`) and node faults (:mod:`slurmsim.faults`)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .accounting import AccountingMixin
from .constants import ACCOUNTING_PORTS, FINAL_JOB_STATES, PARTITION, STATE_FILE, TAG_ENV
from .daemons import DaemonsMixin
from .errors import ClusterAlreadyRunning, SlurmSimError, SlurmStartError, SlurmUnavailable
from .faults import NodeFaultsMixin
from .install import ensure_installed
from .munge import _acquire_munge
from .network import NetworkMixin, _choose_ports, _hosts_add, _in_managed_block, _resolvable, _short_hostname
from .procs import _alive, _flock, _global_lock, _log, _read_json, _run, _tail, _write_json
from .teardown import TeardownMixin


class SimCluster(NetworkMixin, AccountingMixin, DaemonsMixin, TeardownMixin, NodeFaultsMixin):
    """A real Slurm cluster (slurmctld + slurmd per node) on this machine.

    Attributes available before :meth:`start`: ``workdir``, ``nodes``,
    ``cpus_per_node``, ``tag``, ``node_names``, ``partition``, ``conf_path``,
    ``env``. ``node_addresses`` and ``controller_address`` are known once
    started (or loaded from a state file).
    """

    def __init__(
        self,
        workdir: Path | str,
        nodes: int = 1,
        cpus_per_node: int | None = None,
        *,
        slurmd_timeout: int = 10,
        min_job_age: int = 300,
        kill_wait: int = 5,
        cred_expire: int = 10,
        accounting: bool = False,
        first_job_id: int = 1,
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be >= 1")
        if cpus_per_node is not None and cpus_per_node < 1:
            raise ValueError("cpus_per_node must be >= 1")
        self.workdir = Path(workdir).absolute()
        self.nodes = int(nodes)
        self.multinode = self.nodes >= 2
        if cpus_per_node is None:
            cpus_per_node = 1 if self.multinode else (os.cpu_count() or 1)
        self.cpus_per_node = int(cpus_per_node)
        self.slurmd_timeout = int(slurmd_timeout)
        self.min_job_age = int(min_job_age)
        self.kill_wait = int(kill_wait)
        self.cred_expire = int(cred_expire)
        self.accounting = bool(accounting)
        # Where this cluster's job ids start: clusters on the same host network whose jobs derive a port
        # from their id (20000 + id % 10000) keep apart by starting in different ranges.
        self.first_job_id = int(first_job_id)
        self.tag = hashlib.sha1(str(self.workdir.resolve()).encode()).hexdigest()[:6]
        self.partition = PARTITION
        self.conf_path = self.workdir / "slurm.conf"
        self.logdir = self.workdir / "log"
        self.state_path = self.workdir / STATE_FILE
        if self.multinode:
            self.controller_name = f"vs{self.tag}-ctl"
            self.node_names = [f"vs{self.tag}-n{i}" for i in range(1, self.nodes + 1)]
        else:
            self.controller_name = _short_hostname()
            self.node_names = [self.controller_name]
        self.node_addresses: list[str] = []
        self.controller_address: str | None = None
        self.startup_seconds: float | None = None
        self._state: dict[str, Any] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------ basics
    def __repr__(self) -> str:
        return (
            f"SimCluster(workdir={str(self.workdir)!r}, nodes={self.nodes}, "
            f"cpus_per_node={self.cpus_per_node}, tag={self.tag!r}, accounting={self.accounting})"
        )

    def __enter__(self) -> SimCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Variables to run Slurm commands against this cluster (add to os.environ)."""
        return {"SLURM_CONF": str(self.conf_path), TAG_ENV: self.tag}

    def command_env(self) -> dict[str, str]:
        """A full environment for subprocesses: os.environ minus any SLURM_* +
        :attr:`env` (so an enclosing Slurm job cannot leak into ours)."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        base.update(self.env)
        return base

    def slurm(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command (``cluster.slurm("sinfo", "-N")``) against us."""
        return _run(list(args), check=check, timeout=timeout, env=self.command_env())

    @property
    def netns_names(self) -> list[str]:
        return [f"vs-{self.tag}-n{i}" for i in range(1, self.nodes + 1)] if self.multinode else []

    @property
    def bridge_name(self) -> str | None:
        return f"vsb{self.tag}" if self.multinode else None

    def _spool_base(self) -> Path:
        # slurmstepd binds unix sockets <spool>/<node>_<job>.<step>; keep < 108 chars
        base = self.workdir / "spool"
        if len(str(base)) + 40 > 100:
            base = Path(tempfile.gettempdir()) / f"vss-{self.tag}"
        return base

    # ------------------------------------------------------------ state
    def _save_state(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        _write_json(self.state_path, self._state)

    def _load_state(self) -> dict[str, Any]:
        return _read_json(self.state_path)

    @classmethod
    def from_state(cls, workdir: Path | str) -> SimCluster:
        """Rebuild a handle on a cluster started (possibly) by another process."""
        workdir = Path(workdir).absolute()
        state = _read_json(workdir / STATE_FILE)
        if not state:
            raise SlurmSimError(f"no {STATE_FILE} in {workdir}")
        cluster = cls(
            workdir, nodes=state.get("nodes", 1), cpus_per_node=state.get("cpus_per_node"), **state.get("options", {})
        )
        cluster._state = state
        if state.get("node_names"):
            cluster.node_names = list(state["node_names"])
            cluster.controller_name = state.get("controller_name", cluster.controller_name)
        cluster.node_addresses = list(state.get("node_addresses", []))
        cluster.controller_address = state.get("controller_address")
        return cluster

    def _daemon_pids(
        self,
        state: dict[str, Any] | None = None,
    ) -> list[tuple[str, int, int | None]]:
        state = self._state if state is None else state
        out = []
        for name, rec in state.get("daemons", {}).items():
            out.append((name, rec.get("pid"), rec.get("starttime")))
        return out

    def is_running(self) -> bool:
        """True if any daemon recorded in the state file is still alive."""
        state = self._state or self._load_state()
        return any(_alive(pid, st) for _, pid, st in self._daemon_pids(state))

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60, *, warmup: bool = True) -> SimCluster:
        """Start the cluster and wait until every node is idle.

        With ``warmup`` (default) a trivial batch job running ``srun`` on every
        node is run to completion first: it proves that jobs really launch on
        all nodes, and it absorbs slurmctld's slow first scheduling pass (a
        first batch job otherwise waits ~3 s for the backfill scheduler, which
        makes the first ``sbatch -W`` return only after its 10 s poll).
        """
        t0 = time.monotonic()
        ensure_installed(self.multinode, accounting=self.accounting)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with _flock(self.workdir / ".slurmsim.lock"):
            old = self._load_state()
            if old:
                if any(_alive(pid, st) for _, pid, st in self._daemon_pids(old)):
                    raise ClusterAlreadyRunning(
                        f"a Slurm simulator cluster is already running from "
                        f"{self.workdir} (state {self.state_path}); stop it with "
                        f"`python -m slurmsim down --dir {self.workdir}`"
                    )
                # stale state from a crashed session: clean up what it left
                stale = SimCluster.from_state(self.workdir)
                stale._teardown()
            self._state = {
                "version": 1,
                "tag": self.tag,
                "workdir": str(self.workdir),
                "nodes": self.nodes,
                "cpus_per_node": self.cpus_per_node,
                "multinode": self.multinode,
                "node_names": self.node_names,
                "controller_name": self.controller_name,
                "partition": self.partition,
                "conf": str(self.conf_path),
                "owner_pid": os.getpid(),
                "started_at": time.time(),
                "spool": str(self._spool_base()),
                "options": {
                    "slurmd_timeout": self.slurmd_timeout,
                    "min_job_age": self.min_job_age,
                    "kill_wait": self.kill_wait,
                    "cred_expire": self.cred_expire,
                    "accounting": self.accounting,
                    "first_job_id": self.first_job_id,
                },
            }
            self._save_state()
            try:
                self._start_locked(timeout)
                if warmup:
                    self._warmup(timeout)
            except BaseException as exc:
                tails = self._log_tails()
                try:
                    self._teardown()
                except Exception as cleanup_exc:  # pragma: no cover - best effort
                    tails += f"\n(teardown after failed start also failed: {cleanup_exc})"
                if isinstance(exc, (SlurmStartError, SlurmUnavailable, KeyboardInterrupt)):
                    raise
                raise SlurmStartError(f"starting the cluster failed: {exc}\n{tails}") from exc
        self.startup_seconds = time.monotonic() - t0
        _log(f"cluster {self.tag} up in {self.startup_seconds:.1f}s")
        return self

    def _start_locked(self, timeout: float) -> None:
        for sub in ("state", "run", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        spool = self._spool_base()
        for name in self.node_names:
            (spool / f"spool-{name}").mkdir(parents=True, exist_ok=True)
        if self.multinode:
            self._setup_network()
        else:
            self.controller_address = "127.0.0.1"
            # A name that resolves only through another cluster's block gets a block of this cluster's
            # own: the other one goes when its cluster stops.
            with _global_lock():  # decided and added at once: another cluster may remove its block meanwhile
                name = self.node_names[0]
                own = _resolvable(name) and not _in_managed_block(name)
                self.node_addresses = [socket.gethostbyname(name) if own else "127.0.0.1"]
                if not own:
                    self._state["hosts_block"] = True
                    self._save_state()
                    _hosts_add(self.tag, [("127.0.0.1", name)], locked=True)
            self._state.update(controller_address=self.controller_address, node_addresses=self.node_addresses)
        self._state["munge_user"] = True
        self._save_state()
        _acquire_munge(self.tag, self.workdir, self.logdir)
        with _global_lock():
            ctld_port, slurmd_port = _choose_ports(self.tag)
            self._state.update(slurmctld_port=ctld_port, slurmd_port=slurmd_port)
            if self.accounting:
                self._state["accounting_ports"] = _choose_ports(self.tag, ACCOUNTING_PORTS, "MariaDB/slurmdbd")
            self._write_conf(ctld_port, slurmd_port)
            if self.accounting:
                self._start_accounting(timeout)
            self._spawn("slurmctld", self._slurmctld_argv())
            # wait for slurmctld to listen before releasing the port lock
            deadline = time.monotonic() + min(timeout, 30)
            while self.slurm("scontrol", "ping", check=False, timeout=15).returncode != 0:
                self._check_daemons_alive()
                if time.monotonic() > deadline:
                    raise SlurmStartError("slurmctld does not answer `scontrol ping`\n" + self._log_tails())
                time.sleep(0.2)
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", self._slurmd_argv(name))
        self.wait_nodes(timeout=timeout)

    def _warmup(self, timeout: float) -> None:
        job_id = (
            self.slurm(
                "sbatch",
                "--parsable",
                "-J",
                "slurmsim-warmup",
                "-N",
                str(self.nodes),
                "--ntasks-per-node=1",
                "-o",
                str(self.logdir / "warmup-%j.out"),
                "--chdir",
                str(self.workdir),
                "--wrap",
                "srun hostname",
            )
            .stdout.strip()
            .split(";")[0]
        )
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            self._check_daemons_alive()
            out = self.slurm("scontrol", "show", "job", job_id, check=False).stdout
            for word in out.split():
                if word.startswith("JobState="):
                    state = word.split("=", 1)[1]
            if state == "COMPLETED":
                return
            if state in FINAL_JOB_STATES:
                break
            time.sleep(0.1)
        raise SlurmStartError(
            f"warm-up job {job_id} did not complete (state {state}):\n"
            + _tail(self.logdir / f"warmup-{job_id}.out")
            + "\n"
            + self._log_tails()
        )

    def stop(self) -> None:
        """Stop everything this cluster started; safe to call more than once."""
        if not self._state:
            self._state = self._load_state()
        if not self._state:
            return
        with _flock(self.workdir / ".slurmsim.lock"):
            self._teardown()


def stop_from_state(workdir: Path | str) -> bool:
    """Stop the cluster recorded in ``workdir``; False if there was none."""
    workdir = Path(workdir)
    if not (workdir / STATE_FILE).exists():
        return False
    SimCluster.from_state(workdir).stop()
    return True
