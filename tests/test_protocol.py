"""What a worker and its launcher agree on (launch/protocol.py), and the strategy table.

Unit tests without Slurm: the names the launcher writes are the names
failures.py reads back, the trainer and the batch script use the one exit
code, and every strategy's row starts the processes it says.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from virgo_exps.config import STRATEGIES, ConfigError, TrainConfig
from virgo_exps.launch import protocol
from virgo_exps.launch.job import JobSpec
from virgo_exps.launch.launcher import local_command
from virgo_exps.launch.slurm import JobContext, batch_script
from virgo_exps.launch.strategy_table import HOROVOD_MISSING, STRATEGY_TABLE, check_software, strategy_row
from virgo_exps.machines import load_machine


def test_the_trainer_and_the_batch_script_use_the_protocols_exit_code_and_status_file(monkeypatch):
    from virgo_exps.train import snapshots, trainer

    assert trainer.EXIT_INTERRUPTED == protocol.EXIT_INTERRUPTED == 85
    defined = [
        p.relative_to(ROOT).as_posix()
        for p in sorted((ROOT / "src").rglob("*.py"))
        if re.search(r"^\s*EXIT_INTERRUPTED\s*=", p.read_text(), flags=re.M)
    ]
    assert defined == ["src/virgo_exps/launch/protocol.py"]  # the others import it
    assert snapshots.STATUS == protocol.STATUS_FILE
    monkeypatch.chdir(ROOT)
    ctx = JobContext("train", "e", Path("/w"), Path("/h"), "/h/.venv/bin/python")
    files = protocol.WorkerFiles(params="p.yaml", checkpoints="out/ck")
    script = batch_script(ctx, JobSpec.training("train", ["t.py"], TrainConfig(), files), load_machine("slurm"))
    assert f"VIRGO_EXIT_INTERRUPTED={protocol.EXIT_INTERRUPTED}\n" in script
    assert f"VIRGO_STATUS_FILE=out/ck/{protocol.STATUS_FILE}\n" in script
    assert f'"status": *"{protocol.STATUS_INTERRUPTED}"' in script
    assert f"MASTER_PORT={protocol.JOB_RENDEZVOUS_PORT}\n" in script
    # a worker without a status file: the script reads none
    bare = batch_script(ctx, JobSpec.job_array("generate", ["g.py"], 2), load_machine("slurm"))
    assert "VIRGO_STATUS_FILE=''\n" in bare


@pytest.mark.parametrize("experiment", ["exp-1", "a-b-12", "x-local-3", "ünïcode name", "100%"])
def test_log_names_written_are_the_names_read_back(experiment):
    for name in (
        protocol.local_log_name(experiment, 4321),
        protocol.job_log_name(experiment, "812"),
        protocol.job_log_name(experiment, "812", "3"),
    ):
        assert protocol.experiment_of_log(name) == experiment, name
    assert protocol.experiment_of_log(f"{experiment}.sbatch") is None
    assert protocol.experiment_of_log(f"{experiment}-12.hostfile") is None


def test_the_job_log_pattern_is_the_job_log_name_with_slurms_placeholders():
    assert protocol.job_log_pattern("e") == protocol.job_log_name("e", "%j")
    assert protocol.job_log_pattern("e", array=True) == protocol.job_log_name("e", "%A", "%a")
    ctx = JobContext("train", "100%", Path("/w"), Path("/h%x"), "python")
    assert ctx.log_pattern == "/h%%x/logs/train/100%%-%j.out"
    assert ctx.array_log_pattern == "/h%%x/logs/train/100%%-%A_%a.out"
    assert ctx.log_file("7", "2") == Path("/h%x/logs/train") / protocol.job_log_name("100%", "7", "2")


def test_announced_logs_are_found_in_the_launchers_output():
    text = "\n".join(
        [
            "launch: train on 'local': python stages/train.py",
            protocol.log_announcement(Path("/c/logs/train/e-local-12.out")),
            "launch: error: job 9 (virgo-train-e) ended FAILED with exit code 3 on nodes n1",
            f"{protocol.log_announcement(Path('/c/logs/train/e-9.out'))}; its last 30 lines:",
        ]
    )
    assert protocol.announced_logs(text) == ["/c/logs/train/e-local-12.out", "/c/logs/train/e-9.out"]


def test_free_port_can_be_bound():
    import socket

    port = protocol.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_strategy_table_names_the_strategies_and_their_classes():
    assert STRATEGIES == tuple(STRATEGY_TABLE)
    for name, row in STRATEGY_TABLE.items():
        assert row.name == name and row.load().name == name
        assert row.local in ("plain", "torchrun", "horovodrun") and row.srun in ("plain", "torchrun", "hvd_slurm")
    with pytest.raises(ConfigError, match="unknown strategy 'mpi'"):
        strategy_row("mpi")
    from virgo_exps.train.strategies import get_strategy

    with pytest.raises(ValueError, match="unknown strategy 'mpi'"):
        get_strategy("mpi")


@pytest.mark.parametrize("name", sorted(STRATEGY_TABLE))
def test_each_row_starts_what_it_says(name, tmp_path):
    row = STRATEGY_TABLE[name]
    python = str(tmp_path / "bin" / "python")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "horovodrun").touch()  # Horovod "built" beside this interpreter
    cfg = TrainConfig(strategy=name, procs_per_node=2)
    try:
        cmd = local_command(cfg, ["stages/train.py"], python=python)
    except ConfigError as exc:  # only a missing Horovod package may stop it
        assert row.needs_horovod and str(exc) == HOROVOD_MISSING
        return
    starts = {"plain": [python, "stages/train.py"], "torchrun": [python, "-m", "torch.distributed.run"]}
    starts["horovodrun"] = [str(tmp_path / "bin" / "horovodrun"), "--gloo", "-np", "2"]
    assert cmd[: len(starts[row.local])] == starts[row.local]
    spec = JobSpec.training("train", ["stages/train.py"], TrainConfig(strategy=name, procs_per_node=2))
    from virgo_exps.launch.slurm.script import srun_command, tasks_per_node

    step = srun_command(spec, load_machine("slurm"))
    marker = {
        "plain": "--ntasks=1",
        "torchrun": "-m torch.distributed.run",
        "hvd_slurm": "-m virgo_exps.launch.hvd_slurm",
    }
    assert marker[row.srun] in step
    assert tasks_per_node(spec) == (2 if row.task_per_process else 1)


def test_horovod_counts_as_built_only_with_horovodrun_beside_the_interpreter(tmp_path):
    row = strategy_row("horovod")
    with pytest.raises(ConfigError) as err:
        check_software(row, str(tmp_path / "python"))
    assert str(err.value) == HOROVOD_MISSING
    check_software(strategy_row("ddp"), str(tmp_path / "python"))  # nothing to build
    if (Path(sys.executable).parent / "horovodrun").exists():
        check_software(row, sys.executable)
