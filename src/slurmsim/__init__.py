"""Start and stop a *real* Slurm cluster on this machine, for tests and demos.

Two modes:

* ``nodes == 1`` -- host mode: one ``slurmd`` named after the real short
  hostname, no namespaces, ``CPUs = os.cpu_count()`` by default.
* ``nodes >= 2`` -- network-namespace mode: one network namespace per node,
  all joined to a private bridge; each ``slurmd`` runs inside its namespace
  under its own UTS namespace (so ``hostname`` inside a job is the node name).
  Processes on different nodes talk to each other over real TCP through the
  bridge. ``cpus_per_node`` defaults to 1; more than the machine really has is
  allowed (``SlurmdParameters=config_overrides``).

Everything (slurm.conf, logs, state, spool) lives in ``workdir``; a JSON state
file there records every pid and every system object created (namespaces,
bridge, ``/etc/hosts`` block), so ``python -m slurmsim down --dir
WORKDIR`` can tear the cluster down from another process. All processes are
stopped by pid (checked against their start time, so a recycled pid is never
signalled).

Needs root (daemons, namespaces, ``/etc/hosts``). Missing Debian packages
(``slurmctld slurmd slurm-client munge``) are installed with ``apt-get`` when
running as root; otherwise :class:`SlurmUnavailable` is raised.

With ``accounting=True`` (``up --accounting``) the cluster keeps Slurm's job
accounting, as a site does: a MariaDB server (``mariadb-server``) with its data
in ``workdir/db``, and ``slurmdbd`` (``slurmdbd``) in front of it, started
before slurmctld and stopped with the cluster; steps are sampled by
``jobacct_gather/linux`` every 5 s, so ``sacct`` reports Elapsed, TotalCPU,
AllocCPUS and MaxRSS of every job. Without it ``sacct`` answers that
accounting storage is disabled.

Behaviour of this Slurm (22.05) worth knowing (measured here):

* ``sbatch -W`` polls slurmctld after 2 s, then 8 s, then every 32 s (the
  growth stops once the sleep reaches MinJobAge/2): with the default
  ``min_job_age=300`` a job of 3 s returns after 10 s and one of 12 s after
  42 s. ``min_job_age<=5`` keeps polling every 2 s, ``<=17`` every 8 s (but
  finished jobs then vanish from ``scontrol show job`` sooner). Its exit code
  is the job's exit code, or 1 when the job was killed by a signal (TIMEOUT,
  CANCELLED). It keeps waiting across requeues and returns the final run's code.
* ``--time`` has minute granularity: ``--time=0:30`` becomes a 1 minute limit.
  Limits are enforced by a 30 s periodic check, so a job may overrun by up to
  ~30 s (SIGTERM, then SIGKILL after ``kill_wait``); ``--signal=B:USR1@N``
  may arrive up to 60 s *earlier* than N seconds before the limit.
* A requeued job waits ``cred_expire`` s (AuthInfo, default here 10 s instead
  of Slurm's 120 s) before it may start again; the schedulers run every 3 s.
* A killed node (:meth:`SimCluster.kill_node`) is marked DOWN after ~25-30 s.
  ``JobRequeue=1`` makes batch jobs requeueable by default, so its jobs are
  requeued (``Restarts`` + 1); ``--no-requeue`` jobs end in NODE_FAIL with
  ExitCode 0:0, and ``sbatch -W`` then exits 0: check ``JobState`` too.

Usage::

    with SimCluster(tmp / "slurm", nodes=2, cpus_per_node=2) as cluster:
        subprocess.run(["sbatch", "-W", "job.sh"], env={**os.environ, **cluster.env})

CLI::

    python -m slurmsim up --dir DIR [--nodes N] [--cpus-per-node C]
    python -m slurmsim status --dir DIR
    python -m slurmsim down --dir DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "SimCluster",
    "SlurmSimError",
    "SlurmUnavailable",
    "ClusterAlreadyRunning",
    "SlurmStartError",
    "ensure_installed",
    "missing_commands",
    "stop_from_state",
    "main",
]

STATE_FILE = "slurmsim-state.json"
TAG_ENV = "VIRGO_SLURMSIM_TAG"
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
ACCOUNTING_COMMANDS = ("slurmdbd", "sacct", "sacctmgr", "mariadbd", "mariadb-install-db", "mariadb")
SLURM_COMMANDS = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
MUNGE_COMMANDS = ("munged", "munge", "unmunge")
NETNS_COMMANDS = ("ip", "nsenter", "unshare", "hostname")
HOSTS_FILE = Path("/etc/hosts")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts namespaces
PARTITION = "debug"
# Idle node states as printed by `sinfo -o %T` (no trailing flag characters).
_READY_STATES = {"idle"}


class SlurmSimError(RuntimeError):
    """Base class of every error raised by this module."""


class SlurmUnavailable(SlurmSimError):
    """Slurm cannot be used here at all (not root, cannot install, no netns)."""


class ClusterAlreadyRunning(SlurmSimError):
    """A cluster started from the same workdir is still running."""


class SlurmStartError(SlurmSimError):
    """The daemons did not come up; the message carries the log tails."""


# --------------------------------------------------------------------------
# small process helpers
# --------------------------------------------------------------------------


def _log(msg: str) -> None:
    if os.environ.get("VIRGO_SLURMSIM_VERBOSE"):
        print(f"[slurmsim] {msg}", file=sys.stderr, flush=True)


def _run(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    _log("$ " + shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise SlurmSimError(
            f"command failed (rc={proc.returncode}): {shlex.join(cmd)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of a process, None if it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] is field 3 (state); field 4 ppid; field 22 starttime
    return rest[0], int(rest[1]), int(rest[19])


def _starttime(pid: int) -> int | None:
    st = _proc_stat(pid)
    return None if st is None else st[2]


def _alive(pid: int | None, starttime: int | None = None) -> bool:
    """True if pid runs (not a zombie) and, if given, started at starttime."""
    if not pid:
        return False
    st = _proc_stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return starttime is None or st[2] == starttime


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in _all_pids():
        st = _proc_stat(pid)
        if st is not None:
            kids.setdefault(st[1], []).append(pid)
    return kids


def _descendants(roots: Iterable[int]) -> set[int]:
    kids = _children_map()
    out: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        for child in kids.get(pid, []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _protected_pids() -> set[int]:
    """This process and its ancestors: never signalled."""
    out = set()
    pid = os.getpid()
    while pid > 1:
        out.add(pid)
        st = _proc_stat(pid)
        if st is None:
            break
        pid = st[1]
    out.add(1)
    return out


def _kill_pids(
    pids: Iterable[tuple[int, int | None]], *, grace: float = 5.0, first_signal: int = signal.SIGTERM
) -> list[int]:
    """Signal (pid, starttime) pairs, escalate to SIGKILL after ``grace`` s.

    Returns the pids that were still alive at the end (should be empty).
    """
    protected = _protected_pids()
    targets = {pid: st for pid, st in pids if pid and pid not in protected}
    for pid, st in list(targets.items()):
        if not _alive(pid, st):
            targets.pop(pid)
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, first_signal)
    deadline = time.monotonic() + grace
    while targets and time.monotonic() < deadline:
        _reap_children()
        targets = {p: s for p, s in targets.items() if _alive(p, s)}
        if targets:
            time.sleep(0.1)
    for pid, st in targets.items():
        if _alive(pid, st):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while targets and time.monotonic() < deadline:
        _reap_children()
        targets = {p: s for p, s in targets.items() if _alive(p, s)}
        if targets:
            time.sleep(0.1)
    return sorted(targets)


def _reap_children() -> None:
    """Reap our own exited children (daemons we started with Popen)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path.name}: not found)"
    return "\n".join(text[-lines:]) or f"({path.name}: empty)"


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _global_lock() -> contextlib.AbstractContextManager[None]:
    """Serialises system-wide edits (subnets, ports, /etc/hosts, munged)."""
    return _flock(Path(tempfile.gettempdir()) / "virgo-slurmsim.lock")


