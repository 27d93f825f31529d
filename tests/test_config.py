"""params.yaml validation: every kind of bad value fails with a one-line message naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import ROOT
from virgo_exps.config import ConfigError, as_flat_dict, describe, load_params, params_from_dict

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(section, key, value):
    raw = copy.deepcopy(DEFAULTS)
    if key is None:
        raw[section] = value
    else:
        raw[section][key] = value
    return raw


# (section, key, value, words the message must contain)
BAD = [
    ("train", "strategy", "mpi", ["train.strategy", "'ddp'"]),  # not a choice
    ("train", "lr", "1e-3", ["train.lr", "expected a number", "str"]),  # string, not number
    ("train", "epochs", 0, ["train.epochs", "> 0"]),  # impossible value
    ("train", "epochs", 2.5, ["train.epochs", "expected an integer"]),  # float for int
    ("train", "nodes", True, ["train.nodes", "boolean"]),  # bool for int
    ("train", "learning_rate", 0.1, ["train.learning_rate", "unknown key"]),  # typo'd key
    (
        "train",
        None,
        {**DEFAULTS["train"], "strategy": "ddp", "procs_per_node": 2, "global_batch_size": 33},
        ["train.global_batch_size", "divisible"],
    ),  # cross-field
    ("generate", "n_samples", -5, ["generate.n_samples", "> 0"]),  # negative
    ("generate", "sample_rate", 20, ["generate.sample_rate", "64"]),  # out of range
    ("preprocess", "fmax", 300.0, ["preprocess.fmax", "Nyquist"]),  # physics
    ("preprocess", "val_fraction", 1.5, ["preprocess.val_fraction", "between 0 and 1"]),
    ("preprocess", "whiten", "yes", ["preprocess.whiten", "true or false"]),
    ("preprocess", None, [1, 2], ["preprocess", "mapping"]),  # section not a mapping
    ("trian", None, {"lr": 1}, ["trian", "unknown section"]),  # typo'd section
]


@pytest.mark.parametrize("section,key,value,words", BAD, ids=[f"{b[0]}.{b[1]}={b[2]!r}" for b in BAD])
def test_bad_params_are_rejected_with_a_clear_message(section, key, value, words):
    raw = copy.deepcopy(DEFAULTS)
    if section not in raw:
        raw[section] = value
    else:
        raw = with_change(section, key, value)
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_single_strategy_with_several_processes_is_refused():
    raw = with_change("train", "procs_per_node", 2)
    with pytest.raises(ConfigError, match="train.strategy: 'single' runs one process"):
        params_from_dict(raw)


def test_defaults_are_valid_and_int_widens_to_float():
    params = params_from_dict(with_change("train", "lr", 1))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert load_params(ROOT / "params.yaml").train.strategy in {"single", "ddp", "deepspeed", "horovod"}


def test_flat_dict_and_description_cover_every_key():
    flat = as_flat_dict(params_from_dict(DEFAULTS))
    text = describe()
    for key in flat:
        assert f"  {key.split('.', 1)[1]}:" in text
    assert flat["train.global_batch_size"] == DEFAULTS["train"]["global_batch_size"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_params(bad)


def test_paper_preset_merges_into_params_keeping_comments(tmp_path):
    from virgo_exps.cli.main import apply_preset

    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    apply_preset(str(ROOT / "presets" / "paper.yaml"), str(target))
    merged = load_params(target)
    assert merged.generate.n_samples == 750_000 and merged.train.nodes == 4
    assert target.read_text().startswith("# Parameters of the study")


def test_a_preset_with_a_bad_value_writes_nothing(tmp_path):
    from virgo_exps.cli.main import apply_preset

    target = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    target.write_text(original)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: -1\n")
    with pytest.raises(ConfigError, match="train.epochs"):
        apply_preset(str(bad), str(target))
    assert target.read_text() == original


def test_dataclass_defaults_are_the_committed_params():
    """One source of truth: a key left out of params.yaml takes the value params.yaml commits."""
    from virgo_exps.config import Params

    committed = as_flat_dict(load_params(ROOT / "params.yaml"))
    assert as_flat_dict(Params()) == committed
    # and the committed file lists every key, so the file alone shows what a run uses
    listed = {f"{section}.{key}" for section, values in DEFAULTS.items() for key in values}
    assert listed == set(committed)


def test_virgo_exps_params_shows_the_committed_defaults():
    import subprocess

    from conftest import BIN, tool_env

    text = subprocess.run(
        [str(BIN / "virgo-exps"), "params"], cwd=ROOT, env=tool_env(), capture_output=True, text=True, check=True
    ).stdout
    section = None
    shown = {}
    for line in text.splitlines():
        if not line.startswith(" "):
            section = line.split(":")[0]
        else:
            key, rest = line.strip().split(": ", 1)
            shown[f"{section}.{key}"] = yaml.safe_load(rest.split("  #")[0])
    assert shown == as_flat_dict(load_params(ROOT / "params.yaml"))


def test_config_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys, virgo_exps.config as c, virgo_exps.machines, virgo_exps.provenance; "
        f"c.load_params({str(ROOT / 'params.yaml')!r}); "
        "bad = [m for m in ('torch', 'numpy', 'zarr') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_study_without_the_virgo_sections():
    """generate and preprocess are the Virgo study's: a params file without them validates train and report only."""
    params = params_from_dict({"train": {"model": "tiny", "global_batch_size": 600}, "report": {"title": "t"}})
    assert params.generate is None and params.preprocess is None
    assert params.train.model == "tiny" and params.train.epochs == DEFAULTS["train"]["epochs"]
    assert not any(k.startswith(("generate.", "preprocess.")) for k in as_flat_dict(params))
    # the machinery's rules still hold
    with pytest.raises(ConfigError, match="train.strategy: 'single' runs one process"):
        params_from_dict({"train": {"procs_per_node": 2}})
    # the Virgo study's rules hold where its sections are
    with pytest.raises(ConfigError, match=r"^train.model: 'tiny' is not allowed; expected one of 'decoder', 'unet'$"):
        params_from_dict(with_change("train", "model", "tiny"))
    with pytest.raises(ConfigError, match="larger than the training split"):
        params_from_dict(with_change("train", "global_batch_size", 600))


