"""The network: free subnets and port pairs, the managed blocks of ``/etc/hosts``, links and network
namespaces, host names; and :class:`NetworkMixin`, which builds a multi-node cluster's bridge, namespaces
and veth pairs (removed again by :meth:`SimCluster._teardown <slurmsim.teardown.TeardownMixin._teardown>`).

Tests that point ``HOSTS_FILE`` elsewhere patch it here, where it is looked up."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from pathlib import Path

from .constants import DAEMON_PORTS
from .errors import SlurmSimError, SlurmUnavailable
from .procs import _global_lock, _run

HOSTS_FILE = Path("/etc/hosts")
NETNS_DIR = Path("/run/netns")  # where `ip netns add` mounts namespaces


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


class NetworkMixin:
    """The network of a multi-node cluster (a part of :class:`~slurmsim.SimCluster`)."""

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