# --------------------------------------------------------------------------
# installation and munge
# --------------------------------------------------------------------------


def missing_commands(multinode: bool = False, accounting: bool = False) -> list[str]:
    cmds = list(SLURM_COMMANDS + MUNGE_COMMANDS)
    if multinode:
        cmds += list(NETNS_COMMANDS)
    if accounting:
        cmds += list(ACCOUNTING_COMMANDS)
    return [c for c in cmds if shutil.which(c) is None]


def _is_root() -> bool:
    return os.geteuid() == 0


def ensure_installed(multinode: bool = False, *, install: bool = True, accounting: bool = False) -> None:
    """Make sure Slurm, munge (and the netns tools, slurmdbd and MariaDB) are present.

    Installs the Debian packages with apt-get when running as root. Raises
    :class:`SlurmUnavailable` with a readable reason otherwise.
    """
    if not _is_root():
        raise SlurmUnavailable(
            f"the Slurm simulator needs root (daemons, network namespaces, /etc/hosts); current euid is {os.geteuid()}"
        )
    missing = missing_commands(multinode, accounting)
    if not missing:
        return
    if not install:
        raise SlurmUnavailable(f"missing commands: {', '.join(missing)}")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(
            f"missing commands {', '.join(missing)} and no apt-get to install "
            f"them (need packages: {' '.join(APT_PACKAGES)})"
        )
    pkgs = list(APT_PACKAGES)
    if multinode:
        pkgs += ["iproute2", "util-linux"]
    if accounting:
        pkgs += list(ACCOUNTING_PACKAGES)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _global_lock():
        missing = missing_commands(multinode, accounting)
        if not missing:
            return
        try:
            _run(["apt-get", "update"], env=env, timeout=600)
            _run(["apt-get", "install", "-y", "--no-install-recommends", *pkgs], env=env, timeout=1200)
        except (SlurmSimError, subprocess.TimeoutExpired) as exc:
            raise SlurmUnavailable(f"could not install {' '.join(pkgs)} with apt-get: {exc}") from exc
    missing = missing_commands(multinode, accounting)
    if missing:
        raise SlurmUnavailable(f"still missing after apt-get install: {', '.join(missing)}")


