"""munged, shared by the clusters of this machine: one that answers is used as it is; otherwise one of our own
is started, recorded in a registry file with the clusters that use it, and stopped with the last of them."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from .constants import STATE_FILE
from .errors import SlurmStartError, SlurmUnavailable
from .procs import _alive, _global_lock, _kill_pids, _read_json, _run, _starttime, _tail, _write_json


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
            pw = pwd.getpwnam("munge")
            os.chown(rundir, pw.pw_uid, pw.pw_gid)
            os.chmod(rundir, 0o755)
            user_kw = {"user": pw.pw_uid, "group": pw.pw_gid}
        except KeyError:  # no munge user: munged runs as root
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
