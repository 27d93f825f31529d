"""Stages submitted to SLURM with ``sbatch -W`` (virgo_exps.launch.slurm, virgo_exps.launch.hvd_slurm).

Fast tests: the generated batch scripts against golden files (tests/golden/,
regenerate with VIRGO_UPDATE_GOLDEN=1), the dry run, the Horovod rank layout,
Slurm's job states to exit codes.

Against a real Slurm 22.05 (``slurm_cluster``: one node, 2 CPUs; root
needed), on tiny data: the whole pipeline through ``dvc exp run`` (train as a
job, also from a DVC temporary workspace), 2 processes per strategy, failures
reaching DVC with the job's message, a rejected submission, Ctrl-C/SIGTERM/SIGHUP
cancelling the job, a re-run after a lost login session attaching to the job
instead of submitting another, a killed tmux session cancelling the job.
Requeueing (SIGUSR1, a real time limit) is in test_slurm_requeue.py, two
nodes and node failures in test_slurm_multinode.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (
    BIN,
    ROOT,
    TRAIN_WORKER_ARGV,
    image_repo,
    make_repo,
    sh,
    shm_left_behind,
    tool_env,
    train_stage_cmd,
    wait_until,
    write_images,
)
from virgo_exps.config import ConfigError, TrainConfig
from virgo_exps.launch import hvd_slurm, slurm
from virgo_exps.launch.job import JobSpec
from virgo_exps.launch.protocol import WorkerFiles
from virgo_exps.provenance import read_metrics

GOLDEN = Path(__file__).parent / "golden"
HOROVOD = (BIN / "horovodrun").exists()
needs_horovod = pytest.mark.skipif(not HOROVOD, reason="Horovod is not built in this venv (make horovod)")
on_slurm = [pytest.mark.slurm, pytest.mark.slow]
EPOCHS = 12  # ~8 steps an epoch on the hand-made store: a few seconds of training
TEMPORARIES = ".*.tmp-*"  # the trainer's atomic writes: .snapshot.pt.tmp-<pid>


# --------------------------------------------------------------------------
# helpers shared with test_slurm_requeue.py
# --------------------------------------------------------------------------


def cluster_env(cluster, machine: str = "slurm", extra: dict | None = None) -> dict:
    """A user's environment on the login node of ``cluster`` with ``machine`` active."""
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update(cluster.env)
    env["VIRGO_MACHINE"] = machine
    env["OMP_NUM_THREADS"] = "1"  # same threads in a job and a local baseline: bit-identical results
    env.update(extra or {})
    return env


def train_cmd(
    repo: Path,
    name: str,
    strategy: str = "single",
    procs: int = 1,
    nodes: int = 1,
    epochs: int = EPOCHS,
    data: str = "data/images.zarr",
    **train,
) -> list[str]:
    """The train stage's command on outputs out/<name>/ with params-<name>.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(
        strategy=strategy,
        procs_per_node=procs,
        nodes=nodes,
        epochs=epochs,
        global_batch_size=8,
        warmup_steps=3,
        profile_steps=2,
        **train,
    )
    (repo / f"params-{name}.yaml").write_text(yaml.safe_dump(params))
    return train_stage_cmd(f"params-{name}.yaml", f"out/{name}", data)


class Running:
    """A launcher started in the background; its output is collected by a thread."""

    def __init__(self, cmd, cwd, env):
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output)
            if m:
                return m
            if self.proc.poll() is not None:
                self._thread.join(5)
                m = re.search(pattern, self.output)
                if m:
                    return m
                raise AssertionError(
                    f"launcher exited ({self.proc.returncode}) before {pattern!r}:\n{self.output[-5000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} after {timeout}s:\n{self.output[-5000:]}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._thread.join(10)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def job_id_of(output: str, stage: str = "train") -> str:
    m = re.search(rf"(?:submitted|attaching to) job (\d+) \(virgo-{stage}-", output)
    assert m, f"no job id in:\n{output[-3000:]}"
    return m.group(1)


def job_fields(cluster, job_id: str) -> dict:
    out = cluster.slurm("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(?:^|\s)(\w[\w/:]*)=(\S*)", out))


def active_jobs(cluster, name: str) -> list[str]:
    out = cluster.slurm("squeue", "-h", "-n", name, "-o", "%i").stdout
    return out.split()


def stray_sbatch(marker: str) -> list:
    """``sbatch -W`` processes whose command line mentions ``marker`` (must not outlive a launcher)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("sbatch") and marker in cmd:
            found.append(p)
    return found