def _cmd_install(args: argparse.Namespace) -> int:
    """``python -m slurmsim install``: what the Slurm tests need, multi-node tools and accounting included.

    A no-op when everything is there. Without ``--strict`` a failure only warns
    (exit 0), so ``make test`` goes on and the Slurm tests skip with their
    reason; with it: 1 apt-get failed, 2 not root or no apt-get.
    """
    missing = missing_commands(multinode=True, accounting=True)
    if not missing:
        return 0
    print(f"install_slurm: missing {' '.join(missing)}", file=sys.stderr)
    # Slurm first, accounting (slurmdbd, MariaDB) apart: a failure of the
    # second leaves the Slurm tests running and only the accounting ones skipped.
    try:
        ensure_installed(multinode=True)
    except SlurmUnavailable as exc:
        print(f"install_slurm: {exc}", file=sys.stderr)
        if args.strict:
            return 2 if not _is_root() or shutil.which("apt-get") is None else 1
        print("install_slurm: the Slurm tests will be skipped", file=sys.stderr)
        return 0
    try:
        ensure_installed(multinode=True, accounting=True)
    except SlurmUnavailable as exc:
        print(f"install_slurm: accounting: {exc}", file=sys.stderr)
        if args.strict:
            return 1
        print("install_slurm: the accounting tests will be skipped", file=sys.stderr)
    version = _run(["sbatch", "--version"], check=False).stdout.split()[-1:]
    print(f"install_slurm: Slurm {' '.join(version)} and munge installed", file=sys.stderr)
    return 0


