"""Stopping a cluster (:class:`TeardownMixin`, a part of :class:`~slurmsim.SimCluster`): its jobs' processes,
its daemons, munged's registration, the namespaces, links and bridge, the ``/etc/hosts`` block, the state file."""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from pathlib import Path

from .constants import TAG_ENV
from .errors import SlurmSimError
from .munge import _release_munge
from .network import _hosts_remove, _link_exists, _netns_exists, _netns_pids
from .procs import _alive, _all_pids, _cmdline, _descendants, _environ_has, _kill_pids, _run, _starttime


class TeardownMixin:
    """Finding a cluster's processes and removing everything it started."""

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