def venv_without_horovod(dest: Path) -> Path:
    """This venv as one where Horovod was never built: every installed package but Horovod's,
    and no ``horovodrun`` beside the interpreter. Returns that venv's python."""
    real = BIN.parent
    (dest / "bin").mkdir(parents=True)
    (dest / "pyvenv.cfg").write_text((real / "pyvenv.cfg").read_text())
    for lib in real.glob("lib/python3*/site-packages"):
        view = dest / lib.relative_to(real)
        view.mkdir(parents=True)
        for entry in lib.iterdir():
            if not entry.name.lower().startswith("horovod"):
                (view / entry.name).symlink_to(entry)
    for name in ("python", "python3"):
        (dest / "bin" / name).symlink_to(BIN / name)
    python = dest / "bin" / "python"
    probe = "import importlib.util as u; print(u.find_spec('horovod'), u.find_spec('virgo_exps') is not None)"
    assert sh([str(python), "-c", probe], dest).stdout.split() == ["None", "True"]
    return python


def weights(out: Path) -> dict:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model"]


def assert_same_training(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"
    assert (a / "epochs.csv").read_text().splitlines()[0] == (b / "epochs.csv").read_text().splitlines()[0]
    import pandas as pd

    cols = ["epoch", "train_loss", "val_loss"]
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "epochs.csv")[cols], pd.read_csv(b / "epochs.csv")[cols], check_exact=True
    )


# --------------------------------------------------------------------------
# the batch script (no Slurm needed)
# --------------------------------------------------------------------------

# Made-up paths instead of this machine's: the golden files are the same everywhere. The
# workspace is a DVC temporary one (queued experiment), the logs go to the checkout.
CHECKOUT = "/home/user/virgo-exps"
FAKE = slurm.JobContext(
    stage="train",
    experiment="exp-golden",
    workdir=Path(f"{CHECKOUT}/.dvc/tmp/exps/tmpk2x8q1zd"),
    home=Path(CHECKOUT),
    python=f"{CHECKOUT}/.venv/bin/python",
)
FILES = WorkerFiles(params="params.yaml", checkpoints="checkpoints")  # what stages/train.py hands the launcher
CASES = {
    "slurm-single": ("slurm", TrainConfig(strategy="single")),
    "slurm-ddp-2x2": ("slurm", TrainConfig(strategy="ddp", nodes=2, procs_per_node=2)),
    "slurm-horovod-1x2": ("slurm", TrainConfig(strategy="horovod", nodes=1, procs_per_node=2)),
    "juwels-booster-deepspeed-4x4": ("juwels-booster", TrainConfig(strategy="deepspeed", nodes=4, procs_per_node=4)),
    "juwels-booster-horovod-2x4": ("juwels-booster", TrainConfig(strategy="horovod", nodes=2, procs_per_node=4)),
}


def generated(case: str, monkeypatch) -> str:
    from virgo_exps.machines import load_machine

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    machine_name, cfg = CASES[case]
    script = slurm.batch_script(
        FAKE, JobSpec.training("train", TRAIN_WORKER_ARGV, cfg, FILES), load_machine(machine_name)
    )
    return script.replace(str(ROOT), CHECKOUT)


@pytest.mark.parametrize("case", sorted(CASES))
def test_batch_script_matches_golden_file(case, monkeypatch):
    script = generated(case, monkeypatch)
    golden = GOLDEN / f"{case}.sbatch"
    if os.environ.get("VIRGO_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(script)
    assert golden.exists(), f"{golden} missing: run with VIRGO_UPDATE_GOLDEN=1 and review it"
    assert script == golden.read_text(), f"{case}: batch script changed; review, then VIRGO_UPDATE_GOLDEN=1"
    proc = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_batch_script_resources_follow_params_and_profile(monkeypatch):
    ddp = generated("juwels-booster-deepspeed-4x4", monkeypatch)
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=48" in ddp
    assert "#SBATCH --gres=gpu:4" in ddp and "#SBATCH --account=CHANGE-ME" in ddp
    assert "#SBATCH --partition=booster" in ddp and "export NCCL_SOCKET_IFNAME=ib0" in ddp
    assert "--nproc_per_node=4 --rdzv_backend=c10d" in ddp
    hvd = generated("juwels-booster-horovod-2x4", monkeypatch)
    assert "#SBATCH --ntasks-per-node=4\n#SBATCH --cpus-per-task=12" in hvd
    assert 'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=4' in hvd and "virgo_exps.launch.hvd_slurm" in hvd
    single = generated("slurm-single", monkeypatch)
    for line in (
        "#SBATCH --job-name=virgo-train-exp-golden",
        f"#SBATCH --output={CHECKOUT}/logs/train/exp-golden-%j.out",
        f"#SBATCH --chdir={CHECKOUT}/.dvc/tmp/exps/tmpk2x8q1zd",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "VIRGO_STATUS_FILE=checkpoints/status.json",
        "VIRGO_MAX_REQUEUES=3",
    ):
        assert line in single
    assert "--gpus" not in single and "--gres" not in single and "--account" not in single


def test_single_strategy_on_several_nodes_is_refused(monkeypatch):
    from virgo_exps.machines import load_machine

    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match="train.nodes"):
        spec = JobSpec.training("train", TRAIN_WORKER_ARGV, TrainConfig(strategy="single", nodes=2))
        slurm.batch_script(FAKE, spec, load_machine("slurm"))


