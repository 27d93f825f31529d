"""A team's shared experiment store on a common file system, and the checks that keep it usable.

``virgo-exps share --dir DIR --group GROUP`` creates DIR (first teammate) or
joins it (everyone after, and every later call) and configures this clone:

    DIR/                     setgid, group GROUP, g+rwx, never o+w
    ├── experiments.git/     bare git repository for experiment refs (git init --bare --shared=group)
    ├── dvc-remote/          DVC remote: the durable copy `dvc exp push` uploads to
    ├── dvc-cache/           DVC cache shared by every clone (cache.shared=group)
    └── virgo-share.json     what this folder is (written once, by whoever created it)

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

Permissions. DVC creates cache and remote folders 2775 and files 0444/0664
when ``shared = group``; git does the same for a ``--shared=group`` repository.
What can still go wrong is outside their control: a folder made by hand with
the wrong group, a user who is not (yet) in the group, a umask or a copy tool
that dropped the setgid bit. :func:`check_tree` finds each of these and says
which path, which permission, and the command that fixes it.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from virgo_exps import dvcrun, fsio
from virgo_exps.config import DamagedInputError

GIT_DIR = "experiments.git"
REMOTE_DIR = "dvc-remote"
CACHE_DIR = "dvc-cache"
MARKER = "virgo-share.json"
GIT_QUARANTINE = "tmp_objdir-"  # objects/tmp_objdir-incoming-*: the objects of a push while it arrives


def read_marker(path: Path) -> dict:
    """The team store's marker file, or :class:`DamagedInputError` naming it and the fix."""
    try:
        why = fsio.trust_refusal(path, team_folder=Path(path).parent)
        data = None if why else json.loads(Path(path).read_bytes())
        why = why or "not a JSON object with the store's group"
    except (OSError, ValueError) as exc:
        data, why = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not isinstance(data, dict) or not isinstance(data.get("group", ""), str):
        raise DamagedInputError(
            f"{path}: the team store's marker is damaged ({why}); `virgo-exps share --dir {Path(path).parent} "
            "--group <the team's group>` writes it again"
        )
    return data


DEFAULT_NAME = "team"
LINK_TYPES = {"copy": "reflink,copy", "reflink,copy": "reflink,copy", "symlink": "symlink"}

DIR_MODE = 0o2770  # setgid, rwx for owner and group, nothing for others
FILE_MODE = 0o664

# A default POSIX ACL "user::rwx group::rwx other::---" on every folder: new
# folders inherit it and the creator's umask no longer applies. Needed because
# DVC pushes experiment refs with dulwich, which creates refs/exps/<..>/
# folders with the pusher's umask (022: not group-writable) and ignores the
# repository's core.sharedRepository; the next teammate's push would fail.
_ACL_XATTR = "system.posix_acl_default"
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_ENTRIES = ((0x01, 7), (0x04, 7), (0x20, 0))  # USER_OBJ rwx, GROUP_OBJ rwx, OTHER ---


class ShareError(RuntimeError):
    """The shared folder cannot be created, joined or used; the message says why and what to do."""


@dataclass
class Problem:
    path: Path
    what: str
    fix: str
    owner: str = ""

    def __str__(self) -> str:
        who = f" (owner: {self.owner})" if self.owner else ""
        return f"{self.path}: {self.what}{who}"


@dataclass
class Layout:
    root: Path
    group: str

    @property
    def git(self) -> Path:
        return self.root / GIT_DIR

    @property
    def remote(self) -> Path:
        return self.root / REMOTE_DIR

    @property
    def cache(self) -> Path:
        return self.root / CACHE_DIR

    @property
    def marker(self) -> Path:
        return self.root / MARKER


@dataclass
class Result:
    layout: Layout
    created: list[str] = field(default_factory=list)
    configured: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# -- users and groups ---------------------------------------------------------