def _munge_works() -> bool:
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
        return check.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _munge_registry() -> Path:
    return Path(tempfile.gettempdir()) / "virgo-slurmsim-munged.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _acquire_munge(tag: str, workdir: Path, logdir: Path) -> None:
    """Ensure munged answers; register ``tag`` as a user if we run munged.

    Only a munged started by this module is ever stopped, and only when the
    last cluster that relies on it stops (reference list in a registry file).
    """
    with _global_lock():
        reg_path = _munge_registry()
        reg = _read_json(reg_path)
        ours = bool(reg) and _alive(reg.get("pid"), reg.get("starttime"))
        if _munge_works():
            if ours:
                users = reg.setdefault("users", {})
                users[tag] = str(workdir)
                _write_json(reg_path, reg)
            return
        # not working: start our own munged
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            if shutil.which("mungekey"):
                _run(["mungekey", "--create", "--keyfile", str(key)])
            else:
                raise SlurmUnavailable(f"{key} missing and no mungekey to create it")
        rundir = Path("/run/munge")
        rundir.mkdir(parents=True, exist_ok=True)
        user_kw: dict[str, Any] = {}
        try:
            import pwd

            pw = pwd.getpwnam("munge")
            os.chown(rundir, pw.pw_uid, pw.pw_gid)
            os.chmod(rundir, 0o755)
            user_kw = {"user": pw.pw_uid, "group": pw.pw_gid}
        except (KeyError, ImportError):
            pass
        logdir.mkdir(parents=True, exist_ok=True)
        with open(logdir / "munged.out", "ab") as out:
            proc = subprocess.Popen(
                ["munged", "--foreground", "--force"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **user_kw,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _munge_works():
                _write_json(
                    reg_path, {"pid": proc.pid, "starttime": _starttime(proc.pid), "users": {tag: str(workdir)}}
                )
                return
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise SlurmStartError("munged did not start:\n" + _tail(logdir / "munged.out"))


def _release_munge(tag: str) -> None:
    with _global_lock():
        reg_path = _munge_registry()
        reg = _read_json(reg_path)
        if not reg:
            return
        users: dict[str, str] = reg.get("users", {})
        users.pop(tag, None)
        # forget clusters whose state file vanished (crashed sessions cleaned up)
        for other, wd in list(users.items()):
            if not (Path(wd) / STATE_FILE).exists():
                users.pop(other)
        if users:
            _write_json(reg_path, reg)
            return
        _kill_pids([(reg.get("pid"), reg.get("starttime"))])
        with contextlib.suppress(FileNotFoundError):
            reg_path.unlink()


# --------------------------------------------------------------------------
# networking helpers
# --------------------------------------------------------------------------


def _used_networks() -> list[ipaddress.IPv4Network]:
    nets: list[ipaddress.IPv4Network] = []
    for cmd in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show"]):
        proc = _run(cmd, check=False)
        for line in proc.stdout.splitlines():
            for word in line.split():
                if "/" in word or word[:1].isdigit():
                    with contextlib.suppress(ValueError):
                        nets.append(ipaddress.ip_network(word, strict=False))
    return nets


def _choose_subnet(tag: str) -> ipaddress.IPv4Network:
    used = _used_networks()
    start = int(tag, 16)
    for i in range(250):
        third = (start + i) % 250 + 1
        net = ipaddress.ip_network(f"10.213.{third}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise SlurmSimError("no free 10.213.x.0/24 subnet for the simulated cluster")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


# The daemons' ports lie below 20000: a job's rendezvous port is 20000 + its id % 10000
# (virgo_exps.launch.protocol), and a daemon listening there would refuse that job later.
DAEMON_PORTS = 16000  # slurmctld/slurmd pairs: 16000-19999
ACCOUNTING_PORTS = 12000  # MariaDB/slurmdbd pairs: 12000-15999


def _choose_ports(tag: str, first: int = DAEMON_PORTS, what: str = "slurmctld/slurmd") -> tuple[int, int]:
    base = first + 2 * (int(tag, 16) % 2000)
    for i in range(2000):
        port = first + (base - first + 2 * i) % 4000
        if _port_free(port) and _port_free(port + 1):
            return port, port + 1
    raise SlurmSimError(f"no free port pair for {what}")


def _hosts_markers(tag: str) -> tuple[str, str]:
    return (f"# >>> virgo-slurmsim {tag} (managed block, removed on stop)", f"# <<< virgo-slurmsim {tag}")


def _hosts_rewrite(text: str) -> None:
    """Give /etc/hosts the content ``text`` in place (it is often a bind mount: no rename), never empty
    on the way: the new content is written over the old, then the rest cut off, so a name lookup of
    another process in between sees the old lines or the new ones (and at worst a stale tail)."""
    data = text.encode()
    with open(HOSTS_FILE, "r+b" if HOSTS_FILE.exists() else "wb") as fh:
        old = len(fh.read())
        fh.seek(0)
        # a shorter text is padded with empty lines up to the old length first, so that what a reader
        # may see before the cut is the new lines and empty ones, never the tail of an old line
        fh.write(data + b"\n" * max(0, old - len(data)))
        fh.flush()
        fh.truncate(len(data))


def _in_managed_block(name: str) -> bool:
    """Whether ``name`` is in a block of /etc/hosts that some cluster added (and removes when it stops)."""
    try:
        lines = HOSTS_FILE.read_text().splitlines()
    except FileNotFoundError:
        return False
    inside = False
    for line in lines:
        if line.startswith("# >>> virgo-slurmsim "):
            inside = True
        elif line.startswith("# <<< virgo-slurmsim "):
            inside = False
        elif inside and name in line.split()[1:]:
            return True
    return False


def _hosts_add(tag: str, entries: list[tuple[str, str]], *, locked: bool = False) -> None:
    begin, end = _hosts_markers(tag)
    block = [begin] + [f"{addr} {name}" for addr, name in entries] + [end]
    with contextlib.nullcontext() if locked else _global_lock():
        text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
        if begin in text.splitlines():
            _hosts_remove(tag, locked=True)
            text = HOSTS_FILE.read_text()
        if text and not text.endswith("\n"):
            text += "\n"
        _hosts_rewrite(text + "\n".join(block) + "\n")


def _hosts_remove(tag: str, *, locked: bool = False) -> bool:
    begin, end = _hosts_markers(tag)
    ctx = contextlib.nullcontext() if locked else _global_lock()
    with ctx:
        try:
            lines = HOSTS_FILE.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            return False
        out, inside, found = [], False, False
        for line in lines:
            stripped = line.rstrip("\n")
            if not inside and stripped == begin:
                inside, found = True, True
                continue
            if inside:
                if stripped == end:
                    inside = False
                continue
            out.append(line)
        if found:
            _hosts_rewrite("".join(out))
        return found


def _hosts_has_block(tag: str) -> bool:
    begin, _ = _hosts_markers(tag)
    try:
        return begin in HOSTS_FILE.read_text().splitlines()
    except FileNotFoundError:
        return False


def _link_exists(name: str) -> bool:
    return _run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def _netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def _netns_pids(name: str) -> list[int]:
    if not _netns_exists(name):
        return []
    proc = _run(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _resolvable(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _mem_total_mb() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 4096


# --------------------------------------------------------------------------
# the cluster
# --------------------------------------------------------------------------


class SimCluster:
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

    # ------------------------------------------------------------ config
    def _write_conf(self, ctld_port: int, slurmd_port: int) -> None:
        wd = self.workdir
        spool = self._spool_base()
        mem = max(256, int(_mem_total_mb() * 0.8) // self.nodes)
        if self.multinode:
            ctl_host = f"{self.controller_name}({self.controller_address})"
            node_lines = [
                f"NodeName={name} NodeAddr={addr} NodeHostname={name} "
                f"CPUs={self.cpus_per_node} RealMemory={mem} State=UNKNOWN"
                for name, addr in zip(self.node_names, self.node_addresses)
            ]
        else:
            ctl_host = self.controller_name
            node_lines = [f"NodeName={self.node_names[0]} CPUs={self.cpus_per_node} RealMemory={mem} State=UNKNOWN"]
        true_prog = shutil.which("true") or "true"
        lines = [
            "# generated by slurmsim -- do not edit",
            f"ClusterName=vs{self.tag}",
            f"SlurmctldHost={ctl_host}",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # also the delay before a requeued job may start again (default 120 s)
            f"AuthInfo=cred_expire={self.cred_expire}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={wd / 'state'}",
            f"SlurmdSpoolDir={spool}/spool-%n",
            f"SlurmctldPidFile={wd / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={wd / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logdir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logdir / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            # rerun the schedulers every few seconds (defaults 60 s / 30 s), so a
            # requeued job starts soon after its cred_expire hold; and allow the main
            # scheduler to run right after startup (sched_min_interval, in us) and
            # to start a batch job at submission (batch_sched_delay, default 3 s)
            "SchedulerParameters=sched_interval=3,bf_interval=3,sched_min_interval=100000,batch_sched_delay=0",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            *self._accounting_conf(),
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.logdir / 'jobcomp.log'}",
            "JobRequeue=1",
            f"MinJobAge={self.min_job_age}",
            f"FirstJobId={self.first_job_id}",
            f"KillWait={self.kill_wait}",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            f"SlurmdTimeout={self.slurmd_timeout}",
            "SlurmctldTimeout=10",
            "MessageTimeout=10",
            "Waittime=0",
            f"MailProg={true_prog}",
            *node_lines,
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------ accounting
    def _accounting_conf(self) -> list[str]:
        """slurm.conf lines for accounting: slurmdbd and per-step sampling, or none at all."""
        if not self.accounting:
            return ["JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none"]
        _, dbd_port = self._state["accounting_ports"]
        return [
            "JobAcctGatherType=jobacct_gather/linux",
            "JobAcctGatherFrequency=task=5",
            "AccountingStorageType=accounting_storage/slurmdbd",
            # slurmctld runs in the host's network namespace in both modes
            "AccountingStorageHost=127.0.0.1",
            f"AccountingStoragePort={dbd_port}",
        ]

    def _start_accounting(self, timeout: float) -> None:
        """MariaDB (data in workdir/db) and slurmdbd, then this cluster registered; before slurmctld."""
        db_port, dbd_port = self._state["accounting_ports"]
        db = self.workdir / "db"
        sock = self.workdir / "run" / "mariadb.sock"
        if not (db / "mysql").is_dir():
            shutil.rmtree(db, ignore_errors=True)
            _run(
                [
                    "mariadb-install-db",
                    "--no-defaults",
                    f"--datadir={db}",
                    "--user=root",
                    "--auth-root-authentication-method=socket",
                    "--skip-test-db",
                ],
                timeout=300,
            )
        self._spawn(
            "mariadbd",
            [
                shutil.which("mariadbd") or "mariadbd",
                "--no-defaults",
                f"--datadir={db}",
                "--user=root",
                f"--socket={sock}",
                "--bind-address=127.0.0.1",
                f"--port={db_port}",
                f"--pid-file={self.workdir / 'run' / 'mariadb.pid'}",
                f"--log-error={self.logdir / 'mariadb.log'}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
            ],
        )
        password = hashlib.sha1(f"slurmsim-{self.tag}-{time.time()}".encode()).hexdigest()[:16]
        grant = (
            f"CREATE OR REPLACE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )
        deadline = time.monotonic() + min(timeout, 60)
        while _run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", grant], check=False).returncode:
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise SlurmStartError("MariaDB does not answer on its socket\n" + _tail(self.logdir / "mariadb.log"))
            time.sleep(0.3)
        dbd_conf = self.workdir / "slurmdbd.conf"  # slurmdbd reads it beside $SLURM_CONF
        dbd_conf.touch(mode=0o600)
        dbd_conf.chmod(0o600)  # slurmdbd refuses a conf that others may read (it holds the password)
        dbd_conf.write_text(
            "\n".join(
                [
                    "# generated by slurmsim -- do not edit",
                    "AuthType=auth/munge",
                    "DbdAddr=127.0.0.1",
                    "DbdHost=localhost",
                    f"DbdPort={dbd_port}",
                    "SlurmUser=root",
                    "DebugLevel=info",
                    f"LogFile={self.logdir / 'slurmdbd.log'}",
                    f"PidFile={self.workdir / 'run' / 'slurmdbd.pid'}",
                    "StorageType=accounting_storage/mysql",
                    "StorageHost=127.0.0.1",
                    f"StoragePort={db_port}",
                    "StorageUser=slurm",
                    f"StoragePass={password}",
                    "StorageLoc=slurm_acct_db",
                ]
            )
            + "\n"
        )
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        while self.slurm("sacctmgr", "-n", "list", "cluster", check=False, timeout=15).returncode:
            self._check_daemons_alive()
            if time.monotonic() > deadline:
                raise SlurmStartError("slurmdbd does not answer sacctmgr\n" + _tail(self.logdir / "slurmdbd.log"))
            time.sleep(0.3)
        listed = self.slurm("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster").stdout.split()
        if f"vs{self.tag}" not in listed:
            self.slurm("sacctmgr", "-i", "add", "cluster", f"vs{self.tag}")

    # ------------------------------------------------------------ network
    def _setup_network(self) -> None:
        assert self.multinode
        br = self.bridge_name
        assert br is not None
        net_state = self._state.setdefault("network", {"netns": [], "links": []})
        with _global_lock():
            subnet = _choose_subnet(self.tag)
            hosts = list(subnet.hosts())
            self.controller_address = str(hosts[0])
            self.node_addresses = [str(hosts[10 + i]) for i in range(self.nodes)]
            self._state.update(
                controller_address=self.controller_address, node_addresses=self.node_addresses, subnet=str(subnet)
            )
            net_state["bridge"] = br
            self._save_state()
            try:
                _run(["ip", "link", "add", br, "type", "bridge"])
            except SlurmSimError as exc:
                if "Operation not permitted" in str(exc):
                    raise SlurmUnavailable(f"cannot create network devices here: {exc}") from exc
                raise
            _run(["ip", "addr", "add", f"{self.controller_address}/{subnet.prefixlen}", "dev", br])
            _run(["ip", "link", "set", br, "up"])
        for i, (ns, addr) in enumerate(zip(self.netns_names, self.node_addresses), 1):
            host_if, peer_if = f"vs{self.tag}h{i}", f"vs{self.tag}p{i}"
            net_state["netns"].append(ns)
            net_state["links"].append(host_if)
            self._save_state()
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if])
            _run(["ip", "link", "set", peer_if, "netns", ns])
            _run(["ip", "-n", ns, "link", "set", peer_if, "name", "eth0"])
            _run(["ip", "link", "set", host_if, "master", br])
            _run(["ip", "link", "set", host_if, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/{subnet.prefixlen}", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", self.controller_address])
        entries = [(self.controller_address, self.controller_name)]
        entries += list(zip(self.node_addresses, self.node_names))
        self._state["hosts_block"] = True
        self._save_state()
        _hosts_add(self.tag, entries)

    # ------------------------------------------------------------ daemons
    def _daemon_env(self) -> dict[str, str]:
        env = self.command_env()
        env.pop("NOTIFY_SOCKET", None)
        return env

    def _spawn(self, key: str, argv: list[str]) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.logdir / f"{key}.out", "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._daemon_env(),
                start_new_session=True,
                cwd=self.workdir,
            )
        self._procs[key] = proc
        # the pid may still be nsenter/unshare/sh until it execs the daemon;
        # the start time does not change across exec, so record it now
        self._state.setdefault("daemons", {})[key] = {"pid": proc.pid, "starttime": _starttime(proc.pid), "argv": argv}
        self._save_state()

    def _slurmd_argv(self, name: str) -> list[str]:
        conf = str(self.conf_path)
        if not self.multinode:
            return ["slurmd", "-D", "-f", conf, "-N", name]
        ns = self.netns_names[self.node_names.index(name)]
        return [
            "nsenter",
            f"--net={NETNS_DIR / ns}",
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$1" && exec slurmd -D -f "$2" -N "$1"',
            "sh",
            name,
            conf,
        ]

    def _slurmctld_argv(self) -> list[str]:
        conf = str(self.conf_path)
        if not self.multinode:
            return ["slurmctld", "-D", "-i", "-f", conf]
        return [
            "unshare",
            "--uts",
            "sh",
            "-c",
            'hostname "$1" && exec slurmctld -D -i -f "$2"',
            "sh",
            self.controller_name,
            conf,
        ]

    def _log_tails(self) -> str:
        parts = []
        files = [self.logdir / "slurmctld.log", self.logdir / "slurmctld.out"]
        if self.accounting:
            files += [self.logdir / "slurmdbd.log", self.logdir / "slurmdbd.out", self.logdir / "mariadb.log"]
        for name in self.node_names:
            files += [self.logdir / f"slurmd-{name}.log", self.logdir / f"slurmd-{name}.out"]
        for path in files:
            parts.append(f"--- {path} (tail) ---\n{_tail(path)}")
        return "\n".join(parts)

    def node_states(self) -> dict[str, str]:
        """{node name: state} as reported by sinfo (e.g. 'idle', 'down*')."""
        proc = self.slurm("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
        states: dict[str, str] = {}
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                parts = line.split()
                if len(parts) == 2:
                    states[parts[0]] = parts[1]
        return states

    def wait_nodes(
        self, names: Iterable[str] | None = None, *, states: Iterable[str] = ("idle",), timeout: float = 60
    ) -> None:
        """Wait until every node in ``names`` reports one of ``states``."""
        names = list(self.node_names if names is None else names)
        wanted = set(states)
        deadline = time.monotonic() + timeout
        last: dict[str, str] = {}
        while True:
            self._check_daemons_alive()
            last = self.node_states()
            if all(last.get(n) in wanted for n in names):
                return
            if time.monotonic() > deadline:
                raise SlurmStartError(f"nodes not {sorted(wanted)} after {timeout:.0f}s: {last}\n" + self._log_tails())
            time.sleep(0.3)

    def _check_daemons_alive(self) -> None:
        for key, proc in self._procs.items():
            if proc.poll() is not None:
                raise SlurmStartError(f"{key} exited with code {proc.returncode}\n" + self._log_tails())

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
            if state in (
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "DEADLINE",
                "PREEMPTED",
            ):
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

    def _job_pids(self) -> list[tuple[int, int | None]]:
        """slurmstepd processes of this cluster (they inherit the tag from
        slurmd) plus all their descendants, and everything in our netns."""
        needle = f"{TAG_ENV}={self.tag}".encode()
        daemons = {pid for _, pid, _ in self._daemon_pids()}
        steps = [
            pid
            for pid in _all_pids()
            if pid not in daemons and _cmdline(pid).startswith("slurmstepd") and _environ_has(pid, needle)
        ]
        pids = set(steps) | _descendants(steps)
        for ns in self._state.get("network", {}).get("netns", []):
            pids.update(_netns_pids(ns))
        return [(pid, _starttime(pid)) for pid in pids]

    def _teardown(self) -> None:
        state = self._state
        if not state:
            return
        daemons = [(pid, st) for _, pid, st in self._daemon_pids(state) if _alive(pid, st)]
        # helpers forked by the daemons (slurmctld's slurmscriptd, prologs)
        daemons += [(pid, _starttime(pid)) for pid in _descendants(pid for pid, _ in daemons)]
        ctld = state.get("daemons", {}).get("slurmctld", {})
        if _alive(ctld.get("pid"), ctld.get("starttime")):
            # cancel jobs so that slurmstepds end cleanly (best effort, quick)
            with contextlib.suppress(Exception):
                q = self.slurm("squeue", "-h", "-o", "%i", check=False, timeout=10)
                ids = q.stdout.split()
                if ids:
                    self.slurm("scancel", *ids, check=False, timeout=10)
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline:
                        q = self.slurm("squeue", "-h", "-t", "R,CG", "-o", "%i", check=False, timeout=10)
                        if not q.stdout.split():
                            break
                        time.sleep(0.2)
        jobs = self._job_pids()
        left = _kill_pids(jobs, grace=0.5, first_signal=signal.SIGKILL)
        left += _kill_pids(daemons, grace=5)
        left += _kill_pids(self._job_pids(), grace=0.5, first_signal=signal.SIGKILL)
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self._procs.clear()
        if left:
            raise SlurmSimError(f"could not kill pids {left}")
        state["daemons"] = {}
        self._save_state()
        if state.get("munge_user"):
            _release_munge(self.tag)
            state["munge_user"] = False
        net = state.get("network", {})
        errors = []
        for ns in net.get("netns", []):
            if _netns_exists(ns):
                proc = _run(["ip", "netns", "del", ns], check=False)
                if proc.returncode != 0:
                    errors.append(proc.stderr.strip())
        for link in net.get("links", []) + ([net["bridge"]] if net.get("bridge") else []):
            if _link_exists(link):
                proc = _run(["ip", "link", "del", link], check=False)
                # A veth pair goes with its namespace, and the kernel may remove our end between the
                # check and the delete ("Cannot find device"): gone is what we wanted.
                if proc.returncode != 0 and _link_exists(link):
                    errors.append(proc.stderr.strip())
        if state.get("hosts_block"):
            _hosts_remove(self.tag)
        if errors:
            raise SlurmSimError("teardown incomplete: " + "; ".join(errors))
        spool = state.get("spool")
        if spool and not Path(spool).is_relative_to(self.workdir):
            shutil.rmtree(spool, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()
        self._state = {}

    # ------------------------------------------------------------ node faults
    def _node_key(self, name: str) -> str:
        if name not in self.node_names:
            raise ValueError(f"unknown node {name!r}; nodes are {self.node_names}")
        return f"slurmd-{name}"

    def node_pids(self, name: str) -> list[int]:
        """Pids of every process running 'on' a node: its slurmd, slurmstepds
        and job processes (multi-node: everything in the node's netns)."""
        key = self._node_key(name)
        if self.multinode:
            return _netns_pids(self.netns_names[self.node_names.index(name)])
        rec = self._state.get("daemons", {}).get(key, {})
        pids = [pid for pid, _ in self._job_pids()]
        if _alive(rec.get("pid"), rec.get("starttime")):
            pids.append(rec["pid"])
        return sorted(set(pids))

    def kill_node(self, name: str) -> list[int]:
        """Simulate a node crash: SIGKILL its slurmd and every job process on
        it. slurmctld notices after ``slurmd_timeout`` s (node goes DOWN,
        its jobs are requeued or fail with NODE_FAIL). Returns the pids killed."""
        key = self._node_key(name)
        pids = self.node_pids(name)
        _kill_pids([(p, _starttime(p)) for p in pids], grace=0.1, first_signal=signal.SIGKILL)
        proc = self._procs.pop(key, None)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=2)
        rec = self._state.get("daemons", {}).get(key)
        if rec is not None:
            rec["killed"] = True
            self._save_state()
        return pids

    def restart_node(
        self,
        name: str,
        *,
        wait: bool = True,
        timeout: float = 60,
        states: Iterable[str] = ("idle", "mixed", "allocated"),
    ) -> None:
        """Start a (killed) node's slurmd again and, by default, wait until
        slurmctld sees it up (ReturnToService=2 brings DOWN nodes back)."""
        key = self._node_key(name)
        rec = self._state.get("daemons", {}).get(key, {})
        if _alive(rec.get("pid"), rec.get("starttime")):
            raise SlurmSimError(f"slurmd of {name} is still running")
        self._spawn(key, self._slurmd_argv(name))
        if wait:
            self.wait_nodes([name], states=states, timeout=timeout)


# --------------------------------------------------------------------------
# functions and CLI
# --------------------------------------------------------------------------


def stop_from_state(workdir: Path | str) -> bool:
    """Stop the cluster recorded in ``workdir``; False if there was none."""
    workdir = Path(workdir)
    if not (workdir / STATE_FILE).exists():
        return False
    SimCluster.from_state(workdir).stop()
    return True


def _cmd_up(args: argparse.Namespace) -> int:
    cluster = SimCluster(
        args.dir,
        nodes=args.nodes,
        cpus_per_node=args.cpus_per_node,
        min_job_age=args.min_job_age,
        accounting=args.accounting,
    )
    try:
        cluster.start(timeout=args.timeout, warmup=not args.no_warmup)
    except SlurmUnavailable as exc:
        print(f"slurmsim: unavailable: {exc}", file=sys.stderr)
        return 2
    except SlurmSimError as exc:
        print(f"slurmsim: {exc}", file=sys.stderr)
        return 1
    print(
        f"# cluster up in {cluster.startup_seconds:.1f}s: nodes "
        f"{' '.join(cluster.node_names)} (partition {cluster.partition})",
        file=sys.stderr,
    )
    for key, value in cluster.env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    if stop_from_state(args.dir):
        print(f"slurmsim: stopped cluster in {Path(args.dir).absolute()}", file=sys.stderr)
    else:
        print(f"slurmsim: no cluster state in {Path(args.dir).absolute()}", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    path = Path(args.dir) / STATE_FILE
    if not path.exists():
        print(f"no cluster in {Path(args.dir).absolute()}")
        return 1
    cluster = SimCluster.from_state(args.dir)
    state = cluster._state
    running = cluster.is_running()
    print(f"workdir:    {cluster.workdir}")
    print(f"running:    {running}")
    print(f"SLURM_CONF: {cluster.conf_path}")
    print(f"nodes:      {' '.join(cluster.node_names)}")
    print(f"addresses:  {' '.join(cluster.node_addresses)}")
    for key, rec in state.get("daemons", {}).items():
        alive = _alive(rec.get("pid"), rec.get("starttime"))
        print(f"  {key:<24} pid {rec.get('pid'):>7}  {'alive' if alive else 'dead'}")
    if running:
        print(cluster.slurm("sinfo", "-N", check=False).stdout.rstrip())
    return 0 if running else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m slurmsim", description="Start/stop a real local Slurm cluster (needs root)."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start a cluster; prints `export SLURM_CONF=...`")
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--cpus-per-node", type=int, default=None)
    up.add_argument("--timeout", type=float, default=60)
    up.add_argument(
        "--min-job-age",
        type=int,
        default=300,
        help="seconds finished jobs stay visible (also sets the "
        "sbatch -W poll interval: <=5 -> 2 s, <=17 -> 8 s, else 32 s)",
    )
    up.add_argument("--no-warmup", action="store_true", help="do not run the warm-up job after the nodes are idle")
    up.add_argument(
        "--accounting", action="store_true", help="keep job accounting (slurmdbd + MariaDB in --dir), for sacct"
    )
    install = sub.add_parser("install", help="apt-get install Slurm, munge and the netns tools where missing (root)")
    install.add_argument("--strict", action="store_true", help="exit non-zero (1, 2) when they cannot be installed")
    for p in (
        up,
        sub.add_parser("down", help="stop the cluster of --dir"),
        sub.add_parser("status", help="show the cluster of --dir"),
    ):
        p.add_argument("--dir", default=".slurmsim", type=Path, help="cluster work directory (default: ./.slurmsim)")
    args = parser.parse_args(argv)
    try:
        return {"up": _cmd_up, "down": _cmd_down, "status": _cmd_status, "install": _cmd_install}[args.cmd](args)
    except SlurmSimError as exc:
        # one line, not a traceback; `down` only removes what is still there, so it can be run again
        again = "; run `down` again" if args.cmd == "down" else ""
        print(f"slurmsim: {args.cmd} failed: {str(exc).splitlines()[0]}{again}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
