"""A stage ends, with everything it started, when the process that started it ends.

`dvc exp run` is signalled from outside (TERM, HUP, KILL; INT is ignored by dvc
while a stage runs, so it is sent as a terminal sends Ctrl-C: to the process
group) while a stage runs: locally during preprocess (a pool of worker
processes) and training, on the test Slurm while the training job runs. Within
seconds no process of the run is left (the process table, by working directory
and command line), `squeue` is empty, and `dvc exp run` right after works.

The runs are chained to keep the module cheap: each re-run is the next case's
run (the local chain continues in the tmux test), and the last one on Slurm
runs to the end. `scripts/tmux_run.sh` is tested with a tmux
server that already runs another session: the caller's machine and
environment reach the run, Ctrl-C stops it, and the window stays readable.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import BIN, make_repo, sh, tool_env, wait_until

# They time how fast a signal stops a run: alone (`make test` runs `serial` after the rest).
pytestmark = pytest.mark.serial
STOP_S = 60  # "within seconds", with room for a loaded 2-core machine
LONG = ["-S", "train.epochs=400"]  # a training that is still running when signalled


class DvcRun:
    """`dvc exp run` in its own process group (as from a terminal), output collected by a thread."""

    def __init__(self, repo: Path, env: dict, args: list[str]):
        self.repo = repo
        self.proc = subprocess.Popen(
            [str(BIN / "dvc"), "exp", "run", *args],
            cwd=repo,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        def seen():
            m = re.search(pattern, self.output)
            if m is None and self.proc.poll() is not None:
                self._reader.join(5)
                m = re.search(pattern, self.output)
                if m is None:
                    raise AssertionError(
                        f"dvc exited ({self.proc.returncode}) before {pattern!r}:\n{self.output[-5000:]}"
                    )
            return m

        try:
            return wait_until(seen, timeout, repr(pattern))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output[-5000:]}") from None

    def end(self, timeout: float = STOP_S) -> int:
        rc = self.proc.wait(timeout=timeout)  # reaped: DVC's lock files name a pid no longer there
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            with_suppressed(os.killpg, self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def with_suppressed(fn, *args):
    try:
        fn(*args)
    except (ProcessLookupError, PermissionError):
        pass


def run_processes(repo: Path, keep: frozenset = frozenset()) -> list[str]:
    """Live processes working in ``repo`` or naming it on their command line ("pid cmdline")."""
    found = []
    root = str(repo)
    for p in psutil.process_iter(["pid", "cmdline", "cwd", "status"]):
        if p.info["pid"] in keep or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        cwd = p.info["cwd"] or ""
        if cwd == root or cwd.startswith(root + os.sep) or root in cmd:
            found.append(f"{p.info['pid']} {cmd}")
    return found


def assert_all_ended(repo: Path, what: str, since: float, keep: frozenset = frozenset()) -> float:
    """Wait until no process of the run is left; return how long after ``since`` (monotonic) that was."""
    left: list[str] = []

    def none_left():
        left[:] = run_processes(repo, keep)
        return not left

    try:
        wait_until(none_left, STOP_S, f"the processes of the run to end after {what}", interval=0.25)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still running:\n" + "\n".join(left)) from None
    return round(time.monotonic() - since, 1)


def stage_children(repo: Path, script: str) -> list:
    """Children of the process running ``stages/<script>`` in ``repo``."""
    for p in psutil.process_iter(["cmdline", "cwd"]):
        if p.info["cwd"] == str(repo) and f"stages/{script}" in " ".join(p.info["cmdline"] or []):
            try:
                return p.children()
            except psutil.NoSuchProcess:
                return []
    return []


def stage_parent(repo: Path, stage: str) -> int | None:
    """Parent pid of the process running ``stages/<stage>.py`` (the launcher, not its workers)."""
    for p in psutil.process_iter(["cmdline", "cwd", "ppid"]):
        argv = p.info["cmdline"] or [""]
        if (
            p.info["cwd"] == str(repo)
            and "python" in Path(argv[0]).name
            and f"stages/{stage}.py" in argv[1:2]
            and "--worker" not in argv
        ):
            return p.info["ppid"]
    return None


def signal_dvc(run: DvcRun, sig: signal.Signals, stage: str) -> float:
    """Send ``sig`` to dvc; SIGINT, which dvc ignores while a stage runs, then to its process group.

    Returns when (monotonic) the signal that stops the run was sent.
    """
    os.kill(run.proc.pid, sig)
    if sig == signal.SIGINT:
        time.sleep(3)
        assert run.proc.poll() is None, "dvc no longer ignores SIGINT while a stage runs: update the README"
        assert any(f"stages/{stage}.py" in line for line in run_processes(run.repo)), "the stage ended on SIGINT"
        sent = time.monotonic()
        os.killpg(run.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        return sent
    return time.monotonic()


@pytest.fixture(scope="module")
def local_repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("stop") / "repo")
    yield repo
    leftover = run_processes(repo)
    for line in leftover:  # never leave a stray run to the next tests
        with_suppressed(os.kill, int(line.split()[0]), signal.SIGKILL)


@pytest.mark.slow
def test_dvc_signalled_during_a_local_run_leaves_nothing_and_reruns(local_repo, tmp_path):
    repo, env = local_repo, tool_env()
    timings = {}
    # KILL during preprocess (a pool of worker processes), then every other signal during training;
    # each case's run is also the re-run right after the case before.
    # DVC runs `$SHELL -c <cmd>`; bash replaces itself by the command, some shells stay in between
    # (tcsh, dash for some commands): `staying` is such a shell.
    staying = tmp_path / "sh"
    staying.write_text('#!/bin/bash\n/bin/bash -c "$2"\n')
    staying.chmod(0o755)
    cases = [
        (signal.SIGKILL, "preprocess", "bash"),
        (signal.SIGTERM, "train", "bash"),
        (signal.SIGHUP, "train", str(staying)),
        (signal.SIGINT, "train", "bash"),
    ]
    for sig, stage, shell in cases:
        run = DvcRun(repo, {**env, "SHELL": shutil.which(shell)}, LONG)
        try:
            if stage == "preprocess":
                run.wait_for(r"\[preprocess\] \d+ samples")
                wait_until(lambda: stage_children(repo, "preprocess.py"), 120, "preprocess workers")
            else:
                run.wait_for(r"epoch \d+/400")
            parent = stage_parent(repo, stage)
            assert (parent == run.proc.pid) == (shell == "bash"), (shell, parent, run.proc.pid)
            assert "Directory not empty" not in run.output and "is busy" not in run.output, run.output[-3000:]
            sent = signal_dvc(run, sig, stage)
            rc = run.end()
            timings[sig.name] = assert_all_ended(repo, f"{sig.name} to dvc during {stage}", sent)
        finally:
            run.kill()
        assert rc != 0, f"{sig.name}: dvc ended with 0:\n{run.output[-3000:]}"
        if sig != signal.SIGINT:
            assert rc == -sig, (sig.name, rc)
            assert f"the process that started this stage (pid {run.proc.pid}) ended" in run.output, run.output[-3000:]
        else:
            assert "ERROR: failed to reproduce 'train'" in run.output, run.output[-3000:]
    # The re-run after the last case is the next test's run (in tmux); the one on Slurm completes.
    print(f"local: no process of the run left (s after the signal): {timings}")


@pytest.mark.slow
def test_tmux_run_takes_the_callers_environment_and_keeps_the_window(local_repo, tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    repo = local_repo
    if not (repo / ".venv").exists():
        (repo / ".venv").symlink_to(BIN.parent)
    # a machine of this name exists only in this repo: seeing it proves VIRGO_MACHINE arrived
    shutil.copytree(repo / "machines" / "local", repo / "machines" / "local-tmux", dirs_exist_ok=True)
    socket_name = f"virgo-stop-{os.getpid()}"
    tmux = ["tmux", "-L", socket_name]
    base = {**tool_env(), "VIRGO_TMUX_SOCKET": socket_name, "TMPDIR": str(tmp_path)}
    mark = "a b'$c"
    caller = {**base, "VIRGO_MACHINE": "local-tmux", "VIRGO_TEST_MARK": mark}
    session = "virgo-stop"
    try:
        # a server that already runs, started without the caller's variables
        sh([*tmux, "new-session", "-d", "-s", "other"], tmp_path, base)
        started = sh(["bash", "scripts/tmux_run.sh", session, *LONG, "-S", "train.seed=21"], repo, caller)
        assert "machine local-tmux" in started.stdout
        pane = {"text": ""}

        def shows(pattern: str):
            def check():
                pane["text"] = sh(
                    [*tmux, "capture-pane", "-p", "-J", "-S", "-400", "-t", session], repo, base, check=False
                ).stdout
                return re.search(pattern, pane["text"])

            try:
                return wait_until(check, 300, repr(pattern), interval=0.5)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the pane shows:\n{pane['text'][-4000:]}") from None

        shows(r"epoch \d+/400")
        assert "launch: train on 'local-tmux'" in pane["text"]
        assert not list(tmp_path.glob("virgo-tmux-env.*")), "the environment file was not removed"
        server = int(sh([*tmux, "display-message", "-p", "#{pid}"], repo, base).stdout)
        shell = int(sh([*tmux, "display-message", "-p", "-t", session, "#{pane_pid}"], repo, base).stdout)
        sh([*tmux, "send-keys", "-t", session, "C-c"], repo, base)
        took = assert_all_ended(repo, "Ctrl-C in the tmux window", time.monotonic(), keep=frozenset({server, shell}))
        shows(r"pipeline finished with exit code [1-9]\d*; this window stays open")
        assert sh([*tmux, "display-message", "-p", "-t", session, "#{pane_dead}"], repo, base).stdout.strip() == "0"
        # the window's shell still has the caller's environment, and the output above is still there
        sh(
            [*tmux, "send-keys", "-t", session, 'echo "mark=[$VIRGO_TEST_MARK] machine=$VIRGO_MACHINE"', "Enter"],
            repo,
            base,
        )
        shows(re.escape(f"mark=[{mark}] machine=local-tmux"))
        assert re.search(r"epoch \d+/400", pane["text"])
        print(f"Ctrl-C in tmux: processes ended within {took:.1f} s")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)


@pytest.mark.slurm
@pytest.mark.slow
def test_dvc_signalled_while_the_train_job_runs_cancels_it(slurm_cluster, local_repo):
    repo = local_repo
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update(slurm_cluster.env)
    env.update(VIRGO_MACHINE="slurm", OMP_NUM_THREADS="1")

    def queue() -> list[str]:
        return slurm_cluster.slurm("squeue", "-h", "-o", "%i %j %T").stdout.split("\n")

    timings = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL):
        run = DvcRun(repo, env, LONG)
        try:
            run.wait_for(r"epoch \d+/400")
            job = re.search(r"submitted job (\d+) \(virgo-train-", run.output)
            assert job, run.output[-3000:]
            assert any(line.startswith(job.group(1) + " ") for line in queue())
            sent = signal_dvc(run, sig, "train")
            wait_until(
                lambda: not any(line.strip() for line in queue()), STOP_S, f"squeue to be empty after {sig.name} to dvc"
            )
            timings[sig.name] = round(time.monotonic() - sent, 1)
            run.end()
            assert_all_ended(repo, f"{sig.name} to dvc while job {job.group(1)} ran", sent)
        finally:
            run.kill()
        assert f"received: cancelling job {job.group(1)}" in run.output, run.output[-3000:]
        state = slurm_cluster.slurm("scontrol", "show", "job", job.group(1), check=False).stdout
        assert "JobState=CANCELLED" in state or not state.strip(), state
    done = sh(
        [str(BIN / "dvc"), "exp", "run", "-S", "train.epochs=2", "-S", "train.seed=12"],
        repo,
        env,
        check=False,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert re.search(r"job \d+ COMPLETED", out), out[-3000:]
    assert [line for line in queue() if line.strip()] == []
    print(f"squeue empty after the signal within (s): {timings}")