def test_generate_array_script_matches_golden_file(monkeypatch):
    from virgo_exps.machines import load_machine

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    ctx = dataclasses.replace(FAKE, stage="generate")
    argv = ["stages/generate.py", "--params", "params.yaml", "--out", "data/raw.zarr"]
    spec = JobSpec.job_array("generate", argv, 2, max_requeues=3, files=WorkerFiles(params="params.yaml"))
    script = slurm.batch_script(ctx, spec, load_machine("slurm")).replace(str(ROOT), CHECKOUT)
    golden = GOLDEN / "slurm-generate-array-2.sbatch"
    if os.environ.get("VIRGO_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), "generate array script changed; review, then VIRGO_UPDATE_GOLDEN=1"
    for line in (
        "#SBATCH --array=0-1",
        f"#SBATCH --output={CHECKOUT}/logs/generate/exp-golden-%A_%a.out",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=1",
        '--part "$SLURM_ARRAY_TASK_ID" --parts 2 --workers "$SLURM_CPUS_PER_TASK"',
    ):
        assert line in script
    # GPUs are never asked for data generation, even on a GPU machine.
    gpu = slurm.batch_script(ctx, JobSpec.job_array("generate", argv, 4), load_machine("juwels-booster"))
    assert "#SBATCH --array=0-3" in gpu and "--gres" not in gpu


def test_job_array_state_is_the_whole_arrays():
    running = slurm.parse_show_job(
        "JobId=11 ArrayJobId=10 ArrayTaskId=1 JobState=COMPLETED Requeue=1 Restarts=0 ExitCode=0:0 NodeList=n1\n"
        "JobId=10 ArrayJobId=10 ArrayTaskId=0 JobState=RUNNING Requeue=1 Restarts=0 ExitCode=0:0 NodeList=n2\n"
    )
    assert not running.final and running.state == "RUNNING" and running.nodes == "n1,n2"
    failed = slurm.parse_show_job(
        "JobId=11 ArrayJobId=10 ArrayTaskId=1 JobState=COMPLETED Requeue=1 Restarts=0 ExitCode=0:0 NodeList=n1 "
        "StdOut=/l/e-10_1.out\n"
        "JobId=10 ArrayJobId=10 ArrayTaskId=0 JobState=FAILED Requeue=1 Restarts=1 ExitCode=3:0 NodeList=n2 "
        "StdOut=/l/e-10_0.out\n"
    )
    assert failed.final and failed.stage_exit_code() == 3 and failed.stdout == "/l/e-10_0.out"
    assert failed.restarts == 1
    done = slurm.parse_show_job(
        "JobId=11 ArrayJobId=10 ArrayTaskId=1 JobState=COMPLETED Requeue=1 Restarts=0 ExitCode=0:0 NodeList=n1\n"
        "JobId=10 ArrayJobId=10 ArrayTaskId=0 JobState=COMPLETED Requeue=1 Restarts=0 ExitCode=0:0 NodeList=n1\n"
    )
    assert done.final and done.stage_exit_code() == 0


def test_profile_fields_are_checked(tmp_path, monkeypatch):
    from virgo_exps.machines import load_machine

    for name, text in (
        ("bad-gpu", "kind: slurm\ngpu_option: gpus\n"),
        ("bad-time", "kind: slurm\ntime: 2:00:00\n"),
        ("bad-tasks", "kind: slurm\ndata_tasks: -2\n"),
        ("bad-cpus", "kind: slurm\ncpus_per_task: 0\n"),
        ("conf", "kind: slurm\nslurm_conf: cluster/slurm.conf\n"),
    ):
        (tmp_path / "machines" / name).mkdir(parents=True)
        (tmp_path / "machines" / name / "machine.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    for name, message in (
        ("bad-gpu", "gpu_option"),
        ("bad-time", "quote it"),
        ("bad-tasks", "data_tasks: -2; expected a whole number >= 0"),
        ("bad-cpus", "cpus_per_task: 0; expected a whole number >= 1"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_machine(name)
    # slurm_conf: relative to the checkout; a missing file says how to start the cluster.
    conf = load_machine("conf")
    assert conf.slurm_conf_path() == tmp_path / "cluster" / "slurm.conf"
    monkeypatch.setenv("SLURM_CONF", "")  # unset for the launcher; restored after the test
    with pytest.raises(ConfigError, match=r"slurm_conf cluster/slurm.conf does not exist .*make cluster"):
        slurm.use_slurm_conf(conf)
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "slurm.conf").write_text("# test\n")
    slurm.use_slurm_conf(conf)
    assert os.environ["SLURM_CONF"] == str(tmp_path / "cluster" / "slurm.conf")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/other.conf")  # the user's own setting wins
    slurm.use_slurm_conf(conf)
    assert os.environ["SLURM_CONF"] == "/etc/slurm/other.conf"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return image_repo(tmp_path_factory, "slurm-launch")


def test_dry_run_prints_the_script_and_submits_nothing(repo):
    env = tool_env(
        {
            "VIRGO_MACHINE": "slurm",
            "VIRGO_DRY_RUN": "1",
            "DVC_EXP_NAME": "dry",
            "PATH": f"{BIN}{os.pathsep}/usr/bin/nonexistent",
        }
    )  # no sbatch reachable: nothing can be submitted
    proc = sh(train_cmd(repo, "dry", "ddp", procs=2), repo, env)
    assert "#SBATCH --job-name=virgo-train-dry" in proc.stdout
    assert "# sbatch -W --parsable --comment=virgo:" in proc.stdout
    assert f"#SBATCH --output={repo}/logs/train/dry-%j.out" in proc.stdout
    assert "torch.distributed.run" in proc.stdout and "--nproc_per_node=2" in proc.stdout
    assert not (repo / "logs" / "train" / "dry.sbatch").exists()
    local = sh(train_cmd(repo, "dry", "ddp", procs=2), repo, {**env, "VIRGO_MACHINE": "local"})
    assert "torch.distributed.run --standalone" in local.stdout
    assert not (repo / "out" / "dry").exists()


def test_slurm_script_prints_a_launched_stage_and_refuses_the_others(repo):
    """``python -m virgo_exps.launch.slurm STAGE`` (make slurm-script): stages whose script uses the launcher."""
    env = tool_env(
        {"VIRGO_MACHINE": "slurm", "DVC_EXP_NAME": "shown", "PATH": f"{BIN}{os.pathsep}/usr/bin/nonexistent"}
    )
    module = [str(BIN / "python"), "-m", "virgo_exps.launch.slurm"]
    train = sh([*module, "train"], repo, env)
    assert "#SBATCH --job-name=virgo-train-shown" in train.stdout
    assert "VIRGO_STATUS_FILE=checkpoints/status.json" in train.stdout
    assert not (repo / "logs" / "train" / "shown.sbatch").exists()
    generate = sh([*module, "generate"], repo, env)
    assert "#SBATCH --array=0-" in generate.stdout and "VIRGO_STATUS_FILE=''" in generate.stdout
    refused = sh([*module, "preprocess"], repo, env, check=False)
    assert refused.returncode == 2
    assert "stage 'preprocess' does not go through the launcher" in refused.stderr


def test_a_job_array_needs_a_slurm_machine(monkeypatch):
    from virgo_exps.launch.launcher import launch
    from virgo_exps.machines import load_machine

    monkeypatch.chdir(ROOT)
    spec = JobSpec.job_array("generate", ["stages/generate.py"], 2)
    with pytest.raises(ConfigError, match="a job array of 2 tasks needs a SLURM machine"):
        launch(spec, load_machine("local"))
    with pytest.raises(ValueError, match="single processes on one node"):
        JobSpec("generate", ("stages/generate.py",), strategy="horovod", array=2)


def test_hostlists_and_horovod_layout():
    assert hvd_slurm.expand_hostlist("n[01-03,7],gpu1") == ["n01", "n02", "n03", "n7", "gpu1"]
    assert hvd_slurm.expand_hostlist("jwb[0001-0002]") == ["jwb0001", "jwb0002"]
    assert hvd_slurm.expand_hostlist("vm") == ["vm"]
    assert hvd_slurm.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    env = {
        "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_NODEID": "1",
        "SLURM_LOCALID": "1",
    }
    lay = hvd_slurm.layout(env)
    assert (
        lay["rank"],
        lay["size"],
        lay["local_rank"],
        lay["local_size"],
        lay["cross_rank"],
        lay["cross_size"],
        lay["hostname"],
    ) == (3, 4, 1, 2, 1, 2, "n2")
    if HOROVOD:
        plan = hvd_slurm.slot_plan(["n1", "n2"], [2, 2])
        assert [(s.rank, s.hostname, s.local_rank, s.cross_rank) for s in plan] == [
            (0, "n1", 0, 0),
            (1, "n1", 1, 0),
            (2, "n2", 0, 1),
            (3, "n2", 1, 1),
        ]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="20123")
    hvd = hvd_slurm.horovod_env(env)
    assert hvd["HOROVOD_RANK"] == "3" and hvd["HOROVOD_CONTROLLER"] == "gloo"
    assert hvd["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "127.0.0.1" and hvd["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "20123"
    assert hvd["HOROVOD_GLOO_IFACE"] == "lo"


@pytest.mark.parametrize(
    "line,code",
    [
        ("JobId=7 JobState=COMPLETED Requeue=1 Restarts=0 ExitCode=0:0 NodeList=vm", 0),
        ("JobId=7 JobState=FAILED Requeue=1 Restarts=0 ExitCode=3:0 NodeList=vm", 3),
        ("JobId=7 JobState=NODE_FAIL Requeue=0 Restarts=0 ExitCode=0:0 NodeList=vm", 1),  # sbatch -W says 0
        ("JobId=7 JobState=CANCELLED Requeue=1 Restarts=0 ExitCode=0:15 NodeList=vm", 143),
        ("JobId=7 JobState=TIMEOUT Requeue=1 Restarts=2 ExitCode=0:0 NodeList=vm", 1),
    ],
)
def test_final_states_give_the_stage_exit_code(line, code):
    info = slurm.parse_show_job(line)
    assert info.final and info.stage_exit_code() == code


def test_requeued_job_is_not_final():
    info = slurm.parse_show_job("JobId=7 JobState=PENDING Reason=BeginTime Requeue=1 Restarts=1 ExitCode=0:0")
    assert not info.final and info.restarts == 1


# --------------------------------------------------------------------------
# against a real Slurm
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(slurm_cluster, tmp_path_factory):
    """One `dvc exp run` of the whole study with train as a 2-process DDP job."""
    repo = make_repo(
        tmp_path_factory.mktemp("slurm-pipeline") / "repo", {"train": {"strategy": "ddp", "procs_per_node": 2}}
    )
    ignore = repo / ".dvcignore"
    if TEMPORARIES not in ignore.read_text().split("\n"):
        # DVC hashing checkpoints/ while a job writes it (the re-run that attaches) trips over the
        # trainer's atomic-write temporaries (FileNotFoundError); the project's .dvcignore should
        # list them, this keeps the test meaningful until it does.
        ignore.write_text(ignore.read_text() + f"\n{TEMPORARIES}\n")
        sh(["git", "commit", "-qam", "ignore temporaries"], repo, tool_env())
    env = cluster_env(slurm_cluster)
    first = sh([str(BIN / "dvc"), "exp", "run"], repo, env, check=False, timeout=900)
    return repo, env, first


@pytest.mark.slurm
@pytest.mark.slow
def test_pipeline_runs_train_as_a_slurm_job(slurm_cluster, pipeline):
    repo, env, first = pipeline
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-6000:]
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {
        "environment",
        "generate",
        "preprocess",
        "train",
        "report",
    }
    job = job_id_of(out)
    assert re.search(rf"job {job} running on 1 node\(s\): {slurm_cluster.node_names[0]}", out)
    assert f"job {job} COMPLETED" in out
    logs = list((repo / "logs" / "train").glob(f"*-{job}.out"))
    assert len(logs) == 1, list((repo / "logs" / "train").iterdir())
    log = logs[0].read_text()
    assert f"virgo: job {job} (virgo-train-" in log and "machine slurm" in log
    assert f"on 1 node(s): {slurm_cluster.node_names[0]}" in log
    fields = job_fields(slurm_cluster, job)
    assert fields["JobState"] == "COMPLETED" and fields["WorkDir"] == str(repo)
    metrics = read_metrics(repo / "results" / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp"
    assert (repo / "results" / "report" / "report.md").is_file()


@pytest.mark.slurm
@pytest.mark.slow
def test_generate_runs_as_a_job_array_and_writes_the_same_store(slurm_cluster, pipeline, tmp_path):
    """The `slurm` profile has data_tasks: 2; the store equals one generated on one machine."""
    repo, env, first = pipeline
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-6000:]
    m = re.search(r"submitted job (\d+) \(virgo-generate-[^,]+, array of 2 tasks\)", out)
    assert m, out[-6000:]
    logs = sorted((repo / "logs" / "generate").glob(f"*-{m.group(1)}_*.out"))
    assert [p.name.rsplit("_", 1)[1] for p in logs] == ["0.out", "1.out"], logs
    # 40 samples in chunks of 16: 3 chunks, split 1 + 2
    assert "part 0 of 2 wrote chunks 0..0" in logs[0].read_text()
    assert "part 1 of 2 wrote chunks 1..2" in logs[1].read_text()
    assert "generate: 2 array tasks done" in out and not (repo / "data" / "raw.zarr.parts").exists()
    sh(
        [str(BIN / "python"), "stages/generate.py", "--out", str(tmp_path / "raw.zarr")],
        repo,
        tool_env({"VIRGO_MACHINE": "local"}),
    )
    ours = {
        p.relative_to(repo / "data" / "raw.zarr"): p.read_bytes()
        for p in (repo / "data" / "raw.zarr").rglob("*")
        if p.is_file()
    }
    local = {
        p.relative_to(tmp_path / "raw.zarr"): p.read_bytes() for p in (tmp_path / "raw.zarr").rglob("*") if p.is_file()
    }
    assert len(ours) > 3 and ours.keys() == local.keys()
    assert [k for k in ours if ours[k] != local[k]] == []


@pytest.mark.slurm
@pytest.mark.slow
def test_generate_array_does_not_need_the_trainings_horovod(slurm_cluster, tmp_path):
    """generate submits its own job spec: with train.strategy horovod and Horovod not built, the
    generate array still runs; the training itself is refused before anything is submitted."""
    repo = make_repo(tmp_path / "repo", {"train": {"strategy": "horovod", "procs_per_node": 2}})
    python = venv_without_horovod(tmp_path / "venv")
    env = cluster_env(slurm_cluster, extra={"DVC_EXP_NAME": "no-hvd"})
    env["PATH"] = f"{python.parent}{os.pathsep}{env['PATH']}"
    gen = sh([str(python), "stages/generate.py", "--out", "data/raw.zarr"], repo, env, check=False, timeout=600)
    out = gen.stdout + gen.stderr
    assert gen.returncode == 0, out[-6000:]
    assert re.search(r"submitted job \d+ \(virgo-generate-no-hvd, array of 2 tasks\)", out), out[-6000:]
    assert "generate: 2 array tasks done" in out and (repo / "data" / "raw.zarr" / "zarr.json").is_file()
    write_images(repo / "data" / "images.zarr")
    cmd = train_cmd(repo, "no-hvd", "horovod", procs=2)
    train = sh([str(python), *cmd[1:]], repo, env, check=False, timeout=600)
    assert train.returncode != 0
    assert "error: train.strategy: 'horovod' needs Horovod, which is not built in this environment" in train.stderr
    assert "submitted job" not in train.stdout + train.stderr


@pytest.mark.slurm
@pytest.mark.slow
def test_experiment_in_a_dvc_temporary_workspace_logs_to_the_main_checkout(slurm_cluster, pipeline):
    repo, env, first = pipeline
    assert first.returncode == 0
    proc = sh(
        [str(BIN / "dvc"), "exp", "run", "--temp", "-n", "in-temp", "-S", "train.epochs=3"], repo, env, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    job = job_id_of(out)
    assert (repo / "logs" / "train" / f"in-temp-{job}.out").is_file()
    workdir = job_fields(slurm_cluster, job)["WorkDir"]
    assert f"{repo}/.dvc/tmp/exps/" in workdir, workdir
    assert "#SBATCH --chdir=" + workdir in (repo / "logs" / "train" / "in-temp.sbatch").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_crash_of_one_rank_fails_dvc_with_the_jobs_message(slurm_cluster, pipeline):
    repo, env, first = pipeline
    assert first.returncode == 0
    # a changed lr starts afresh (no resume), so step 1 is reached again
    proc = sh(
        [str(BIN / "dvc"), "exp", "run", "-S", "train.lr=0.002"], repo, {**env, "VIRGO_FAULT_CRASH": "1:1"}, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    job = job_id_of(out)
    assert re.search(rf"launch: error: job {job} \(virgo-train-[\w-]+\) ended FAILED with exit code 1", out), out[
        -4000:
    ]
    assert "injected fault at step 1 (VIRGO_FAULT_CRASH)" in out
    assert "error: training process rank 1 failed" in out
    assert "failed to reproduce 'train'" in out or "ERROR" in out
    assert job_fields(slurm_cluster, job)["JobState"] == "FAILED"


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["deepspeed", pytest.param("horovod", marks=[pytest.mark.horovod, needs_horovod])])
def test_two_processes_per_strategy(slurm_cluster, repo, strategy):
    """DeepSpeed through its own runner (a profile's choice), Horovod one task a rank.

    (DDP with 2 processes: the `pipeline` fixture; DDP and DeepSpeed through torchrun on
    several nodes: test_slurm_multinode.py.)"""
    name = f"two-{strategy}"
    machine = "slurm"
    if strategy == "deepspeed":
        machine = "slurm-deepspeed-runner"
        folder = repo / "machines" / machine
        if not folder.exists():
            shutil.copytree(repo / "machines" / "slurm", folder)
            spec = yaml.safe_load((folder / "machine.yaml").read_text())
            (folder / "machine.yaml").write_text(yaml.safe_dump({**spec, "deepspeed_launcher": "deepspeed"}))
    start = time.time()
    proc = sh(
        train_cmd(repo, name, strategy, procs=2),
        repo,
        cluster_env(slurm_cluster, machine=machine, extra={"DVC_EXP_NAME": name}),
        check=False,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    job = job_id_of(out)
    if strategy == "deepspeed":
        script = (repo / "logs" / "train" / f"{name}.sbatch").read_text()
        assert '-m deepspeed.launcher.runner --node_rank="$SLURM_NODEID"' in script
        hostfile = repo / "logs" / "train" / f"{name}-{job}.hostfile"
        assert hostfile.read_text() == f"{slurm_cluster.node_names[0]} slots=2\n"
        assert shm_left_behind(start) == []  # DeepSpeed's all-reduce buffers went with the job
    metrics = read_metrics(repo / "out" / name / "metrics.json")
    assert metrics["world_size"] == 2 and metrics["strategy"] == strategy and metrics["epochs"] == EPOCHS
    log = (repo / "logs" / "train" / f"{name}-{job}.out").read_text()
    assert f"virgo: job {job} (virgo-train-{name})" in log
    assert [r["rank"] for r in json.loads((repo / "out" / name / "ranks.json").read_text())] == [0, 1]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_deepspeed_buffer_name_another_user_planted_stops_the_job_before_it_trains(slurm_cluster, repo):
    """Under Slurm the name of each rank's DeepSpeed all-reduce buffer in /dev/shm follows from our uid, the
    first node and the job id (the rendezvous port): anyone who reads squeue can plant it. Another Unix user
    plants it, world-writable, for the next job ids: the job stops before its first step with one line
    naming the file and its owner, records nothing, and the planted files receive nothing."""
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("creating Unix users (useradd, runuser) needs root")
    name, planter = "planted-buffer", f"vx_shm{os.getpid() % 100000}"
    machine = "slurm-deepspeed-runner"
    folder = repo / "machines" / machine
    if not folder.exists():
        shutil.copytree(repo / "machines" / "slurm", folder)
        spec = yaml.safe_load((folder / "machine.yaml").read_text())
        (folder / "machine.yaml").write_text(yaml.safe_dump({**spec, "deepspeed_launcher": "deepspeed"}))
    env = cluster_env(slurm_cluster, machine=machine, extra={"DVC_EXP_NAME": name})
    last = int(sh(["sbatch", "--parsable", "--wrap", "true"], repo, env).stdout.strip().split(";")[0])
    node = slurm_cluster.node_names[0]
    names = [
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{node}_{20000 + job % 10000}_{rank}"
        for job in range(last + 1, last + 6)
        for rank in (0, 1)
    ]
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", planter], check=True, capture_output=True)
    try:
        planted = subprocess.run(
            ["runuser", "-u", planter, "--", "sh", "-c", 'umask 0; for f; do : > "$f"; done', "sh", *names],
            capture_output=True,
            text=True,
        )
        assert planted.returncode == 0, planted.stderr
        proc = sh(train_cmd(repo, name, "deepspeed", procs=2), repo, env, check=False, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0 and "Traceback" not in out, out[-5000:]
        said = [ln for ln in out.splitlines() if "holds the name of this rank's DeepSpeed all-reduce buffer" in ln]
        assert said and f"belongs to user {planter}" in said[0] and "nothing was started" in said[0], out[-5000:]
        assert not (repo / "out" / name / "metrics.json").exists()
        assert all(os.stat(f).st_size == 0 and os.stat(f).st_uid != 0 for f in names)  # nothing written to them
    finally:
        for f in names:
            Path(f).unlink(missing_ok=True)
        subprocess.run(["userdel", planter], capture_output=True)


@pytest.mark.slurm
@pytest.mark.slow
def test_failing_job_gives_its_exit_code_and_log_tail(slurm_cluster, repo):
    # a missing data store: the worker fails on every rank
    cmd = train_cmd(repo, "fail", "single", data="data/missing.zarr")
    proc = sh(cmd, repo, cluster_env(slurm_cluster, extra={"DVC_EXP_NAME": "fail"}), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    job = job_id_of(out)
    assert re.search(rf"job {job} \(virgo-train-fail\) ended FAILED with exit code {proc.returncode} on nodes", out)
    assert "its last 30 lines:" in out and "missing.zarr" in out.split("its last 30 lines:")[1]


@pytest.mark.slurm
@pytest.mark.slow
def test_rejected_submission_is_reported(slurm_cluster, repo):
    folder = repo / "machines" / "slurm-bad"
    shutil.copytree(repo / "machines" / "slurm", folder, dirs_exist_ok=True)
    spec = yaml.safe_load((folder / "machine.yaml").read_text())
    spec["partition"] = "nosuchpartition"
    (folder / "machine.yaml").write_text(yaml.safe_dump(spec))
    proc = sh(train_cmd(repo, "bad"), repo, cluster_env(slurm_cluster, machine="slurm-bad"), check=False)
    assert proc.returncode != 0
    assert "launch: error: sbatch failed" in proc.stderr and "Invalid partition" in proc.stderr


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_signal_to_the_launcher_cancels_the_job(slurm_cluster, repo, sig):
    name = f"cancel-{sig.name.lower()}"
    run = Running(train_cmd(repo, name, epochs=400), repo, cluster_env(slurm_cluster, extra={"DVC_EXP_NAME": name}))
    try:
        run.wait_for(r"epoch 1/400")
        job = job_id_of(run.output)
        run.proc.send_signal(sig)
        rc = run.finish(timeout=120)
    finally:
        run.kill()
    assert rc == 128 + sig, run.output[-3000:]
    assert f"{sig.name} received: cancelling job {job}" in run.output
    assert f"job {job} cancelled; squeue no longer lists it" in run.output
    assert active_jobs(slurm_cluster, f"virgo-train-{name}") == []
    assert job_fields(slurm_cluster, job)["JobState"] == "CANCELLED"
    assert stray_sbatch(f"{name}.sbatch") == []


@pytest.mark.slurm
@pytest.mark.slow
def test_dvc_rerun_after_a_lost_session_attaches_to_the_running_job(slurm_cluster, pipeline):
    """The login session dies (dvc, the launcher and sbatch -W killed); `dvc exp run` again waits
    for the job that is still running instead of submitting a second one, even though DVC names
    the new run differently; with other params it refuses while that job runs."""
    repo, env, first = pipeline
    assert first.returncode == 0
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(epochs=200, lr=0.001)  # ~40 s: still running when dvc runs again
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    saved = (repo / "params.yaml").read_bytes()
    before = set(jobs_named_like(slurm_cluster, "virgo-train-"))
    lost = subprocess.Popen(
        [str(BIN / "dvc"), "exp", "run"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        seen = []
        for line in lost.stdout:
            seen.append(line)
            if re.search(r"epoch \d+/200", line):
                break
        job = job_id_of("".join(seen))
    finally:
        os.killpg(lost.pid, signal.SIGKILL)  # everything of the session at once, as a dying login node
        lost.wait()
        for p in stray_sbatch(str(repo)):
            p.kill()
    try:
        assert active_jobs(slurm_cluster, job_fields(slurm_cluster, job)["JobName"]) == [job]
        other = sh([str(BIN / "dvc"), "exp", "run", "-S", "train.lr=0.003"], repo, env, check=False)
        (repo / "params.yaml").write_bytes(saved)
        assert other.returncode != 0
        assert f"job {job} (virgo-train-" in other.stderr + other.stdout
        assert "submitted with another batch script or params" in other.stderr + other.stdout
        again = sh([str(BIN / "dvc"), "exp", "run"], repo, env, check=False)
    finally:  # a failure here must not leave the job to the next tests
        if slurm_cluster.slurm("squeue", "-h", "-j", job, check=False).stdout.strip():
            slurm_cluster.slurm("scancel", job, check=False)
            wait_until(
                lambda: not slurm_cluster.slurm("squeue", "-h", "-j", job, check=False).stdout.strip(),
                60,
                f"job {job} to be cancelled",
            )
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-5000:]
    assert f"attaching to job {job}" in out and "submitted job" not in out
    assert set(jobs_named_like(slurm_cluster, "virgo-train-")) - before == {job}
    assert read_metrics(repo / "results" / "metrics.json")["epochs"] == 200


def jobs_named_like(cluster, prefix: str) -> list[str]:
    out = cluster.slurm("scontrol", "show", "job", "-o", check=False).stdout
    return [m.group(1) for m in re.finditer(rf"JobId=(\d+) JobName={re.escape(prefix)}", out)]


@pytest.mark.slurm
@pytest.mark.slow
def test_killing_the_tmux_session_cancels_the_job(slurm_cluster, pipeline):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    repo, env, first = pipeline
    assert first.returncode == 0
    venv = repo / ".venv"
    if not venv.exists():
        venv.symlink_to(BIN.parent)
    socket_name = f"virgo-test-{os.getpid()}"
    session = "virgo-slurm-test"
    tenv = {**env, "VIRGO_TMUX_SOCKET": socket_name}
    tmux = ["tmux", "-L", socket_name]
    # more epochs: train continues from its snapshot as a long job
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epochs"] = 400
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        sh(["bash", "scripts/tmux_run.sh", session], repo, tenv)
        seen = {"pane": ""}

        def progress() -> bool:
            seen["pane"] = sh(
                [*tmux, "capture-pane", "-p", "-J", "-S", "-300", "-t", session], repo, tenv, check=False
            ).stdout
            return bool(re.search(r"epoch \d+/400", seen["pane"]))

        try:
            wait_until(progress, 240, "training progress in the tmux pane")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the pane shows:\n{seen['pane'][-4000:]}") from None
        job = job_id_of(seen["pane"])
        assert active_jobs(slurm_cluster, job_fields(slurm_cluster, job)["JobName"]) == [job]
        session_procs = in_session(socket_name)
        assert any("stages/train.py" in " ".join(p.cmdline()) for p in session_procs)
        sh([*tmux, "kill-session", "-t", session], repo, tenv)
        wait_until(lambda: job_fields(slurm_cluster, job)["JobState"] == "CANCELLED", 90, f"job {job} to be cancelled")
        wait_until(
            lambda: not slurm_cluster.slurm("squeue", "-h", "-j", job, check=False).stdout.strip(),
            90,
            f"squeue to drop job {job}",
        )
        # virgo-exps, dvc and the launcher are gone once the job is (nothing left behind)
        wait_until(lambda: not any(alive(p) for p in session_procs), 60, "the session's processes to exit")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    wait_until(lambda: stray_sbatch(str(repo)) == [], 30, "no sbatch -W left")


def in_session(socket_name: str) -> list:
    """Processes started in the tmux session (they inherited VIRGO_TMUX_SOCKET)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("VIRGO_TMUX_SOCKET") == socket_name and p.name() != "tmux: server":
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
