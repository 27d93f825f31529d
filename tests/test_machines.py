"""machine.yaml: every profile of the project loads; a bad key or value is one line naming the file and the key."""

from __future__ import annotations

import pytest

from conftest import ROOT
from virgo_exps.config import ConfigError
from virgo_exps.machines import Machine, available, load_machine


def test_every_profile_of_the_project_loads(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    names = available()
    assert {"local", "slurm", "simcluster", "juwels-booster"} <= set(names)
    for name in names:
        machine = load_machine(name)
        assert isinstance(machine, Machine) and machine.name == name and machine.kind in ("local", "slurm")
    booster = load_machine("juwels-booster")
    assert booster.gpus_per_node == 4 and booster.gpu_option == "gres" and booster.env["NCCL_IB_TIMEOUT"] == "50"
    assert load_machine("local").env == {} and load_machine("slurm").sbatch_extra == ()


# (machine.yaml text, words the message must contain)
BAD = {
    "typo": ("kind: slurm\npartiton: gpu\n", ["partiton: unknown key", "partition"]),
    "no-kind": ("description: x\n", ["kind: missing", "local, slurm"]),
    "kind": ("kind: pbs\n", ["kind: 'pbs'; expected one of local, slurm"]),
    "launcher": ("kind: local\ndeepspeed_launcher: mpirun\n", ["deepspeed_launcher: 'mpirun'", "torchrun, deepspeed"]),
    "signal": ("kind: slurm\nsignal_seconds: -1\n", ["signal_seconds: -1; expected a whole number >= 0"]),
    "bool": ("kind: slurm\ngpus_per_node: true\n", ["gpus_per_node: expected an integer", "boolean"]),
    "env": ("kind: slurm\nenv: [A, B]\n", ["env: expected a mapping"]),
    "extra": ("kind: slurm\nsbatch_extra: --qos=x\n", ["sbatch_extra: expected a list of strings"]),
    "time": ("kind: slurm\ntime: 1:30:00\n", ["time: expected a string", "5400", "quote it"]),
    "mapping": ("- kind: slurm\n", ["expected a mapping of keys"]),
    "setup": ("kind: slurm\nsetup: missing.sh\n", ["setup: missing.sh does not exist"]),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_profile_is_refused_in_one_line(tmp_path, monkeypatch, name):
    text, words = BAD[name]
    folder = tmp_path / "machines" / name
    folder.mkdir(parents=True)
    (folder / "machine.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    with pytest.raises(ConfigError) as err:
        load_machine(name)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"machines/{name}/machine.yaml: "), message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_values_are_converted_as_the_launcher_uses_them(tmp_path, monkeypatch):
    folder = tmp_path / "machines" / "site"
    folder.mkdir(parents=True)
    (folder / "env.sh").write_text("true\n")
    (folder / "machine.yaml").write_text(
        "kind: slurm\nsetup: env.sh\nsbatch_extra: [--qos=normal]\nenv: {NCCL_IB_TIMEOUT: 50}\npartition: null\n"
    )
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    site = load_machine("site")
    assert site.sbatch_extra == ("--qos=normal",) and site.env == {"NCCL_IB_TIMEOUT": "50"}
    assert site.partition is None and site.setup_script == folder / "env.sh" and site.time == "01:00:00"


def _site(tmp_path, monkeypatch, text: str):
    """A checkout in ``tmp_path`` whose profile ``site`` is ``text``; its machine.yaml."""
    folder = tmp_path / "machines" / "site"
    folder.mkdir(parents=True)
    (folder / "machine.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return folder / "machine.yaml"


def test_a_profile_is_read_once_per_process_and_again_when_it_changes(tmp_path, monkeypatch):
    spec_file = _site(tmp_path, monkeypatch, "kind: slurm\npartition: a\n")
    first = load_machine("site")
    assert load_machine("site") is first  # every caller of this process gets the one profile
    spec_file.write_text("kind: slurm\npartition: bb\n")
    assert load_machine("site").partition == "bb"


def test_the_earlier_name_of_data_tasks_is_named_in_its_refusal(tmp_path, monkeypatch):
    _site(tmp_path, monkeypatch, "kind: slurm\ngenerate_tasks: 2\n")
    with pytest.raises(ConfigError, match="generate_tasks: now named data_tasks"):
        load_machine("site")
