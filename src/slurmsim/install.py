"""Installation: which of the needed commands are missing, and the Debian packages installed with apt-get."""

from __future__ import annotations

import os
import shutil
import subprocess

from .constants import (
    ACCOUNTING_COMMANDS,
    ACCOUNTING_PACKAGES,
    APT_PACKAGES,
    MUNGE_COMMANDS,
    NETNS_COMMANDS,
    SLURM_COMMANDS,
)
from .errors import SlurmSimError, SlurmUnavailable
from .procs import _global_lock, _run


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
