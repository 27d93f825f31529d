"""Pytest plugin: session-scoped real Slurm clusters (see slurmsim).

Register with ``pytest_plugins = ["slurm_fixtures"]`` (tests/ on sys.path) or
``-p slurm_fixtures``.

Fixtures:

* ``slurm_cluster``   -- 1 node (host mode), at least 2 CPUs.
* ``slurm_multinode`` -- 2 nodes in network namespaces, 1 CPU each.
* ``slurm_accounting`` -- 1 node (host mode), at least 2 CPUs, with job
  accounting (slurmdbd + MariaDB), so ``sacct`` answers.

Both skip with a readable reason when not running as root or when Slurm cannot
be installed, and always tear the cluster down at the end of the session.
Run Slurm commands with ``env=cluster.command_env()`` (or
``{**os.environ, **cluster.env}``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurmsim import SimCluster, SlurmUnavailable, ensure_installed


def _require_slurm(multinode: bool, accounting: bool = False) -> None:
    if os.geteuid() != 0:
        pytest.skip(
            "Slurm tests need root (they start slurmctld/slurmd, munged and network namespaces); run pytest as root"
        )
    try:
        ensure_installed(multinode=multinode, accounting=accounting)
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm is not available: {exc}")


def start_cluster(
    workdir: Path, nodes: int = 1, cpus_per_node: int | None = None, timeout: float = 60, **kwargs: object
) -> SimCluster:
    """Start a SimCluster or skip the test when Slurm cannot run here."""
    _require_slurm(nodes >= 2, accounting=bool(kwargs.get("accounting")))
    cluster = SimCluster(workdir, nodes=nodes, cpus_per_node=cpus_per_node, **kwargs)  # type: ignore[arg-type]
    try:
        cluster.start(timeout=timeout)
    except SlurmUnavailable as exc:
        pytest.skip(f"Slurm cannot run here: {exc}")
    return cluster


def first_job_id(kind: int) -> int:
    """Where a session cluster's job ids start. The 1-node clusters share the host's network, and a job
    derives its rendezvous port from its id (20000 + id % 10000): with several pytest-xdist workers,
    each worker's cluster of each ``kind`` (0: plain, 1: accounting) gets its own slice of the ids."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    return 1 + (index * 2 + kind) * (10000 // (2 * workers))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    """A running 1-node Slurm cluster (partition ``debug``, >= 2 CPUs)."""
    workdir = tmp_path_factory.mktemp("slurm1")
    cluster = start_cluster(workdir, nodes=1, cpus_per_node=max(2, os.cpu_count() or 1), first_job_id=first_job_id(0))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    """A running 2-node Slurm cluster (network namespaces, 1 CPU per node)."""
    workdir = tmp_path_factory.mktemp("slurm2")
    cluster = start_cluster(workdir, nodes=2)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def slurm_accounting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    """A running 1-node Slurm cluster (>= 2 CPUs) that keeps job accounting: ``sacct`` works."""
    workdir = tmp_path_factory.mktemp("slurmacct")
    cluster = start_cluster(
        workdir, nodes=1, cpus_per_node=max(2, os.cpu_count() or 1), accounting=True, first_job_id=first_job_id(1)
    )
    try:
        yield cluster
    finally:
        cluster.stop()
