"""Team exchange through a shared folder, with real Unix users in one group.

Two users (``useradd``), each with a clone they own, share experiments through
``virgo-exps share``: a bare git repository for experiment refs, a DVC remote
and a shared DVC cache. Needs root (to create the users); they are removed,
homes included, at the end. The permission helpers have quick tests of their
own that need no root.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, make_repo, sh, wait_until
from virgo_exps.experiments import clone, teamstore

PARAMS = {"preprocess": {"fmax": 64.0}}
N_EXPS = 6


# -- quick tests of the permission logic (no root, no users) ------------------


def _own_group() -> str:
    return grp.getgrgid(os.getgid()).gr_name


def test_check_path_names_each_wrong_permission_and_its_fix(tmp_path):
    group = _own_group()
    gid = os.getgid()
    good = tmp_path / "good"
    good.mkdir()
    os.chmod(good, 0o2770)
    assert teamstore.check_path(good, gid, group) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    os.chmod(bad, 0o757)  # no setgid, group r-x only, world-writable
    problems = teamstore.check_path(bad, gid, group)
    text = "\n".join(str(p) for p in problems)
    assert "is world-writable (mode 0757)" in text
    assert "folder lacks group w" in text
    assert "lacks the setgid bit" in text
    assert {p.fix for p in problems} == {f"chmod o-w '{bad}'", f"chmod g+rwx '{bad}'", f"chmod g+s '{bad}'"}
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o600)
    assert [p.what for p in teamstore.check_path(f, gid, group)] == ["file is not group-readable (mode 0600)"]
    explained = teamstore.explain(problems, tmp_path, group)
    assert f"chmod -R o-w '{tmp_path}'" in explained
    assert f"find '{tmp_path}' -type d -exec chmod g+rwxs {{}} +" in explained
    rest, done = teamstore.fix_own(problems, group)
    assert rest == [] and len(done) == len(problems)
    assert teamstore.check_path(bad, gid, group) == []


def test_world_writable_finds_every_such_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("")
    os.chmod(tmp_path / "a" / "b" / "f", 0o666)
    os.chmod(tmp_path / "a", 0o777)
    assert set(teamstore.world_writable(tmp_path)) == {tmp_path / "a", tmp_path / "a" / "b" / "f"}


def test_unknown_group_and_hard_links_are_refused(tmp_path):
    with pytest.raises(teamstore.ShareError, match="group 'no-such-group-vx' does not exist.*groupadd"):
        teamstore.group_id("no-such-group-vx")
    layout = teamstore.Layout(tmp_path / "s", _own_group())
    with pytest.raises(teamstore.ShareError, match="hard links are refused"):
        clone.configure_clone(tmp_path, layout, link_type="hardlink")


def test_default_acl_makes_new_folders_group_writable_despite_umask(tmp_path):
    if not teamstore.set_default_acl(tmp_path):
        pytest.skip("this file system has no POSIX ACLs")
    old = os.umask(0o022)
    try:
        (tmp_path / "x" / "y").mkdir(parents=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "x" / "y").st_mode) & 0o070 == 0o070
    assert teamstore.has_default_acl(tmp_path / "x" / "y")


def test_migrate_cache_copies_objects_read_only_into_the_shared_cache(tmp_path):
    old = tmp_path / "old"
    (old / "files" / "md5" / "ab").mkdir(parents=True)
    (old / "files" / "md5" / "ab" / "cdef").write_text("data")
    (old / "tmp").mkdir()
    (old / "tmp" / "junk").write_text("x")
    new = tmp_path / "new"
    new.mkdir()
    assert clone.migrate_cache(old, new, os.getgid()) == 1
    obj = new / "files" / "md5" / "ab" / "cdef"
    assert obj.read_text() == "data" and stat.S_IMODE(obj.stat().st_mode) == 0o444
    assert not (new / "tmp").exists()
    assert clone.migrate_cache(old, new, os.getgid()) == 0


# -- real users -----------------------------------------------------------------


def _can_run_as(user: str, python: str) -> bool:
    proc = subprocess.run(
        ["runuser", "-u", user, "--", python, "-c", "import dvc, virgo_exps, torch"], capture_output=True, cwd="/"
    )
    return proc.returncode == 0


def _open_for_traversal(paths) -> list[tuple[Path, int]]:
    """Give others search (x) permission on every ancestor of ``paths`` that lacks it, so the
    teammates can reach the venv and the checkout (a clone under a private temporary folder, say);
    return what to restore. Nothing becomes readable or writable that was not."""
    changed: list[tuple[Path, int]] = []
    seen: set[Path] = set()
    for path in paths:
        for folder in reversed(Path(path).resolve().parents):
            if folder in seen:
                continue
            seen.add(folder)
            mode = folder.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
                changed.append((folder, stat.S_IMODE(mode)))
    return changed


def _user_python(base: Path, user: str) -> Path:
    """A Python the test users can run that sees this environment's packages.

    The venv's own interpreter may live where other users cannot go (a
    pyenv build under root's home); then a venv-shaped folder around a system
    Python of the same version adds the venv's site-packages (and its .pth
    files, so the editable install works) and gets a `dvc` launcher.
    """
    mine = BIN / "python"
    if _can_run_as(user, str(mine)):
        return BIN
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = next(
        (
            Path(d) / f"python{version}"
            for d in ("/usr/bin", "/usr/local/bin")
            if (Path(d) / f"python{version}").exists()
        ),
        None,
    )
    if system is None:
        pytest.skip(f"the venv's Python is not executable by other users and there is no system python{version}")
    venv = base / "uvenv"
    site = venv / "lib" / f"python{version}" / "site-packages"
    (venv / "bin").mkdir(parents=True)
    site.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {system.parent}\ninclude-system-site-packages = false\n")
    os.symlink(system, venv / "bin" / "python")
    os.symlink("python", venv / "bin" / "python3")
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and str(p).startswith(sys.prefix))
    (site / "virgo-venv.pth").write_text(f"import site; site.addsitedir({str(ours)!r})\n")
    launcher = venv / "bin" / "dvc"
    launcher.write_text('#!/bin/sh\nexec "$(dirname "$0")/python" -m dvc "$@"\n')
    launcher.chmod(0o755)
    if not _can_run_as(user, str(venv / "bin" / "python")):
        pytest.skip(f"user {user} can read neither the venv nor its packages (check the permissions of {ours})")
    return venv / "bin"


class User:
    def __init__(self, name: str, home: Path, repo: Path, bin_dir: Path):
        self.name, self.home, self.repo, self.bin = name, home, repo, bin_dir

    def env(self) -> dict:
        return {
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "LANG": "C.UTF-8",
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "DVC_NO_ANALYTICS": "1",
            "GIT_AUTHOR_NAME": self.name,
            "GIT_AUTHOR_EMAIL": f"{self.name}@example.invalid",
            "GIT_COMMITTER_NAME": self.name,
            "GIT_COMMITTER_EMAIL": f"{self.name}@example.invalid",
        }

    def argv(self, cmd: list[str] | str) -> list[str]:
        env = [f"{k}={v}" for k, v in self.env().items()]
        tail = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
        return ["runuser", "-u", self.name, "--", "env", "-i", *env, *tail]

    def run(self, cmd, check=True, timeout=900) -> subprocess.CompletedProcess:
        return sh(self.argv(cmd), self.repo, env=dict(os.environ), check=check, timeout=timeout)

    def popen(self, cmd) -> subprocess.Popen:
        return subprocess.Popen(
            self.argv(cmd), cwd=self.repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def vx(self, *args, check=True):
        return self.run(["python", "-m", "virgo_exps.cli.share", *args], check=check)


@pytest.fixture(scope="module")
def team():
    if os.geteuid() != 0:
        pytest.skip("creating Unix users (useradd) needs root")
    if not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("useradd/runuser are not installed")
    tag = f"{os.getpid() % 100000}"
    group, names = f"vx_team{tag}", [f"vx_alice{tag}", f"vx_bob{tag}"]
    base = Path(tempfile.mkdtemp(prefix="vx-share-"))
    created_users: list[str] = []
    created_group = False
    opened: list[tuple[Path, int]] = []
    try:
        os.chmod(base, 0o755)
        opened = _open_for_traversal([sys.prefix, ROOT / "src"])
        sh(["groupadd", group], base, env=dict(os.environ))
        created_group = True
        for name in names:
            sh(
                ["useradd", "--create-home", "--shell", "/bin/bash", "--groups", group, name],
                base,
                env=dict(os.environ),
            )
            created_users.append(name)
        origin = make_repo(base / "origin", PARAMS)
        bin_dir = _user_python(base, names[0])
        users = []
        for name in names:
            repo = base / name / "repo"
            repo.parent.mkdir()
            sh(["git", "clone", "-q", str(origin), str(repo)], base)
            pw = pwd.getpwnam(name)
            sh(["chown", "-R", f"{name}:", str(repo.parent)], base, env=dict(os.environ))
            users.append(User(name, Path(pw.pw_dir), repo, bin_dir))
        # The project folder an administrator made for the team.
        project = base / "project"
        project.mkdir()
        os.chown(project, -1, grp.getgrnam(group).gr_gid)
        os.chmod(project, 0o2770)
        yield {"group": group, "alice": users[0], "bob": users[1], "store": project / "store", "base": base}
    finally:
        for folder, mode in reversed(opened):
            os.chmod(folder, mode)
        for name in created_users:
            subprocess.run(["userdel", "--remove", name], capture_output=True)
        if created_group:
            subprocess.run(["groupdel", group], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def shared(team):
    """Alice creates the store, runs the pipeline and pushes the experiment."""
    alice, store, group = team["alice"], team["store"], team["group"]
    first = alice.vx("share", "--dir", str(store), "--group", group)
    alice.run(["dvc", "exp", "run", "-n", "alice-base"])
    pushed = alice.run(["dvc", "exp", "push", "team", "alice-base"])
    return {**team, "first_share": first, "pushed": pushed}


def _modes(store: Path, group: str) -> list[str]:
    gid = grp.getgrnam(group).gr_gid
    bad = []
    for dirpath, dirnames, filenames in os.walk(store):
        for name in (".", *dirnames, *filenames):
            path = Path(dirpath) / name if name != "." else Path(dirpath)
            st = os.lstat(path)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                continue
            if mode & stat.S_IWOTH or st.st_gid != gid or not mode & stat.S_IRGRP:
                bad.append(f"{path} {mode:04o} gid={st.st_gid}")
            if stat.S_ISDIR(st.st_mode) and (mode & 0o2070) != 0o2070:
                bad.append(f"{path} {mode:04o} (dir)")
    return bad


@pytest.mark.slow
def test_share_creates_the_store_and_a_second_call_or_a_teammate_joins(shared):
    store, group, alice, bob = shared["store"], shared["group"], shared["alice"], shared["bob"]
    out = shared["first_share"].stdout
    assert f"created shared folder {store} for group '{group}'" in out and "permissions: ok" in out
    for sub in ("experiments.git", "dvc-remote", "dvc-cache", "virgo-share.json"):
        assert (store / sub).exists(), sub
    assert stat.S_IMODE(store.stat().st_mode) == 0o2770
    assert "sharedrepository = 1" in (store / "experiments.git" / "config").read_text()
    local = (alice.repo / ".dvc" / "config.local").read_text()
    for line in (
        f"dir = {store / 'dvc-cache'}",
        "shared = group",
        'type = "reflink,copy"',
        "remote = team",
        "git_remote = team",
        f"url = {store / 'dvc-remote'}",
    ):
        assert line in local, (line, local)
    # Nothing committed changed: the configuration is the clone's own.
    assert alice.run(["git", "status", "--porcelain", "--untracked-files=no", ".dvc"]).stdout == ""
    again = alice.vx("share", "--dir", str(store), "--group", group)
    assert f"joined shared folder {store}" in again.stdout and "this clone was already configured" in again.stdout
    joined = bob.vx("share", "--dir", str(store), "--group", group)
    assert f"joined shared folder {store}" in joined.stdout and "permissions: ok" in joined.stdout
    assert f"git remote 'team' -> {store / 'experiments.git'}" in joined.stdout
    assert bob.vx("share", "--dir", str(store), "--group", group, "--check").returncode == 0


@pytest.mark.slow
def test_share_says_which_path_and_permission_is_wrong_and_how_to_fix_it(shared):
    store, group, bob = shared["store"], shared["group"], shared["bob"]
    outsider = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            "env",
            "-i",
            f"PATH={bob.bin}:/usr/bin:/bin",
            "HOME=/tmp",
            "python",
            "-m",
            "virgo_exps.cli.share",
            "share",
            "--dir",
            str(store),
            "--group",
            group,
            "--check",
        ],
        cwd="/",
        capture_output=True,
        text=True,
    )
    assert outsider.returncode == 1
    assert (
        f"user 'nobody' is not in group '{group}': ask an administrator to run `usermod -aG {group} nobody`"
        in outsider.stderr
    )
    # Made by hand by someone else (root here), the wrong way.
    wrong = store / "dvc-cache" / "by-hand"
    wrong.mkdir()
    os.chown(wrong, 0, 0)
    os.chmod(wrong, 0o757)
    try:
        proc = bob.vx("share", "--dir", str(store), "--group", group, "--check", "--fix", check=False)
        assert proc.returncode == 1
        err = proc.stderr
        assert f"{wrong}: is world-writable (mode 0757) (owner: root)" in err
        assert f"{wrong}: belongs to group 'root', not '{group}'" in err
        assert f"{wrong}: folder lacks the setgid bit" in err
        assert "Fix (run by the owner of those paths: root, or an administrator):" in err
        assert f"chgrp -R {group} '{store}'" in err and f"chmod -R o-w '{store}'" in err
    finally:
        wrong.rmdir()
    assert teamstore.world_writable(store) == []


@pytest.mark.slow
def test_teammate_pulls_applies_and_reproduces_nothing(shared):
    alice, bob = shared["alice"], shared["bob"]
    assert "Pushed experiment alice-base to Git remote 'team'" in shared["pushed"].stdout
    assert "alice-base" in bob.run(["dvc", "exp", "list", "team"]).stdout
    bob.run(["dvc", "exp", "pull", "team", "alice-base"])
    bob.run(["dvc", "exp", "apply", "alice-base"])
    for rel in (
        "results/model.pt",
        "results/metrics.json",
        "results/report/report.md",
        "checkpoints/snapshot.pt",
        "data/images.zarr",
    ):
        assert (bob.repo / rel).exists(), rel
    assert (bob.repo / "results/model.pt").read_bytes() == (alice.repo / "results/model.pt").read_bytes()
    assert json.loads((bob.repo / "results/metrics.json").read_text()) == json.loads(
        (alice.repo / "results/metrics.json").read_text()
    )
    # The training's log came with it: what happened in Alice's run, readable in Bob's clone.
    log = (bob.repo / "results/train.log").read_text()
    assert log == (alice.repo / "results/train.log").read_text()
    assert "==> " in log and "epoch 1/" in log and "epoch 2/" in log, log[-2000:]
    assert str(alice.repo) not in log and "<checkout>" in log  # no path of Alice's machine travels
    # So did the logs of the data stages that made its data and the report's, shown per stage.
    for stage, says in (
        ("generate", "generate: output data/raw.zarr id "),
        ("preprocess", "preprocess: output data/images.zarr id "),
        ("train", "epoch 2/"),
        ("report", "report: wrote results/report/report.md"),
    ):
        shown = bob.vx("logs", "--exp", "alice-base", "--stage", stage).stdout
        assert says in shown, (stage, shown)
        assert stage == "report" or f"==> logs/{stage}/alice-base-" in shown, (stage, shown)
    # The durable copy: every output of the experiment is in the DVC remote, not only in the shared cache.
    import yaml

    lock = yaml.safe_load((bob.repo / "dvc.lock").read_text())
    spec = yaml.safe_load((bob.repo / "dvc.yaml").read_text())
    uncached = {
        path
        for st in spec["stages"].values()
        for kind in ("outs", "metrics", "plots")
        for entry in st.get(kind, [])
        if isinstance(entry, dict)
        for path, opts in entry.items()
        if (opts or {}).get("cache") is False
    }
    hashes = [
        o["md5"]
        for st in lock["stages"].values()
        for o in st.get("outs", [])
        if o.get("md5") and o["path"] not in uncached
    ]
    assert hashes
    for h in hashes:
        assert (shared["store"] / "dvc-remote" / "files" / "md5" / h[:2] / h[2:]).is_file(), h
    status = bob.run(["dvc", "status"]).stdout
    assert status.split() == ["environment:", "always", "changed"], status
    rerun = bob.run(["dvc", "exp", "run"])
    ran = {line.split("'")[1] for line in rerun.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"environment"}, rerun.stdout
    # Bob's files are copies: changing one cannot reach the shared cache Alice's clone uses.
    assert os.stat(bob.repo / "results/model.pt").st_ino != os.stat(alice.repo / "results/model.pt").st_ino
    assert os.stat(bob.repo / "results/model.pt").st_nlink == 1


@pytest.mark.slow
def test_a_push_cut_off_after_its_git_refs_leaves_nothing_false_and_completes_when_run_again(shared):
    """`dvc exp push` sends the experiment's git refs first, then its DVC objects. Cut off between the two
    (here: the DVC remote refuses Alice's upload, as a kill at that moment would leave it), the command
    fails, never says pushed; what reached the store is whole: Bob pulls the experiment and verify passes
    (the outputs git holds came with the refs, the data is in the shared cache). Run again, the push
    completes the remote."""
    store, alice, bob, group = shared["store"], shared["alice"], shared["bob"], shared["group"]
    bob.vx("share", "--dir", str(store), "--group", group)  # joined (again: nothing changes)
    # new data (the only outputs in DVC's cache; the rest git holds): objects the remote lacks
    alice.run(["dvc", "exp", "run", "-S", "preprocess.split_seed=3", "-n", "cut-push"])
    remote = store / "dvc-remote"
    modes = {p: p.stat().st_mode for p in [remote, *remote.rglob("*")] if p.is_dir()}
    try:
        for folder in modes:
            folder.chmod(0o2550)  # nobody but root writes the remote now
        cut = alice.run(["dvc", "exp", "push", "team", "cut-push"], check=False)
        assert cut.returncode != 0, cut.stdout
        assert "failed to push cache" in cut.stdout + cut.stderr, cut.stdout + cut.stderr  # said, not hidden
    finally:
        for folder, mode in modes.items():
            folder.chmod(mode & 0o7777)
    assert "cut-push" in bob.run(["dvc", "exp", "list", "team"]).stdout  # the refs arrived
    bob.run(["dvc", "exp", "pull", "team", "cut-push"])
    checked = bob.run(["python", "-m", "virgo_exps.cli.main", "verify", "--exp", "cut-push"], check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    again = alice.run(["dvc", "exp", "push", "team", "cut-push"])
    assert again.returncode == 0
    missing = alice.run(["dvc", "status", "--cloud", "--remote", "team", "--json"]).stdout
    assert "missing" not in missing and "new" not in missing, missing  # the remote holds every object now


@pytest.mark.slow
def test_both_push_six_experiments_at_once_and_all_twelve_arrive(shared):
    store, group, alice, bob = shared["store"], shared["group"], shared["alice"], shared["bob"]
    if not (bob.repo / "results" / "model.pt").exists():  # run alone: Bob starts from Alice's experiment
        bob.run(["dvc", "exp", "pull", "team", "alice-base"])
        bob.run(["dvc", "exp", "apply", "alice-base"])
    names = {u.name: [f"{u.name.split('_')[1].rstrip('0123456789')}-{i}" for i in range(N_EXPS)] for u in (alice, bob)}

    def both(script_for):
        procs = {u.name: u.popen(script_for(u)) for u in (alice, bob)}
        outs = {n: p.communicate(timeout=900)[0] for n, p in procs.items()}
        for n, p in procs.items():
            assert p.returncode == 0, f"{n}:\n{outs[n][-4000:]}"
        return outs

    # Cheap experiments: only the report stage runs (-s: this stage alone).
    both(lambda u: "set -e; " + "; ".join(f"dvc exp run -s report -S 'report.title={e}' -n {e}" for e in names[u.name]))
    start = time.monotonic()
    outs = both(lambda u: "set -e; " + "; ".join(f"dvc exp push team {e}" for e in names[u.name]))
    pushed = sum(o.count("Pushed experiment") for o in outs.values())
    assert pushed == 2 * N_EXPS, outs
    # As Bob, who does not own the bare repository (share marked it safe for him).
    remote = bob.run(["git", "ls-remote", str(store / "experiments.git"), "refs/exps/*"]).stdout
    on_remote = {line.rsplit("/", 1)[-1] for line in remote.splitlines()}
    expected = {e for n in names.values() for e in n}
    assert expected <= on_remote, sorted(expected - on_remote)
    listed = alice.run(["dvc", "exp", "list", "team", "--all-commits", "--name-only"]).stdout.split()
    assert expected | {"alice-base"} <= set(listed)
    # Every file in the store is the group's, group-readable; folders setgid and
    # group-writable; nothing anywhere is world-writable.
    assert _modes(store, group) == []
    assert teamstore.world_writable(store) == []
    assert teamstore.check_tree(store, group) == []
    assert bob.vx("share", "--dir", str(store), "--group", group, "--check").returncode == 0
    print(f"{2 * N_EXPS} concurrent pushes took {time.monotonic() - start:.1f}s")


@pytest.mark.slow
def test_a_sweeps_folders_leave_the_store_open_to_the_team(shared):
    """The folders `sweep submit` makes in the store (sweeps/<name>/logs, tasks, work), made by alice under
    umask 022: bob's `share --check` passes and bob makes a sweep folder of his own beside hers."""
    store, group, alice, bob = shared["store"], shared["group"], shared["alice"], shared["bob"]
    code = (
        "import os, sys; from pathlib import Path; os.umask(0o022); "
        "from virgo_exps.experiments.teamstore import make_group_tree; "
        "[make_group_tree(Path(sys.argv[1]), Path(sys.argv[1]) / 'sweeps' / 'lr' / s, sys.argv[2]) "
        "for s in ('logs', 'tasks', 'work')]"
    )
    alice.run(["python", "-c", code, str(store), group])
    assert _modes(store / "sweeps", group) == []
    assert bob.vx("share", "--dir", str(store), "--group", group, "--check").returncode == 0
    bob.run(["python", "-c", code.replace("'lr'", "'bob-lr'"), str(store), group])
    bob.run(["touch", str(store / "sweeps" / "lr" / "work" / "bob-was-here")])


@pytest.mark.slow
def test_a_trials_clone_is_taken_while_a_teammates_push_is_arriving(shared):
    """While a push arrives, git keeps the pushed objects in a folder only the pusher can read
    (experiments.git/objects/tmp_objdir-incoming-*, mode 0700). A sweep task of the other user clones the
    store's git at that moment: the clone succeeds (it must not walk the objects folder), and `share --check`
    does not report git's private folder as a permission problem of the store."""
    store, group, alice, bob = shared["store"], shared["group"], shared["alice"], shared["bob"]
    alice.vx("share", "--dir", str(store), "--group", group)
    git = store / "experiments.git"
    branch = "sweeps/clone-during-push"
    alice.run(["git", "push", "-q", str(git), f"HEAD:refs/heads/{branch}"])
    commit = alice.run(["git", "rev-parse", "HEAD"]).stdout.strip()
    # what `git receive-pack` makes for the length of a push: mkdir(..., 0700), whatever the folder's
    # default ACL grants the group; bob's objects inside
    incoming = git / "objects" / "tmp_objdir-incoming-test"
    bob.run(f"set -e; mkdir -m 700 {incoming}; mkdir -m 700 {incoming}/pack; echo x > {incoming}/pack/tmp_pack_x")
    work = shared["base"] / shared["alice"].name / "trial" / "work-000"
    code = (
        "import sys; from pathlib import Path; "
        "from virgo_exps.experiments.teamstore import Layout; from virgo_exps.sweeps.task import prepare_clone; "
        "prepare_clone(Path(sys.argv[1]), {'branch': sys.argv[2], 'commit': sys.argv[3]}, "
        "Layout(Path(sys.argv[4]), sys.argv[5]))"
    )
    try:
        alice.run(f"mkdir -p {work.parent}")
        cloned = alice.run(["python", "-c", code, str(work), branch, commit, str(store), group], check=False)
        assert cloned.returncode == 0, cloned.stdout + cloned.stderr
        assert alice.run(["git", "-C", str(work), "rev-parse", "HEAD"], timeout=60).stdout.strip() == commit
        assert (work / ".dvc" / "config").is_file() and (work / "params.yaml").is_file()
        checked = alice.vx("share", "--dir", str(store), "--group", group, "--check", check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    finally:
        bob.run(["rm", "-rf", str(incoming)])
        alice.run(["git", "--git-dir", str(git), "branch", "-q", "-D", branch], check=False)


@pytest.mark.slow
def test_one_pushes_while_the_other_pulls_and_both_share_at_once(shared):
    """More pairs of store operations at the same moment: Alice pushes new experiments while Bob pulls hers
    and both run `share` (push x share, pull x share); then both run `share` alone at once. Nothing is lost,
    every command that says it succeeded did, and the store stays the team's."""
    store, group, alice, bob = shared["store"], shared["group"], shared["alice"], shared["bob"]
    bob.vx("share", "--dir", str(store), "--group", group)  # joined (again: nothing changes)
    names = [f"concurrent-{i}" for i in range(3)]
    alice.run("set -e; " + "; ".join(f"dvc exp run -s report -S 'report.title={e}' -n {e}" for e in names))
    cmd = ["python", "-m", "virgo_exps.cli.share", "share", "--dir", str(store), "--group", group]
    pushing = alice.popen("set -e; " + "; ".join(f"dvc exp push team {e}" for e in names))
    pulling = bob.popen("set -e; for i in 1 2 3; do dvc exp pull team alice-base; done")
    # and, at the same moment, each runs `share` beside the other's push or pull
    sharing = [u.popen(cmd) for u in (alice, bob)]
    for proc in (pushing, pulling, *sharing):
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out[-4000:]
    listed = bob.run(["dvc", "exp", "list", "team", "--all-commits", "--name-only"]).stdout.split()
    assert set(names) <= set(listed), listed
    bob.run(["dvc", "exp", "pull", "team", *names])
    local = bob.run(["dvc", "exp", "list", "--all-commits", "--name-only"]).stdout.split()
    assert set(names) | {"alice-base"} <= set(local), local  # every experiment arrived, whole
    for name in names:  # what Bob pulled is what Alice pushed: the same commit
        theirs = alice.run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"]).stdout
        ours = bob.run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"]).stdout
        assert theirs.strip() and theirs == ours, (name, theirs, ours)
    shares = [u.popen(cmd) for u in (alice, bob)]
    for proc in shares:
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0 and "permissions: ok" in out, out[-3000:]
    assert _modes(store, group) == [] and teamstore.check_tree(store, group) == []


def _refs(user, name: str) -> str:
    return user.run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/*/*/{name}"]).stdout.strip()


@pytest.mark.slow
def test_a_pull_killed_at_any_point_leaves_nothing_false_and_completes_when_run_again(shared):
    """`dvc exp pull` killed (SIGKILL to its process group) at several points, from its start to after its
    git refs arrived: Bob's clone has the experiment whole or not at all (when `dvc exp list` shows it,
    `verify --exp` passes; otherwise verify says it does not know it), and the pull run again completes."""
    import signal

    alice, bob = shared["alice"], shared["bob"]
    bob.vx("share", "--dir", str(shared["store"]), "--group", shared["group"])  # joined (again: nothing changes)
    name = "killed-pull"
    alice.run(["dvc", "exp", "run", "-S", "preprocess.split_seed=5", "-n", name])  # new data too
    alice.run(["dvc", "exp", "push", "team", name])
    verify = ["python", "-m", "virgo_exps.cli.main", "verify", "--exp", name]
    outcomes = []
    for delay in (0.15, 0.6):
        bob.run(["dvc", "exp", "remove", name], check=False)  # each attempt from nothing
        proc = subprocess.Popen(
            bob.argv(["dvc", "exp", "pull", "team", name]),
            cwd=bob.repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        ended = proc.poll() is not None
        if not ended:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        listed = name in bob.run(["dvc", "exp", "list", "--name-only"]).stdout.split()
        checked = bob.run(verify, check=False)
        text = checked.stdout + checked.stderr
        assert "Traceback" not in text, text[-3000:]
        if listed:
            assert checked.returncode == 0, text[-3000:]  # shown, so whole
        else:
            assert checked.returncode != 0, text[-3000:]  # never a pass for what is not there
        outcomes.append((delay, "finished" if ended else "killed", "listed" if listed else "absent"))
        bob.run(["dvc", "exp", "pull", "team", name])  # run again: completes
        assert bob.run(verify).returncode == 0
        assert _refs(bob, name) == _refs(alice, name)
    print("pull killed at:", outcomes)
    assert any(kind == "killed" for _, kind, _ in outcomes), outcomes  # at least one kill landed inside it


@pytest.mark.slow
def test_a_push_killed_at_any_point_leaves_the_team_nothing_false_and_completes_when_run_again(shared):
    """`dvc exp push` killed (SIGKILL to its process group) at several points, inside its git push of the
    refs and after: the store has the experiment or not (when `dvc exp list team --all-commits` shows it, Bob pulls it
    and `verify --exp` passes), never a ref to commits it lacks (`git fsck` of the store), and the push run
    again completes."""
    import signal

    alice, bob, store, group = shared["alice"], shared["bob"], shared["store"], shared["group"]
    bob.vx("share", "--dir", str(store), "--group", group)  # joined (again: nothing changes)
    # Her results committed, so that an experiment of one stage (-s) carries every output of the others.
    alice.run("git add -A; git diff --cached --quiet || git commit -q -m 'the results'")
    outcomes = []
    for n, delay in enumerate((0.15, 0.6)):
        name = f"killed-push-{n}"
        alice.run(["dvc", "exp", "run", "-s", "report", "-S", f"report.title={name}", "-n", name])
        proc = subprocess.Popen(
            alice.argv(["dvc", "exp", "push", "team", name]),
            cwd=alice.repo,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        ended = proc.poll() is not None
        if not ended:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        fsck = bob.run(["git", "--git-dir", str(store / "experiments.git"), "fsck", "--connectivity-only"], check=False)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # no ref to a commit the store lacks
        listed = name in bob.run(["dvc", "exp", "list", "team", "--all-commits", "--name-only"]).stdout.split()
        if listed:
            bob.run(["dvc", "exp", "pull", "team", name])
            checked = bob.run(["python", "-m", "virgo_exps.cli.main", "verify", "--exp", name], check=False)
            assert checked.returncode == 0, checked.stdout + checked.stderr
        outcomes.append((delay, "finished" if ended else "killed", "listed" if listed else "absent"))
        again = alice.run(["dvc", "exp", "push", "team", name])  # run again: completes
        listed = bob.run(["dvc", "exp", "list", "team", "--all-commits", "--name-only"]).stdout.split()
        assert name in listed, (outcomes, again.stdout + again.stderr, listed)
    print("push killed at:", outcomes)
    assert any(kind == "killed" for _, kind, _ in outcomes), outcomes


@pytest.mark.slow
def test_both_pull_at_once_and_each_gets_the_others_experiments_whole(shared):
    """Alice pulls Bob's experiment while Bob pulls two of Alice's, at the same moment, through the same
    store and shared cache: every pull that says it succeeded did, and each experiment is the pusher's."""
    alice, bob = shared["alice"], shared["bob"]
    bob.vx("share", "--dir", str(shared["store"]), "--group", shared["group"])  # joined (again: nothing changes)
    if not (bob.repo / "results" / "model.pt").exists():  # run alone: Bob starts from Alice's experiment
        bob.run(["dvc", "exp", "pull", "team", "alice-base"])
        bob.run(["dvc", "exp", "apply", "alice-base"])
    for user in (alice, bob):  # results committed: an experiment of one stage carries every output
        user.run("git add -A; git diff --cached --quiet || git commit -q -m 'the results'")
    hers = ["pullpair-a0", "pullpair-a1"]
    alice.run("set -e; " + "; ".join(f"dvc exp run -s report -S 'report.title={e}' -n {e}" for e in hers))
    alice.run(["dvc", "exp", "push", "team", *hers])
    bob.run("set -e; dvc exp run -s report -S 'report.title=pullpair-b' -n pullpair-b; dvc exp push team pullpair-b")
    procs = {
        "alice": alice.popen("set -e; for i in 1 2 3; do dvc exp pull team pullpair-b; done"),
        "bob": bob.popen(f"set -e; for i in 1 2 3; do dvc exp pull team {' '.join(hers)}; done"),
    }
    for who, proc in procs.items():
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, (who, out[-4000:])
    for name in hers:
        assert _refs(bob, name) and _refs(bob, name) == _refs(alice, name), name
    assert _refs(alice, "pullpair-b") and _refs(alice, "pullpair-b") == _refs(bob, "pullpair-b")
    for user, name in ((alice, "pullpair-b"), (bob, hers[1])):
        checked = user.run(["python", "-m", "virgo_exps.cli.main", "verify", "--exp", name], check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def _sweep_state(store: Path, name: str) -> str | None:
    task = store / "sweeps" / name / "tasks" / "0.json"
    try:
        return json.loads(task.read_text()).get("state")
    except (OSError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.slurm
def test_two_teammates_each_submit_a_sweep_into_the_same_store_on_slurm(shared):
    """Alice and Bob, two Unix users of the team's group, each submit a one-trial sweep on a real Slurm into
    the same store at the same moment, while Alice also runs `share` and Bob pushes and pulls. Both trials
    run as their owner and end done; each user's trial experiment is in the store's git, and so is Bob's
    pushed one; both `share --check` pass afterwards; each reads the other's status."""
    import shlex

    from slurm_fixtures import first_job_id, start_cluster

    store, group, alice, bob, base = shared["store"], shared["group"], shared["alice"], shared["bob"], shared["base"]
    cluster = start_cluster(base / "slurm", nodes=1, cpus_per_node=2, first_job_id=first_job_id(0) + 2000)
    try:
        exports = " ".join(
            f"{k}={shlex.quote(v)}"
            for k, v in {**cluster.env, "VIRGO_MACHINE": "simcluster", "OMP_NUM_THREADS": "1"}.items()
        )
        vx = f"env {exports} python -m virgo_exps.cli.main"
        for user in (alice, bob):
            user.vx("share", "--dir", str(store), "--group", group)  # joined (again: nothing changes)
            # The committed result with its data, as a sweep starts from: alice's experiment.
            user.run(
                "set -e; dvc exp pull team alice-base; dvc exp apply alice-base; git add -A; "
                "git diff --cached --quiet || git commit -q -m 'the sweep base'; "
                f"ln -sfn {shlex.quote(str(cluster.workdir))} .slurmsim"
            )
        # Bob's own experiment, to push while the sweeps are submitted (only the report stage runs; in a
        # temporary folder, so his workspace stays as committed for his sweep).
        bob.run(["dvc", "exp", "run", "--temp", "-s", "report", "-S", "report.title=beside", "-n", "during-submit"])
        procs = {
            user.name: user.popen(f"{vx} sweep submit --grid {user.name}-lr -S train.lr=0.002 --parsable")
            for user in (alice, bob)
        }
        # The other store operations at the same moment: share (Alice), push and pull (Bob).
        sharing = f"python -m virgo_exps.cli.share share --dir {shlex.quote(str(store))} --group {group}"
        beside = {
            "share": alice.popen(sharing),
            "push and pull": bob.popen("set -e; dvc exp push team during-submit; dvc exp pull team alice-base"),
        }
        for name, proc in {**procs, **beside}.items():
            out = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, (name, out[-3000:])
            assert name in beside or out.strip().isdigit(), (name, out[-3000:])
        names = [f"{u.name}-lr" for u in (alice, bob)]
        wait_until(
            lambda: all(_sweep_state(store, n) in ("done", "failed") for n in names),
            timeout=900,
            what="both sweeps' trial",
            interval=2,
        )
        for name, user in zip(names, (alice, bob)):
            folder = store / "sweeps" / name
            state = _sweep_state(store, name)
            logs = "\n".join(p.read_text(errors="replace")[-6000:] for p in (folder / "logs").glob("*.out"))
            if state != "done":
                print(logs)  # shown with the failure
            assert state == "done", (name, state)
            assert (folder / "tasks" / "0.json").stat().st_uid == pwd.getpwnam(user.name).pw_uid  # ran as its owner
        for user in (alice, bob):  # each reads both sweeps, the other's included
            for name in names:
                shown = user.run(f"{vx} sweep status {name}").stdout
                assert "1 trials: 1 done" in shown, (user.name, name, shown)
        listed = bob.run(["dvc", "exp", "list", "team", "--all-commits", "--name-only"]).stdout.split()
        assert {f"{n}-000" for n in names} | {"during-submit"} <= set(listed), listed
        for user in (alice, bob):
            assert user.vx("share", "--dir", str(store), "--group", group, "--check").returncode == 0
        assert _modes(store, group) == []
        # Alice's records made unreadable to the team (mode 000): Bob's `sweep status` names each, never a
        # result or a traceback; the marker and sweep.json stop it (exit 3), a task record fails its trial.
        hers = store / "sweeps" / names[0]
        for path, said, code in (
            (hers / "tasks" / "0.json", "0.json is damaged (PermissionError", 0),
            (hers / "sweep.json", "sweep.json: not a sweep record (PermissionError", 3),
            (store / "virgo-share.json", "the team store's marker is damaged (PermissionError", 3),
        ):
            mode = path.stat().st_mode
            path.chmod(0)
            try:
                shown = bob.run(f"{vx} sweep status {names[0]}", check=False)
            finally:
                path.chmod(mode & 0o7777)
            text = shown.stdout + shown.stderr
            assert shown.returncode == code and said in text and "Traceback" not in text, (path.name, text[-3000:])
            if code == 0:
                assert "1 trials: 0 done, 0 running, 0 pending, 1 failed" in shown.stdout, shown.stdout
    finally:
        cluster.stop()
