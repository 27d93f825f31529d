"""Node faults (:class:`NodeFaultsMixin`, a part of :class:`~slurmsim.SimCluster`): the processes on a node,
killing a node as a crash would, and starting its slurmd again."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable

from .errors import SlurmSimError
from .network import _netns_pids
from .procs import _alive, _kill_pids, _starttime


class NodeFaultsMixin:
    """Simulated node crashes and restarts."""

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