def test_the_validator_is_generic():
    """The same function checks a study's own file: types, allowed values, unknown and missing keys."""
    from dataclasses import dataclass

    from virgo_exps.config import REQUIRED, spec, validate

    @dataclass(frozen=True)
    class Data:
        n: int = spec(REQUIRED, lambda v: v > 0, "an integer > 0", "samples")
        noise: float = spec(0.1, lambda v: v >= 0, "a number >= 0", "noise level")

    assert validate(Data, {"n": 4, "noise": 1}, "data") == {"n": 4, "noise": 1.0}
    for raw, words in (
        ({}, "data.n: missing; expected an integer > 0"),
        ({"n": 0}, "data.n: 0 is not allowed; expected an integer > 0"),
        ({"n": "4"}, "data.n: expected an integer, got '4' (str)"),
        ({"n": 4, "nosie": 0}, "data.nosie: unknown key; allowed keys in 'data' are: n, noise"),
    ):
        with pytest.raises(ConfigError) as err:
            validate(Data, raw, "data")
        assert str(err.value) == words


def test_the_zero_stage_and_the_backend_are_params_refused_before_any_work(tmp_path):
    """The ZeRO stage and the collective backend change a result, so they are params (recorded in every
    output's stamp and in MLflow with the other train.* keys), not environment variables; `virgo-exps
    check` (the first stage's checks) refuses what cannot run, with one line."""
    import subprocess

    from virgo_exps import provenance

    used = provenance.used_params(ROOT / "params.yaml")
    stamped = provenance.select(used, "train", ROOT / "dvc.yaml")
    assert stamped["train.zero_stage"] == 0 and stamped["train.dist_backend"] == "auto"
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in (1, 2, 3):  # every stage with DeepSpeed (3 gathers the split weights for snapshots and model.pt)
        accepted = copy.deepcopy(base)
        accepted["train"].update(zero_stage=stage, strategy="deepspeed", procs_per_node=2)
        assert params_from_dict(accepted).train.zero_stage == stage
    cases = [
        ({"zero_stage": 2}, "train.zero_stage: 2 is a stage of DeepSpeed's ZeRO, but train.strategy is 'single'"),
        ({"zero_stage": 4}, "train.zero_stage: 4 is not allowed"),
        (
            {"zero_stage": 3, "strategy": "ddp", "procs_per_node": 2},
            "train.zero_stage: 3 is a stage of DeepSpeed's ZeRO, but train.strategy is 'ddp'",
        ),
        ({"dist_backend": "mpi"}, "train.dist_backend: 'mpi' is not allowed; expected one of 'auto', 'nccl', 'gloo'"),
    ]
    import torch

    if not torch.cuda.is_available():
        nccl = {"dist_backend": "nccl", "strategy": "ddp", "procs_per_node": 2}
        cases.append((nccl, "train.dist_backend: 'nccl' needs GPUs, but machine 'local' has none"))
    for change, words in cases:
        params = copy.deepcopy(base)
        params["train"].update(change)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        proc = subprocess.run(
            ["virgo-exps", "check", "--params", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and words in proc.stderr, (change, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) <= 2, proc.stderr  # the line, and how to restore params


def test_no_environment_variable_sets_the_zero_stage_or_the_backend():
    for path in (ROOT / "src").rglob("*.py"):
        text = path.read_text()
        assert "VIRGO_ZERO_STAGE" not in text and "VIRGO_DIST_BACKEND" not in text, path
