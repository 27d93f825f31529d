"""``virgo-exps share``: create or join a team's shared experiment store and configure this clone.

``virgo-exps share --dir DIR --group GROUP`` creates DIR (first teammate) or
joins it (everyone after, and every later call), configures this clone and
checks the permissions of everything in it. The store's layout and its
permissions: :mod:`virgo_exps.experiments.teamstore`; what the clone's local
configuration gets and why its link type: :mod:`virgo_exps.experiments.clone`.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from virgo_exps import fsio
from virgo_exps.config import DamagedInputError
from virgo_exps.experiments.clone import DEFAULT_NAME, configure_clone, run_command
from virgo_exps.experiments.teamstore import (
    CACHE_DIR,
    DIR_MODE,
    FILE_MODE,
    GIT_DIR,
    REMOTE_DIR,
    Layout,
    Problem,
    ShareError,
    acl_supported,
    check_membership,
    check_path,
    check_tree,
    explain,
    fix_own,
    group_id,
    make_group_dir,
    probe_writable,
    read_marker,
    set_default_acl,
    umask,
    user_name,
)


@dataclass
class Result:
    layout: Layout
    created: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _is_bare_repo(path: Path) -> bool:
    return (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir()


def prepare(root: Path, group: str) -> tuple[Layout, list[str]]:
    """Create what is missing of the shared folder; return its layout and what was created."""
    check_membership(group)
    gid = group_id(group)
    root = Path(root).expanduser().absolute()
    layout = Layout(root, group)
    created: list[str] = []
    if not root.exists():
        parent = root.parent
        if not parent.is_dir():
            raise ShareError(f"{parent}: does not exist; create the project folder first (or choose another --dir)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ShareError(f"{parent}: you ({user_name()}) cannot create folders here")
        root.mkdir(exist_ok=True)
        os.chown(root, -1, gid)
        os.chmod(root, DIR_MODE)
        set_default_acl(root)
        created.append(f"{root} (group {group}, mode 2770)")
    elif not root.is_dir():
        raise ShareError(f"{root}: exists and is not a folder")
    # The top folder may predate us (a project folder made by an administrator):
    # it must already be right, we do not change modes of what we did not create.
    top = check_path(root, gid, group)
    if top:
        raise ShareError(explain(top, root, group))
    if layout.marker.exists():
        try:
            recorded = read_marker(layout.marker).get("group")
        except DamagedInputError:  # what it says follows from the folder: written again below
            layout.marker.unlink()
            created.append(f"{layout.marker} (it was damaged: written again)")
            recorded = None
        if recorded and recorded != group:
            raise ShareError(f"{layout.marker}: this shared folder belongs to group '{recorded}', not '{group}'")
    if layout.git.exists() and not _is_bare_repo(layout.git):
        raise ShareError(f"{layout.git}: exists but is not a bare git repository; move it away or choose another --dir")
    if not layout.git.exists():
        tmp = fsio.temp_path(layout.git)
        run_command(["git", "init", "-q", "--bare", "--shared=group", "-b", "main", str(tmp)])
        # git chooses the modes; the group follows from the setgid bit of `root`.
        run_command(["git", "config", "--file", str(tmp / "config"), "receive.denyNonFastForwards", "false"])
        for dirpath, _, _ in os.walk(tmp):
            set_default_acl(Path(dirpath))
        if fsio.move_into_place(tmp, layout.git, exclusive=True):  # False: a teammate created it at the same moment
            created.append(f"{layout.git} (bare git repository, core.sharedRepository=group)")
    for sub, what in ((layout.remote, "DVC remote"), (layout.cache, "shared DVC cache")):
        if make_group_dir(sub, gid):
            created.append(f"{sub} ({what})")
    if not layout.marker.exists():
        fsio.write_json(
            layout.marker,
            {
                "what": "virgo-exps shared experiment store",
                "group": group,
                "git": GIT_DIR,
                "dvc_remote": REMOTE_DIR,
                "dvc_cache": CACHE_DIR,
                "created_by": user_name(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            mode=FILE_MODE,
        )
    return layout, created


def share(
    root: Path,
    group: str,
    repo: Path = Path("."),
    name: str = DEFAULT_NAME,
    link_type: str = "copy",
    auto_push: bool = False,
    deep_check: bool = True,
    fix: bool = False,
) -> Result:
    """Create or join ``root`` for ``group`` and configure ``repo``; check everything."""
    layout, created = prepare(root, group)
    result = Result(layout, created=created)
    result.configured, result.notes = configure_clone(repo, layout, name, link_type, auto_push)
    if not acl_supported(layout.git / "refs"):
        if umask() & stat.S_IWGRP:
            result.notes.append(
                f"this file system has no POSIX ACLs and your umask is {umask():03o}: folders you create when "
                f"pushing will not be group-writable and teammates' pushes will fail. Add `umask 002` to "
                "~/.bashrc (every teammate), or repair afterwards with `virgo-exps share ... --fix`"
            )
    problems = check_tree(layout.root, group, limit=1000) if deep_check else []
    if fix and problems:
        problems, done = fix_own(problems, group)
        result.configured += done
    result.problems = probe_writable(layout) + problems
    return result


def summary(result: Result, name: str = DEFAULT_NAME) -> str:
    lay = result.layout
    lines = []
    if result.created:
        lines.append(f"created shared folder {lay.root} for group '{lay.group}':")
        lines += [f"  + {c}" for c in result.created]
    else:
        lines.append(f"joined shared folder {lay.root} (group '{lay.group}')")
    if result.configured:
        lines.append("configured this clone (local config, nothing committed):")
        lines += [f"  * {c}" for c in result.configured]
    else:
        lines.append("this clone was already configured")
    lines += [f"  note: {n}" for n in result.notes]
    if result.problems:
        lines.append(explain(result.problems, lay.root, lay.group))
    else:
        lines.append(f"permissions: ok (group '{lay.group}', setgid folders, group-writable, nothing world-writable)")
        lines.append(
            f"share:  dvc exp push {name} <exp>      fetch: dvc exp pull {name} <exp>      list: dvc exp list {name}"
        )
    return "\n".join(lines)