def _user_name(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ShareError(
            f"group '{group}' does not exist on this machine; an administrator creates it with "
            f"`groupadd {group}` and adds every teammate with `usermod -aG {group} <user>`"
        ) from None


def check_membership(group: str) -> None:
    """Raise unless this process may act as a member of ``group`` (root always may)."""
    gid = group_id(group)
    if os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return
    user = _user_name()
    listed = user in grp.getgrgid(gid).gr_mem
    if listed:
        raise ShareError(
            f"user '{user}' was added to group '{group}' after this session started, so this shell does not "
            f"have it yet: log out and in again, or run `newgrp {group}` and retry"
        )
    raise ShareError(
        f"user '{user}' is not in group '{group}': ask an administrator to run `usermod -aG {group} {user}`, "
        "then log in again"
    )


# -- checks -------------------------------------------------------------------


def _owner(st: os.stat_result) -> str:
    return _user_name(st.st_uid)


def check_path(path: Path, gid: int, group: str, st: os.stat_result | None = None) -> list[Problem]:
    """Problems with one path of the shared tree (not following symlinks)."""
    st = st or os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return []
    mode = stat.S_IMODE(st.st_mode)
    owner = _owner(st)
    out: list[Problem] = []
    if mode & stat.S_IWOTH:
        out.append(Problem(path, f"is world-writable (mode {mode:04o})", f"chmod o-w '{path}'", owner))
    if st.st_gid != gid:
        out.append(
            Problem(
                path, f"belongs to group '{_group_name(st.st_gid)}', not '{group}'", f"chgrp {group} '{path}'", owner
            )
        )
    if stat.S_ISDIR(st.st_mode):
        missing = "".join(
            c for c, bit in (("r", stat.S_IRGRP), ("w", stat.S_IWGRP), ("x", stat.S_IXGRP)) if not mode & bit
        )
        if missing:
            out.append(
                Problem(
                    path,
                    f"folder lacks group {missing} (mode {mode:04o}): teammates cannot add to it",
                    f"chmod g+rwx '{path}'",
                    owner,
                )
            )
        if not mode & stat.S_ISGID:
            out.append(
                Problem(
                    path,
                    f"folder lacks the setgid bit (mode {mode:04o}): new files would get the "
                    f"creator's group instead of '{group}'",
                    f"chmod g+s '{path}'",
                    owner,
                )
            )
    elif not mode & stat.S_IRGRP:
        out.append(Problem(path, f"file is not group-readable (mode {mode:04o})", f"chmod g+r '{path}'", owner))
    return out


def check_tree(root: Path, group: str, limit: int | None = None) -> list[Problem]:
    """Walk ``root`` (without following links) and list every permission problem."""
    gid = group_id(group)
    root = Path(root)
    problems = check_path(root, gid, group)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if Path(dirpath).name == "objects":
            # git's quarantine of a push that is arriving: private to the pusher by design (mkdir 0700),
            # removed when the push ends; git reads nothing else from it
            dirnames[:] = [d for d in dirnames if not d.startswith(GIT_QUARANTINE)]
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            try:
                problems.extend(check_path(path, gid, group))
            except FileNotFoundError:  # removed meanwhile (a concurrent gc, a tmp file)
                continue
            if limit is not None and len(problems) >= limit:
                return problems
    return problems


def world_writable(root: Path) -> list[Path]:
    """Every path under ``root`` that others may write to (there must be none)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in (".", *dirnames, *filenames):
            path = Path(dirpath) / name if name != "." else Path(dirpath)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & stat.S_IWOTH:
                found.append(path)
    return found


def explain(problems: list[Problem], root: Path, group: str, shown: int = 12) -> str:
    """The problems as a person reads them: the first paths, then one fix command per kind."""
    if not problems:
        return ""
    lines = [f"{len(problems)} permission problem(s) under {root}:"]
    lines += [f"  - {p}" for p in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    owners = sorted({p.owner for p in problems if p.owner})
    kinds = {p.fix.split(" '")[0] for p in problems}
    fixes = []
    if "chmod o-w" in kinds:
        fixes.append(f"chmod -R o-w '{root}'")
    if f"chgrp {group}" in kinds:
        fixes.append(f"chgrp -R {group} '{root}'")
    if kinds & {"chmod g+rwx", "chmod g+s", "chmod g+rwxs"}:
        fixes.append(f"find '{root}' -type d -exec chmod g+rwxs {{}} +")
    if "chmod g+r" in kinds:
        fixes.append(f"find '{root}' -type f -exec chmod g+r {{}} +")
    lines.append(
        "Fix (run by the owner of those paths"
        + (f": {', '.join(owners)}" if owners else "")
        + ", or an administrator):"
    )
    lines += [f"  {f}" for f in fixes]
    return "\n".join(lines)


# -- default ACLs ---------------------------------------------------------------


def _acl_blob() -> bytes:
    import struct

    return struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, _ACL_UNDEFINED_ID) for tag, perm in _ACL_ENTRIES
    )


def has_default_acl(path: Path) -> bool:
    try:
        return bool(os.getxattr(path, _ACL_XATTR, follow_symlinks=False))
    except OSError:
        return False


def set_default_acl(path: Path) -> bool:
    """Give ``path`` the group-writable default ACL; False where the file system has no POSIX ACLs."""
    try:
        os.setxattr(path, _ACL_XATTR, _acl_blob(), follow_symlinks=False)
        return True
    except OSError:
        return False


def acl_supported(path: Path) -> bool:
    """Whether folders under ``path`` carry (or can carry) default ACLs."""
    if has_default_acl(path):
        return True
    probe = Path(path) / f".virgo-acl-probe-{os.getpid()}"
    try:
        probe.mkdir()
    except OSError:
        return False
    try:
        return set_default_acl(probe)
    finally:
        probe.rmdir()


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fix_own(problems: list[Problem], group: str) -> tuple[list[Problem], list[str]]:
    """Repair the problems on paths this user owns; return (the rest, what was done)."""
    gid = group_id(group)
    me = os.getuid()
    rest, done = [], []
    for p in problems:
        try:
            st = os.lstat(p.path)
        except FileNotFoundError:
            continue
        if st.st_uid != me and me != 0:
            rest.append(p)
            continue
        mode = stat.S_IMODE(st.st_mode) & ~stat.S_IWOTH
        if st.st_gid != gid:
            os.chown(p.path, -1, gid)
        if stat.S_ISDIR(st.st_mode):
            mode |= stat.S_IRWXG | stat.S_ISGID
            os.chmod(p.path, mode)
            set_default_acl(p.path)
        else:
            os.chmod(p.path, mode | stat.S_IRGRP)
        done.append(f"{p.path}: {p.what} -> fixed")
    return rest, done


# -- creating and joining -----------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ShareError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()}")
    return proc


def _make_dir(path: Path, gid: int) -> bool:
    """Create ``path`` as a group folder (2770); return whether it was created."""
    if path.is_dir():
        return False
    try:
        path.mkdir()
    except FileExistsError:  # a teammate was faster
        return False
    os.chown(path, -1, gid)
    os.chmod(path, DIR_MODE)
    set_default_acl(path)
    return True


def make_group_tree(root: Path, path: Path, group: str) -> list[Path]:
    """Create ``path`` and every missing folder between the store ``root`` and it as the store's group
    folders (group ``group``, mode 2770, the default ACL where the file system has them), so that
    teammates may write there as in the folders ``share`` made; return the folders created."""
    gid = group_id(group)
    made = []
    parts = Path(path).relative_to(root).parts
    for i in range(1, len(parts) + 1):
        target = Path(root).joinpath(*parts[:i])
        if _make_dir(target, gid):
            made.append(target)
    return made


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
            raise ShareError(f"{parent}: you ({_user_name()}) cannot create folders here")
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
        _run(["git", "init", "-q", "--bare", "--shared=group", "-b", "main", str(tmp)])
        # git chooses the modes; the group follows from the setgid bit of `root`.
        _run(["git", "config", "--file", str(tmp / "config"), "receive.denyNonFastForwards", "false"])
        for dirpath, _, _ in os.walk(tmp):
            set_default_acl(Path(dirpath))
        if fsio.move_into_place(tmp, layout.git, exclusive=True):  # False: a teammate created it at the same moment
            created.append(f"{layout.git} (bare git repository, core.sharedRepository=group)")
    for sub, what in ((layout.remote, "DVC remote"), (layout.cache, "shared DVC cache")):
        if _make_dir(sub, gid):
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
                "created_by": _user_name(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
            mode=FILE_MODE,
        )
    return layout, created


def probe_writable(layout: Layout) -> list[Problem]:
    """Create and remove a file where teammates write; permissions can look right and still fail (ACLs, NFS)."""
    out = []
    for folder in (layout.git / "objects", layout.git / "refs", layout.remote, layout.cache):
        probe = folder / f".virgo-probe-{os.getpid()}"
        try:
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            out.append(
                Problem(
                    folder, f"cannot create files here as {_user_name()}: {exc.strerror}", f"chmod g+rwxs '{folder}'"
                )
            )
    return out


# -- configuring a clone ------------------------------------------------------


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return dvcrun.run(list(args), repo, check=check)
    except dvcrun.DvcError as exc:
        raise ShareError(str(exc)) from None


def _dvc_config_get(repo: Path, key: str) -> str | None:
    proc = _dvc(repo, "config", key, check=False)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def _git_remote_url(repo: Path, name: str) -> str | None:
    proc = _run(["git", "remote", "get-url", name], cwd=repo, check=False)
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
        _run(["git", "remote", "add", name, str(layout.git)], cwd=repo)
        changes.append(f"git remote '{name}' -> {layout.git}")
    elif Path(url).expanduser().absolute() != layout.git:
        _run(["git", "remote", "set-url", name, str(layout.git)], cwd=repo)
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
        safe = _run(["git", "config", "--global", "--get-all", "safe.directory"], check=False).stdout.split()
        if str(layout.git) not in safe and "*" not in safe:
            _run(["git", "config", "--global", "--add", "safe.directory", str(layout.git)])
            changes.append(f"git config --global --add safe.directory {layout.git} (owned by {_owner(st)})")
    return changes, [n for n in notes if n]


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
