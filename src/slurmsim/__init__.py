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

Modules:

* :mod:`slurmsim.constants` -- names, packages, commands, the partition, port ranges.
* :mod:`slurmsim.errors` -- :class:`SlurmSimError` and its subclasses.
* :mod:`slurmsim.procs` -- running commands, ``/proc``, killing by pid, locks, JSON files.
* :mod:`slurmsim.install` -- :func:`missing_commands`, :func:`ensure_installed` (apt-get).
* :mod:`slurmsim.munge` -- munged, shared by the clusters of this machine.
* :mod:`slurmsim.network` -- subnets, ports, ``/etc/hosts`` blocks, namespaces, the bridge and veth pairs.
* :mod:`slurmsim.accounting` -- slurmdbd and MariaDB.
* :mod:`slurmsim.daemons` -- slurm.conf, slurmctld and the slurmds, node states.
* :mod:`slurmsim.teardown` -- stopping a cluster and removing what it created.
* :mod:`slurmsim.faults` -- killing and restarting a node.
* :mod:`slurmsim.cluster` -- :class:`SimCluster`, :func:`stop_from_state`.
* :mod:`slurmsim.cli` -- :func:`main`, ``python -m slurmsim``.

Everything public is re-exported here. A test that patches a helper patches it in the module that looks it
up (``slurmsim.network.HOSTS_FILE``, ``slurmsim.teardown._link_exists``), not here.
"""

from __future__ import annotations

from .cli import main
from .cluster import SimCluster, stop_from_state
from .constants import (
    ACCOUNTING_COMMANDS,
    ACCOUNTING_PACKAGES,
    ACCOUNTING_PORTS,
    APT_PACKAGES,
    DAEMON_PORTS,
    FINAL_JOB_STATES,
    MUNGE_COMMANDS,
    NETNS_COMMANDS,
    PARTITION,
    SLURM_COMMANDS,
    STATE_FILE,
    TAG_ENV,
)
from .errors import ClusterAlreadyRunning, SlurmSimError, SlurmStartError, SlurmUnavailable
from .install import ensure_installed, missing_commands
from .network import HOSTS_FILE, NETNS_DIR

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
    "ACCOUNTING_COMMANDS",
    "ACCOUNTING_PACKAGES",
    "ACCOUNTING_PORTS",
    "APT_PACKAGES",
    "DAEMON_PORTS",
    "FINAL_JOB_STATES",
    "HOSTS_FILE",
    "MUNGE_COMMANDS",
    "NETNS_COMMANDS",
    "NETNS_DIR",
    "PARTITION",
    "SLURM_COMMANDS",
    "STATE_FILE",
    "TAG_ENV",
]
