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
