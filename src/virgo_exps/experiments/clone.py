"""A clone's configuration for the team store (:mod:`virgo_exps.experiments.teamstore`).

The clone gets, in its *local* configuration (``.dvc/config.local`` and
``.git/config``, nothing that is committed, since the path is the cluster's):

    git remote `team`         -> DIR/experiments.git
    dvc remote `team`         -> DIR/dvc-remote, the default remote, shared=group
    cache.dir                 -> DIR/dvc-cache, cache.shared=group, cache.type (below)
    exp.git_remote            =  team (used by DVC's auto-push; `dvc exp push` still names it)

Link type. A shared cache must never be reachable for writing from anyone's
workspace. With hard links a workspace file *is* the cache file: one user's
editor or a script that opens an output for writing changes the object every
teammate's experiments point to, silently, and the cache no longer matches its
hash. So the default is ``reflink,copy``: each workspace gets its own copy (a
free copy-on-write clone where the file system supports reflinks). ``symlink``
saves the space on large data sets and is still safe: DVC makes cache files
read-only (0444) and a write through the link fails; ``hardlink`` is refused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from virgo_exps import dvcrun, fsio
from virgo_exps.experiments.teamstore import FILE_MODE, Layout, ShareError, group_id, owner_name
from virgo_exps.gitrun import git

DEFAULT_NAME = "team"
LINK_TYPES = {"copy": "reflink,copy", "reflink,copy": "reflink,copy", "symlink": "symlink"}


def run_command(cmd: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a git command, for the store and the clone) through the one git helper; with ``check``,
    :class:`ShareError` if it fails."""
    if cmd[:1] != ["git"]:
        raise ValueError(f"run_command runs git only, not {cmd[:1]}")
    return git(cwd, *cmd[1:], check=check, error=ShareError)


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return dvcrun.run(list(args), repo, check=check)
    except dvcrun.DvcError as exc:
        raise ShareError(str(exc)) from None


def _dvc_config_get(repo: Path, key: str) -> str | None:
    proc = _dvc(repo, "config", key, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _git_remote_url(repo: Path, name: str) -> str | None:
    proc = run_command(["git", "remote", "get-url", name], cwd=repo, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def current_cache_dir(repo: Path) -> Path:
    configured = _dvc_config_get(repo, "cache.dir")
    if not configured:
        return (repo / ".dvc" / "cache").absolute()
    path = Path(configured)
    # A relative cache.dir is relative to the config file that set it (.dvc/).
    return path if path.is_absolute() else (repo / ".dvc" / path).resolve()


def migrate_cache(old: Path, new: Path, gid: int) -> int:
    """Copy objects of a clone's previous cache into the shared one (so older experiments can be pushed).

    Same layout on both sides (``files/md5/xx/...`` and the run cache
    ``runs/...``); an object already there is kept. Returns the number copied.
    """
    old, new = Path(old), Path(new)
    if not old.is_dir() or old.resolve() == new.resolve():
        return 0
    copied = 0
    for dirpath, _, filenames in os.walk(old):
        rel = Path(dirpath).relative_to(old)
        if rel.parts[:1] not in (("files",), ("runs",)):
            continue
        target_dir = new / rel
        for part in range(len(rel.parts)):
            d = new.joinpath(*rel.parts[: part + 1])
            if not d.is_dir():
                try:
                    d.mkdir()
                    os.chown(d, -1, gid)
                    os.chmod(d, 0o2775)  # what DVC itself makes with shared=group
                except FileExistsError:
                    pass
        for name in filenames:
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            target = target_dir / name
            if target.exists():
                continue
            tmp = fsio.temp_path(target)
            shutil.copyfile(Path(dirpath) / name, tmp)
            os.chown(tmp, -1, gid)
            os.chmod(tmp, 0o444 if rel.parts[0] == "files" else FILE_MODE)
            fsio.move_into_place(tmp, target, durable=False)
            copied += 1
    return copied


def configure_clone(
    repo: Path, layout: Layout, name: str = DEFAULT_NAME, link_type: str = "copy", auto_push: bool = False
) -> tuple[list[str], list[str]]:
    """Point this clone at the shared folder (local config only); return (changes, notes)."""
    repo = Path(repo).absolute()
    if link_type not in LINK_TYPES:
        raise ShareError(
            f"--link-type {link_type!r}: choose 'copy' (default: reflink where possible, else copy) or 'symlink'; "
            "hard links are refused: they make every workspace file the shared cache object itself"
        )
    if not (repo / ".dvc").is_dir() or not (repo / ".git").exists():
        raise ShareError(f"{repo}: not a DVC repository clone (no .dvc/ or .git); run this in your checkout")
    changes: list[str] = []
    notes: list[str] = []
    url = _git_remote_url(repo, name)
    if url is None:
        run_command(["git", "remote", "add", name, str(layout.git)], cwd=repo)
        changes.append(f"git remote '{name}' -> {layout.git}")
    elif Path(url).expanduser().absolute() != layout.git:
        run_command(["git", "remote", "set-url", name, str(layout.git)], cwd=repo)
        changes.append(f"git remote '{name}' -> {layout.git} (was {url})")
    old_cache = current_cache_dir(repo)
    wanted = {
        f"remote.{name}.url": str(layout.remote),
        f"remote.{name}.shared": "group",
        "core.remote": name,
        "cache.dir": str(layout.cache),
        "cache.shared": "group",
        "cache.type": LINK_TYPES[link_type],
        "exp.git_remote": name,
    }
    if auto_push:
        wanted["exp.auto_push"] = "true"
    if _dvc_config_get(repo, f"remote.{name}.url") is None:
        _dvc(repo, "remote", "add", "--local", name, str(layout.remote))
        changes.append(f"dvc remote add --local {name} {layout.remote}")
    for key, value in wanted.items():
        if _dvc_config_get(repo, key) != value:
            _dvc(repo, "config", "--local", key, value)
            changes.append(f"dvc config --local {key} {value}")
    if old_cache != layout.cache:
        copied = migrate_cache(old_cache, layout.cache, group_id(layout.group))
        if copied:
            changes.append(f"copied {copied} object(s) of the previous cache {old_cache} into the shared cache")
        notes.append(
            f"previous cache {old_cache} is no longer used (remove it to free space)" if old_cache.is_dir() else ""
        )
    # git refuses repositories owned by someone else ("dubious ownership") for
    # plain `git fetch`/`ls-remote`; the bare repository is a teammate's.
    st = os.stat(layout.git)
    if st.st_uid != os.getuid():
        safe = run_command(["git", "config", "--global", "--get-all", "safe.directory"], check=False).stdout.split()
        if str(layout.git) not in safe and "*" not in safe:
            run_command(["git", "config", "--global", "--add", "safe.directory", str(layout.git)])
            changes.append(f"git config --global --add safe.directory {layout.git} (owned by {owner_name(st)})")
    return changes, [n for n in notes if n]
