"""The team store on a common file system: its layout, its marker file and the permissions that keep it usable.

The store ``virgo-exps share`` makes (:mod:`virgo_exps.experiments.share`):

    DIR/                     setgid, group GROUP, g+rwx, never o+w
    ├── experiments.git/     bare git repository for experiment refs (git init --bare --shared=group)
    ├── dvc-remote/          DVC remote: the durable copy `dvc exp push` uploads to
    ├── dvc-cache/           DVC cache shared by every clone (cache.shared=group)
    └── virgo-share.json     what this folder is (written once, by whoever created it)

Permissions. DVC creates cache and remote folders 2775 and files 0444/0664
when ``shared = group``; git does the same for a ``--shared=group`` repository.
What can still go wrong is outside their control: a folder made by hand with
the wrong group, a user who is not (yet) in the group, a umask or a copy tool
that dropped the setgid bit. :func:`check_tree` finds each of these and says
which path, which permission, and the command that fixes it; :func:`fix_own`
repairs those on paths this user owns, and every folder made here is a group
folder with a default ACL (:func:`make_group_tree`).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from virgo_exps import fsio
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


# -- users and groups ---------------------------------------------------------


def user_name(uid: int | None = None) -> str:
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
    user = user_name()
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


def owner_name(st: os.stat_result) -> str:
    return user_name(st.st_uid)


def check_path(path: Path, gid: int, group: str, st: os.stat_result | None = None) -> list[Problem]:
    """Problems with one path of the shared tree (not following symlinks)."""
    st = st or os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return []
    mode = stat.S_IMODE(st.st_mode)
    owner = owner_name(st)
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


# -- group folders ----------------------------------------------------------


def make_group_dir(path: Path, gid: int) -> bool:
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
        if make_group_dir(target, gid):
            made.append(target)
    return made


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
                    folder, f"cannot create files here as {user_name()}: {exc.strerror}", f"chmod g+rwxs '{folder}'"
                )
            )
    return out
