"""The cross-experiment scalability report.

Hand-built metric sets with known answers (speedup, efficiency, spread,
energy, notes), the rendered files (PNG, HTML, CSV, JSON), and one end-to-end
run over experiments made by the real pipeline (`dvc exp run`, marked slow).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, make_repo, sh, tool_env
from virgo_exps.cli import scalability as scalability_cli
from virgo_exps.scalability.groups import assign, dedupe
from virgo_exps.scalability.output import console_text, write_report
from virgo_exps.scalability.report import summarize
from virgo_exps.scalability.runs import Run
from virgo_exps.scalability.sources import load_files, parse_exp_show

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(
    root: Path,
    name: str,
    strategy: str,
    procs: int,
    epoch_times: list[float],
    nodes: int = 1,
    samples: int = 1000,
    computation: float | None = 0.7,
    energy_wh: float | None = None,
    util: float | None = None,
    seed: int = 0,
    extra_params: dict | None = None,
    machine: str | None = None,
    val_loss: float = 0.6,
    load: list[float] | None = None,
    version: str | None = None,
) -> Path:
    """A run folder like the train stage writes it: metrics.json (+ epochs.csv, params.yaml).

    ``epoch_times`` includes the first (warm-up) epoch, which the metrics leave out; ``load`` is the
    load_avg column of epochs.csv (one value per epoch); ``version`` the content of a version.lock.
    """
    d = root / name
    d.mkdir(parents=True)
    timed = epoch_times[1:]
    metrics = {
        "strategy": strategy,
        "nodes": nodes,
        "procs_per_node": procs,
        "world_size": nodes * procs,
        "epochs": len(epoch_times),
        "parameters": 1000,
        "train_loss": 0.5,
        "val_loss": val_loss,
        "epoch_time_s_median": float(np.median(timed)),
        "epoch_time_s_mean": float(np.mean(timed)),
        "samples_per_s": float(np.median([samples / t for t in timed])),
        "timed_epochs": len(timed),
        "computation_fraction": computation,
        "gpu_energy_wh": energy_wh,
        "gpu_utilization_pct": util,
    }
    if machine is not None:
        metrics.update(machine=machine, device="cpu")
    if energy_wh is not None:
        metrics["gpu_energy_wh_per_sample"] = energy_wh / (samples * len(epoch_times))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with open(d / "epochs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["epoch", "step", "train_loss", "val_loss", "train_time_s", "val_time_s", "samples_per_s", "lr"]
            + (["load_avg"] if load else [])
        )
        for i, t in enumerate(epoch_times, 1):
            w.writerow([i, i * 10, 0.5, 0.6, t, 0.1, samples / t, 0.001] + ([load[i - 1]] if load else []))
    if version is not None:
        (d / "version.lock").write_text(version)
    params = {
        "train": {
            "strategy": strategy,
            "nodes": nodes,
            "procs_per_node": procs,
            "seed": seed,
            "model": "decoder",
            **(extra_params or {}),
        }
    }
    (d / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    return d


def group(report, series: str, world: int) -> dict:
    g = report.groups
    rows = g[(g["series"] == series) & (g["world_size"] == world)]
    assert len(rows) == 1, g[["series", "world_size"]]
    return rows.iloc[0].to_dict()


@pytest.fixture
def ddp_sweep(tmp_path) -> Path:
    """ddp at 1, 2 and 4 processes (three repeats at 1), horovod at 2 and 4, on 'GPUs'."""
    root = tmp_path / "runs"
    write_run(root, "ddp1-a", "ddp", 1, [12.0, 7.0, 7.2, 6.8], energy_wh=2.0, util=90.0, seed=0)
    write_run(root, "ddp1-b", "ddp", 1, [12.0, 8.0, 8.0, 8.0], energy_wh=3.0, util=92.0, seed=1)
    write_run(root, "ddp1-c", "ddp", 1, [12.0, 10.0, 10.0, 10.0], energy_wh=4.0, util=94.0, seed=2)
    write_run(root, "ddp2", "ddp", 2, [6.0, 4.1, 4.0, 3.9], energy_wh=2.2, util=80.0)
    write_run(root, "ddp4", "ddp", 4, [5.0, 2.5, 2.5, 2.5], energy_wh=2.6, util=70.0, computation=0.5)
    write_run(root, "hvd2", "horovod", 2, [9.0, 5.0, 5.0, 5.0], energy_wh=2.0, util=85.0)
    write_run(root, "hvd4", "horovod", 4, [9.0, 2.5, 2.5, 2.5], energy_wh=2.1, util=75.0)
    return root


# -- numbers -------------------------------------------------------------------


def test_speedup_efficiency_and_spread_with_known_answers(ddp_sweep):
    runs, notes = load_files([ddp_sweep])
    assert len(runs) == 7 and notes == []
    report = summarize(runs)
    base = group(report, "ddp", 1)
    # Three repeats (medians 7, 8, 10): median 8, spread over runs.
    assert base["n_runs"] == 3 and base["spread_over"] == "3 runs"
    assert (base["epoch_time_s"], base["epoch_time_s_min"], base["epoch_time_s_max"]) == (8.0, 7.0, 10.0)
    assert base["epoch_time_s_q25"] == pytest.approx(7.5) and base["epoch_time_s_q75"] == pytest.approx(9.0)
    assert base["speedup"] == 1.0 and base["efficiency"] == 1.0
    two = group(report, "ddp", 2)
    # One run: spread over its timed epochs (warm-up epoch of 6 s excluded).
    assert two["spread_over"] == "3 epochs (1 run)"
    assert (two["epoch_time_s"], two["epoch_time_s_min"], two["epoch_time_s_max"]) == (4.0, 3.9, 4.1)
    assert two["speedup"] == pytest.approx(2.0) and two["efficiency"] == pytest.approx(1.0)
    assert two["speedup_lo"] == pytest.approx(7.0 / 4.1) and two["speedup_hi"] == pytest.approx(10.0 / 3.9)
    four = group(report, "ddp", 4)
    assert four["speedup"] == pytest.approx(3.2) and four["efficiency"] == pytest.approx(0.8)
    assert four["ideal_speedup"] == 4.0 and four["computation_fraction"] == 0.5
    # Throughput: median over timed epochs of samples / time.
    assert four["samples_per_s"] == pytest.approx(1000 / 2.5)
    assert base["samples_per_s"] == pytest.approx(1000 / 8.0)
    # Each strategy against its OWN smallest world size, named in the table.
    hvd2, hvd4 = group(report, "horovod", 2), group(report, "horovod", 4)
    assert hvd2["baseline"] == "horovod @ 2 (1x2)" and hvd2["speedup"] == 1.0
    assert hvd4["speedup"] == pytest.approx(2.0) and hvd4["efficiency"] == pytest.approx(1.0)
    assert four["baseline"] == "ddp @ 1 (1x1)"
    assert all(v is None for v in report.groups["speedup_vs_single"])  # no 'single' run in this set


def test_gpu_energy_sums_and_per_sample(ddp_sweep):
    report = summarize(load_files([ddp_sweep])[0])
    base = group(report, "ddp", 1)
    assert base["gpu_energy_wh"] == 3.0  # median of 2, 3, 4 Wh per run
    assert base["gpu_energy_wh_total"] == pytest.approx(9.0)  # all runs of the configuration
    assert (base["gpu_energy_wh_min"], base["gpu_energy_wh_max"]) == (2.0, 4.0)
    assert base["gpu_energy_wh_per_sample"] == pytest.approx(3.0 / 4000)
    assert base["gpu_utilization_pct"] == 92.0
    assert not any("GPU" in n for n in report.notes)


def test_cpu_runs_note_missing_gpu_and_single_world_size(tmp_path):
    write_run(tmp_path, "a", "single", 1, [3.0, 1.0, 1.2])
    write_run(tmp_path, "b", "single", 1, [3.0, 1.1, 1.1], seed=1)
    report = summarize(load_files([tmp_path])[0])
    text = " ".join(report.notes)
    assert "GPU utilisation and energy: not measured in any experiment" in text
    assert "'single' ran at one world size only (1)" in text
    only = group(report, "single", 1)
    assert only["n_runs"] == 2 and only["epoch_time_s"] == pytest.approx(1.1)
    assert only["speedup_vs_single"] == 1.0
    out = write_report(report, tmp_path / "report")
    names = {p.name for p in out.iterdir()}
    assert {"epoch_time.png", "throughput.png", "computation.png", "index.html"} <= names
    assert not names & {"speedup.png", "efficiency.png", "gpu_energy.png", "gpu_utilization.png"}
    page = (out / "index.html").read_text()
    assert "every group ran at a single world size, so there is no speedup to show" in page
    assert "no experiment measured GPU energy" in page
    skipped = json.loads((out / "scalability.json").read_text())["skipped_plots"]
    assert set(skipped) == {"Speedup", "Parallel efficiency", "GPU energy", "GPU utilisation"}
    assert (out / "val_loss.png").is_file()


def test_partial_gpu_data_and_missing_profiler(tmp_path):
    write_run(tmp_path, "gpu", "ddp", 1, [3.0, 2.0, 2.0], energy_wh=1.0, util=50.0, computation=None)
    write_run(tmp_path, "cpu", "ddp", 2, [3.0, 1.0, 1.0], computation=None)
    report = summarize(load_files([tmp_path])[0])
    assert "GPU utilisation and energy: not measured for ddp @ 2" in report.notes
    assert any(n.startswith("computation fraction: not measured") for n in report.notes)
    out = write_report(report, tmp_path / "report")
    assert (out / "gpu_energy.png").is_file() and not (out / "computation.png").exists()


def test_one_timed_epoch_has_no_spread_and_says_so(tmp_path):
    write_run(tmp_path, "x", "ddp", 1, [3.0, 2.0])
    write_run(tmp_path, "y", "ddp", 2, [3.0, 1.0])
    report = summarize(load_files([tmp_path])[0])
    row = group(report, "ddp", 2)
    assert row["spread_over"] == "none" and row["epoch_time_s_min"] == row["epoch_time_s_max"] == 1.0
    assert row["speedup"] == row["speedup_lo"] == row["speedup_hi"] == 2.0
    assert any(n.startswith("no spread for ddp @ 1, ddp @ 2") for n in report.notes)


def test_different_params_are_separate_groups_labelled_by_what_differs(tmp_path):
    write_run(tmp_path, "d1", "ddp", 1, [3.0, 2.0, 2.0])
    write_run(tmp_path, "d2", "ddp", 2, [3.0, 1.0, 1.0])
    write_run(tmp_path, "u1", "ddp", 1, [9.0, 8.0, 8.0], extra_params={"model": "unet"})
    write_run(tmp_path, "u2", "ddp", 2, [9.0, 5.0, 5.0], extra_params={"model": "unet"})
    runs = load_files([tmp_path])[0]
    report = summarize(runs)
    assert report.split_on == {"train.model": ["decoder", "unet"]}
    assert report.notes[0].startswith(
        "not all experiments are comparable: split into separate groups on train.model (decoder, unet)"
    )
    assert group(report, "ddp, model=unet", 2)["speedup"] == pytest.approx(1.6)
    assert group(report, "ddp, model=decoder", 2)["speedup"] == pytest.approx(2.0)
    assert group(report, "ddp, model=decoder", 1)["n_runs"] == 1
    # --by only names a key in every label; the groups are the same.
    named = summarize(runs, by=["train.model", "train.seed"])
    assert set(named.groups["series"]) == {"ddp, model=decoder, seed=0", "ddp, model=unet, seed=0"}


def test_two_layouts_of_one_world_size_are_separate_groups(tmp_path):
    write_run(tmp_path, "a", "ddp", 2, [3.0, 4.0, 4.0])
    write_run(tmp_path, "b", "ddp", 4, [3.0, 1.2, 1.2])
    write_run(tmp_path, "c", "ddp", 2, [3.0, 1.5, 1.5], nodes=2)
    report = summarize(load_files([tmp_path])[0])
    fours = report.groups[report.groups["world_size"] == 4]
    assert sorted(zip(fours["nodes"], fours["procs_per_node"])) == [(1, 4), (2, 2)]
    assert set(fours["baseline"]) == {"ddp @ 2 (1x2)"}
    write_report(report, tmp_path / "report")  # the plots cope with two points at one world size


# -- what is pooled, what is counted once, what is flagged ------------------------------


def _run(
    name,
    strategy="ddp",
    procs=1,
    time=2.0,
    seed=0,
    lr=0.001,
    batch=8,
    machine="local",
    rev=None,
    software="v1",
    data="d1",
    metrics=None,
) -> Run:
    m = {
        "strategy": strategy,
        "nodes": 1,
        "procs_per_node": procs,
        "world_size": procs,
        "epoch_time_s_median": time,
        "machine": machine,
        "device": "cpu",
        "provenance": {"data": data},
        **(metrics or {}),
    }
    params = {
        "train.strategy": strategy,
        "train.nodes": 1,
        "train.procs_per_node": procs,
        "train.seed": seed,
        "train.lr": lr,
        "train.global_batch_size": batch,
        "train.max_requeues": 3,
        "generate.workers": 2,
    }
    return Run(
        name,
        "experiment",
        m,
        params,
        rev=rev or hashlib.sha1(name.encode()).hexdigest(),
        deps={"version.lock": software},
    )


def test_pooled_only_when_all_but_seed_and_axis_are_equal():
    runs = [
        _run("a"),
        _run("b", seed=1),
        _run("c", procs=2),
        _run("d", lr=0.0003),
        _run("e", machine="cluster", procs=2),
        _run("f", software="v2"),
        _run("g", data="d2"),
    ]
    g = assign(runs)
    assert g.of(runs[0]) == g.of(runs[1]) == g.of(runs[2])  # seed and processes: one group
    assert len({g.of(r) for r in runs}) == 5
    assert list(g.split_on) == ["train.lr", "machine", "software", "data"]
    assert g.label[g.of(runs[3])] == "ddp, lr=0.0003, machine=local, software=v1, data=d1"
    assert g.label[g.of(runs[4])] == "ddp, lr=0.001, machine=cluster, software=v1, data=d1"
    assert g.scaling[g.of(runs[0])] == "strong (fixed global batch 8)"
    # Operational settings (requeues, loader workers when the data hash is known) do not split.
    other = _run("h", seed=2)
    other.params.update({"train.max_requeues": 0, "generate.workers": 0})
    assert assign([runs[0], other]).split_on == {}


def test_runs_that_differ_in_a_training_option_are_never_pooled():
    """Precision, accumulation, clipping, compile, the schedule and the ZeRO stage change what a step costs:
    each value is its own group, named by the option."""
    options = {
        "train.precision": "bf16",
        "train.grad_accum_steps": 2,
        "train.grad_clip": 1.0,
        "train.compile": True,
        "train.lr_schedule": "cosine",
        "train.zero_stage": 1,
    }
    for key, value in options.items():
        plain, changed = _run("plain"), _run("changed", seed=1)
        default = {"train.precision": "fp32", "train.grad_accum_steps": 1, "train.grad_clip": 0.0}
        default.update({"train.compile": False, "train.lr_schedule": "constant", "train.zero_stage": 0})
        plain.params.update(default)
        changed.params.update({**default, key: value})
        g = assign([plain, changed])
        assert g.of(plain) != g.of(changed) and list(g.split_on) == [key], key


def test_weak_scaling_is_recognised_and_named():
    weak = [_run("w1", procs=1, batch=8), _run("w2", procs=2, batch=16), _run("w4", procs=4, batch=32)]
    g = assign(weak)
    assert len({g.of(r) for r in weak}) == 1 and g.split_on == {}
    assert g.scaling[g.of(weak[0])] == "weak (global batch grows: 8 per process)"
    # Batches that are neither fixed nor proportional: separate strong groups, split on the batch.
    mixed = [_run("m1", procs=1, batch=8), _run("m2", procs=2, batch=8), _run("m3", procs=2, batch=32)]
    g = assign(mixed)
    assert g.of(mixed[0]) == g.of(mixed[1]) != g.of(mixed[2])
    assert g.split_on == {"train.global_batch_size": ["8", "32"]}


def test_same_result_counted_once():
    a = _run("exp-a", metrics={"val_loss": 0.4})
    noop = _run("exp-noop", metrics={"val_loss": 0.4})  # re-run that trained nothing: other commit, same result
    same_rev = _run("main", rev=a.rev, metrics={"val_loss": 0.4, "note": "baseline"})
    other_seed = _run("exp-s1", seed=1, metrics={"val_loss": 0.4})  # same numbers by chance, other params
    other_model = _run("exp-m", metrics={"val_loss": 0.4})
    other_model.outs = {"results/model.pt": "x"}
    kept, dropped = dedupe([a, noop, same_rev, other_seed, other_model])
    assert [r.name for r in kept] == ["exp-a", "exp-s1", "exp-m"]
    assert dropped == {"exp-noop": "exp-a", "main": "exp-a"}
    report = summarize([a, noop, same_rev, other_seed])
    assert group(report, "ddp", 1)["n_runs"] == 2
    assert any(n.startswith("2 duplicate result(s) counted once") and "exp-noop = exp-a" in n for n in report.notes)


def test_baseline_never_borrowed_from_another_machine(tmp_path):
    """The case of a 2-node run on a cluster measured against a local 1-process run (efficiency 420%)."""
    write_run(tmp_path, "local1", "ddp", 1, [9.0, 8.4, 8.4], machine="local")
    write_run(tmp_path, "local2", "ddp", 2, [6.0, 4.4, 4.4], machine="local")
    write_run(tmp_path, "cluster2", "ddp", 1, [2.0, 1.0, 1.0], nodes=2, machine="simcluster")
    write_run(tmp_path, "single", "single", 1, [9.0, 8.0, 8.0], machine="local")
    report = summarize(load_files([tmp_path])[0])
    assert report.split_on == {"machine": ["local", "simcluster"]}
    cluster = group(report, "ddp, machine=simcluster", 2)
    assert cluster["baseline"] == "ddp, machine=simcluster @ 2 (2x1)" and cluster["speedup"] == 1.0
    assert np.isnan(cluster["speedup_vs_single"]) and cluster["flags"] == ""
    assert any(n.startswith("'ddp, machine=simcluster' has no 1-process run of its own") for n in report.notes)
    local = group(report, "ddp, machine=local", 2)
    assert local["baseline"] == "ddp, machine=local @ 1 (1x1)"
    assert local["speedup"] == pytest.approx(8.4 / 4.4)
    assert local["speedup_vs_single"] == pytest.approx(8.0 / 4.4)
    assert report.provenance["machines"] == ["local", "simcluster"]


def test_what_differs_only_with_the_strategy_is_a_column_not_in_labels(tmp_path):
    """A committed 1-process reference made on the local machine beside a cluster sweep of ddp: the machine
    separates them but never two groups of one strategy, so labels stay the strategies."""
    write_run(tmp_path, "reference", "single", 1, [9.0, 8.0, 8.0], machine="local")
    write_run(tmp_path, "d1", "ddp", 1, [9.0, 8.4, 8.4], machine="simcluster")
    write_run(tmp_path, "d2", "ddp", 1, [6.0, 4.4, 4.4], nodes=2, machine="simcluster")
    report = summarize(load_files([tmp_path])[0])
    assert report.split_on == {"machine": ["local", "simcluster"]}
    assert set(report.groups["series"]) == {"single", "ddp"}
    assert group(report, "ddp", 2)["baseline"] == "ddp @ 1 (1x1)"
    assert np.isnan(group(report, "ddp", 1)["speedup_vs_single"])  # other machine: no common footing
    assert list(group(report, "single", 1)["differs"].split(", ")) == ["machine=local"]
    text = console_text(report)
    assert "also differs" in text and "machine=simcluster" in text
    assert "Split on: machine (local, simcluster)" in text


def test_suspicious_figures_are_flagged_in_table_json_html_and_pngs(tmp_path, monkeypatch):
    from virgo_exps.scalability import plots as scalability_plots

    write_run(tmp_path / "runs", "d1", "ddp", 1, [9.0, 8.4, 8.4], machine="local")
    write_run(tmp_path / "runs", "d2", "ddp", 2, [3.0, 2.0, 2.0], machine="local")  # 4.2x on 2 processes
    write_run(tmp_path / "runs", "d4", "ddp", 4, [3.0, 1.6, 3.6], machine="local")  # spread 2 s, step 0.6 s
    report = summarize(load_files([tmp_path / "runs"])[0])
    two, four = group(report, "ddp", 2), group(report, "ddp", 4)
    assert two["efficiency"] == pytest.approx(2.1) and two["flags"] == "efficiency>100%; speedup>world"
    assert four["flags"] == "spread>difference"
    assert group(report, "ddp", 1)["flags"] == ""
    assert "FLAG ddp @ 2: efficiency 210% above 100%; speedup 4.2 above the world size 2" in report.notes
    flagged = {}
    real_save = scalability_plots._save

    def keep(fig, path, stamp=None, flags=None):
        flagged[Path(path).name] = (
            flags,
            [t.get_text() for t in fig.axes[0].get_legend().get_texts()] if fig.axes[0].get_legend() else [],
        )
        real_save(fig, path, stamp, flags)

    monkeypatch.setattr(scalability_plots, "_save", keep)
    out = write_report(report, tmp_path / "report", stamp="CPU test")
    assert flagged["efficiency.png"][0] == ["ddp @ 2: efficiency>100%, speedup>world"]
    assert "flagged (see table)" in flagged["efficiency.png"][1]
    assert flagged["epoch_time.png"][0] == ["ddp @ 4: spread>difference"]
    console = (out / "console.txt").read_text()
    assert "! efficiency>100%; speedup>world" in console
    page = (out / "index.html").read_text()
    assert '<tr class="flagged">' in page and "<h2>Flags</h2>" in page
    assert "ddp @ 2: efficiency 210% above 100%" in page
    doc = json.loads((out / "scalability.json").read_text())
    assert [g["flags"] for g in doc["groups"]] == ["", "efficiency>100%; speedup>world", "spread>difference"]
    # The PNG itself carries the flag line (drawn in red): compare with an unflagged rendering.
    assert _png_size(out / "efficiency.png")


def test_origin_line_on_every_figure_and_the_page(tmp_path, monkeypatch):
    from virgo_exps.scalability import plots as scalability_plots

    write_run(tmp_path / "runs", "a", "ddp", 1, [3.0, 2.0, 2.0], machine="local", computation=0.75)
    write_run(tmp_path / "runs", "b", "ddp", 2, [3.0, 1.2, 1.2], machine="local", computation=0.5, val_loss=0.7)
    report = summarize(load_files([tmp_path / "runs"])[0])
    report.provenance["commits"] = ["abcdef12"]
    stamps = {}

    def keep(fig, path, stamp=None, flags=None):
        stamps[Path(path).name] = stamp
        plt_close(fig)

    monkeypatch.setattr(scalability_plots, "_save", keep)
    out = write_report(report, tmp_path / "report", stamp="CPU, simulated cluster")
    expected = f"machine local | device cpu | commit abcdef12 | {report.provenance['date']} | CPU, simulated cluster"
    assert set(stamps) >= {"epoch_time.png", "speedup.png", "efficiency.png", "val_loss.png", "computation.png"}
    assert set(stamps.values()) == {expected}
    page = (out / "index.html").read_text()
    assert f"From: {expected}" in page
    assert "Scaling: strong (fixed global batch) in every group." in page
    # Seconds beside the percentages, and the final validation loss.
    b = group(report, "ddp", 2)
    assert b["compute_s_per_epoch"] == pytest.approx(0.6) and b["other_s_per_epoch"] == pytest.approx(0.6)
    table = (out / "console.txt").read_text()
    assert "50% (0.6 s)" in table and "25% (0.5 s)" in table and "0.7" in table
    assert group(report, "ddp", 1)["val_loss"] == 0.6


def plt_close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_epochs_under_host_load_are_left_out_of_medians(tmp_path):
    write_run(tmp_path, "quiet", "ddp", 1, [5.0, 2.0, 2.0, 2.0], load=[0.3, 0.4, 0.5, 0.4])
    write_run(tmp_path, "hogged", "ddp", 2, [5.0, 1.0, 3.5, 1.0], load=[0.3, 1.2, 2.1, 0.5], seed=1)
    write_run(tmp_path, "old", "ddp", 4, [5.0, 0.6, 0.6])  # no load column: taken as it is
    write_run(tmp_path, "busy", "ddp", 8, [5.0, 0.5, 0.3], load=[3.0, 3.0, 3.0])  # nothing left: kept, said
    runs = {r.name: r for r in load_files([tmp_path])[0]}
    assert runs["hogged"].contaminated == [1] and runs["hogged"].epoch_time == 1.0
    assert runs["quiet"].contaminated == [] and runs["old"].epoch_load is None
    report = summarize(list(runs.values()))
    two = group(report, "ddp", 2)
    assert two["epoch_time_s"] == 1.0 and two["excluded_epochs"] == 1 and two["spread_over"] == "2 epochs (1 run)"
    assert any(
        n.startswith("hogged: epoch(s) 3 ran while other work competed for the run's CPUs (load per core above 1.25)")
        for n in report.notes
    )
    assert not any("host load per epoch not recorded" in n for n in report.notes)
    busy = group(report, "ddp", 8)
    assert busy["epoch_time_s"] == pytest.approx(0.4) and busy["spread_over"] == "2 epochs (1 run)"
    assert busy["excluded_epochs"] == 0
    assert any(
        n.startswith("every timed epoch of busy ran while other work competed for the CPUs (load per core above 1.25)")
        for n in report.notes
    )


# -- dvc exp show parsing ---------------------------------------------------------


def _rev(name, metrics, params=None, state=None):
    data = {
        "metrics": {"results/metrics.json": {"data": metrics}},
        "params": {"params.yaml": {"data": params or {"train": {"seed": 0}}}},
    }
    rev = hashlib.sha1(name.encode()).hexdigest()  # every experiment is its own commit
    return {
        "revs": [{"rev": rev, "name": name, "data": data, "error": None, "experiments": None}],
        "executor": {"state": state} if state else None,
        "name": name,
    }


def test_exp_show_counts_the_applied_workspace_once_and_notes_unfinished():
    m1 = {"strategy": "single", "nodes": 1, "procs_per_node": 1, "world_size": 1, "epoch_time_s_median": 2.0}
    m2 = {**m1, "strategy": "ddp", "procs_per_node": 2, "world_size": 2, "epoch_time_s_median": 1.0}
    missing = {"results/metrics.json": {"error": {"type": "FileNotFoundError", "msg": "no file"}}}
    shown = [
        {
            "rev": "workspace",
            "name": None,
            "data": {"metrics": {"results/metrics.json": {"data": m2}}, "params": {}},
            "error": None,
            "experiments": None,
        },
        {
            "rev": "a" * 40,
            "name": "main",
            "data": {"metrics": missing, "params": {}},
            "error": None,
            "experiments": [
                _rev("exp-one", m1),
                _rev("exp-two", m2, {"train": {"strategy": "ddp"}}),
                _rev("exp-queued", {}, state="queued"),
            ],
        },
    ]
    shown[0]["data"]["params"] = {"params.yaml": {"data": {"train": {"strategy": "ddp"}}}}
    runs, notes = parse_exp_show(shown)
    assert [r.name for r in runs] == ["exp-one", "exp-two", "workspace"]
    assert runs[1].params == {"train.strategy": "ddp"}
    assert notes == ["experiment exp-queued left out (queued)"]
    kept, dropped = dedupe(runs)
    assert [r.name for r in kept] == ["exp-one", "exp-two"] and dropped == {"workspace": "exp-two"}
    # A workspace with results of its own (edited and run with `dvc repro`) does count.
    shown[0]["data"]["metrics"]["results/metrics.json"]["data"] = {**m2, "epoch_time_s_median": 0.9}
    runs, _ = parse_exp_show(shown)
    assert [r.name for r in dedupe(runs)[0]] == ["exp-one", "exp-two", "workspace"]


# -- files -----------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=float)
        assert arr.std() > 5, f"{path.name} looks blank"
        return im.size


def test_pngs_html_csv_json_render(ddp_sweep, tmp_path):
    report = summarize(load_files([ddp_sweep])[0], sources=["hand-built"])
    out = tmp_path / "scal"
    (out).mkdir()
    (out / "stale.png").write_bytes(b"old")  # replaced as a whole, atomically
    write_report(report, out, title="Test scalability")
    assert not (out / "stale.png").exists()
    assert not list(tmp_path.glob(".scal.*")), "temporary folders left behind"
    expected = [
        "epoch_time.png",
        "speedup.png",
        "efficiency.png",
        "throughput.png",
        "computation.png",
        "gpu_energy.png",
        "gpu_utilization.png",
    ]
    for name in expected:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        w, h = _png_size(out / name)
        assert 500 <= w <= 2500 and 300 <= h <= 1500, (name, w, h)
    page = (out / "index.html").read_text()
    for name in expected:
        assert f'<img src="{name}"' in page
    for label in (
        "Test scalability",
        "Speedup",
        "Parallel efficiency",
        "Computation vs other",
        "GPU energy",
        "<b>horovod</b> &rarr; 2 (1x2)",
        "ddp1-b",
        "train.seed",
        "Parameters shared by all experiments",
    ):
        assert label in page, label
    rows = list(csv.DictReader(open(out / "scalability.csv")))
    assert len(rows) == 5 and {"speedup", "efficiency", "baseline", "epoch_time_s_min"} <= set(rows[0])
    doc = json.loads((out / "scalability.json").read_text())
    assert len(doc["groups"]) == 5 and len(doc["experiments"]) == 7
    assert "epoch_time_s" in doc["definitions"] and doc["skipped_plots"] == {}
    console = (out / "console.txt").read_text()
    assert "Speedup baselines (smallest world size within each group): ddp -> 1 (1x1); horovod -> 2 (1x2)" in console


def test_plot_axes_are_log_log_with_an_ideal_line(ddp_sweep, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from virgo_exps.scalability import plots as scalability_plots

    seen = {}

    # The stamp (where the figures come from) is drawn on every figure.
    fig = plt.figure()
    scalability_plots._save(fig, tmp_path / "stamped.png", "CPU, simulated cluster")
    assert "CPU, simulated cluster" in [t.get_text() for t in fig.texts]
    stamps = []

    def keep(fig, path, stamp=None, flagged=None):
        stamps.append(stamp)
        ax = fig.axes[0]
        seen[Path(path).name] = (
            ax.get_xscale(),
            ax.get_yscale(),
            " ".join(a.get_xlabel() for a in fig.axes),
            " ".join(a.get_ylabel() for a in fig.axes),
            [t.get_text() for t in (ax.get_legend().get_texts() if ax.get_legend() else [])],
        )
        plt.close(fig)

    monkeypatch.setattr(scalability_plots, "_save", keep)
    scalability_plots.make_plots(summarize(load_files([ddp_sweep])[0]), tmp_path, stamp="CPU, simulated cluster")
    assert seen["epoch_time.png"][:2] == ("log", "log")
    # ddp starts at 1 process, horovod at 2: one ideal line from each baseline.
    assert seen["speedup.png"][:2] == ("log", "log")
    assert {"ideal ddp (from world 1)", "ideal horovod (from world 2)"} <= set(seen["speedup.png"][4])
    assert seen["efficiency.png"][1] == "linear" and "ideal (100%)" in seen["efficiency.png"][4]
    assert {"ddp", "horovod"} <= set(seen["epoch_time.png"][4])
    assert all(v[2] and v[3] for v in seen.values()), seen
    assert len(stamps) == len(seen) and set(stamps) == {"CPU, simulated cluster"}


def test_cli_with_metrics_files(ddp_sweep, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    scalability_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["scalability", "--metrics-files", str(ddp_sweep), "--out", str(tmp_path / "o")])
    assert scalability_cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "efficiency" in printed and (tmp_path / "o" / "index.html").is_file()
    bad = parser.parse_args(["scalability", "--metrics-files", str(tmp_path / "nowhere")])
    assert scalability_cli.run(bad) == 2
    assert "no such file or directory" in capsys.readouterr().err


# -- end to end: real `dvc exp run` experiments ---------------------------------------


@pytest.mark.slow
def test_report_over_real_dvc_experiments(tmp_path):
    """A mixed set made by the real pipeline: `single` at two learning rates (seeds 0 and 1 at 0.001), `ddp`
    at 1 and 2 processes, a no-op `dvc exp run` (a second experiment with the same result), and a second
    machine. Only the machine is not real: the workspace gets the 2-process ddp experiment's results with
    `dvc exp apply`, and the machine field of its results/metrics.json is rewritten to "simcluster"
    (everything else is as trained here), as if that run had been made on the cluster."""
    repo = make_repo(tmp_path / "repo", {"train": {"epochs": 3}})
    dvc = str(BIN / "dvc")
    # `-S` edits params.yaml for good, so every run names all three keys.
    sweep = [("single", 1, 0), ("ddp", 1, 0), ("ddp", 2, 0), ("single", 1, 1)]
    for strategy, procs, seed in sweep:
        sh(
            [
                dvc,
                "exp",
                "run",
                "-S",
                f"train.strategy={strategy}",
                "-S",
                f"train.procs_per_node={procs}",
                "-S",
                f"train.seed={seed}",
            ],
            repo,
        )
    sh([dvc, "exp", "run", "-S", "train.lr=0.0003"], repo)  # single, seed 1, another learning rate
    sh([dvc, "exp", "run"], repo)  # nothing changed: trains nothing, one more experiment all the same
    shown = json.loads(sh([dvc, "exp", "show", "--json"], repo).stdout)
    exps = {e["name"]: e["revs"][0]["data"] for e in shown[1]["experiments"]}
    assert len(exps) == 6, sorted(exps)
    ddp2 = next(
        n
        for n, d in exps.items()
        if d["params"]["params.yaml"]["data"]["train"]["strategy"] == "ddp"
        and d["params"]["params.yaml"]["data"]["train"]["procs_per_node"] == 2
    )
    sh([dvc, "exp", "apply", ddp2], repo)
    run_path = repo / "results" / "run.json"  # what describes the run, beside metrics.json
    described = json.loads(run_path.read_text())
    assert described["machine"] == "local"
    run_path.write_text(json.dumps({**described, "machine": "simcluster"}, indent=2, sort_keys=True) + "\n")

    cli = [str(BIN / "python"), "-m", "virgo_exps.cli.scalability"]
    proc = sh(cli, repo)
    head = sh(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    assert (
        "Speedup baselines" in proc.stdout
        and "Split on: train.lr (0.0003, 0.001); machine (local, simcluster)" in proc.stdout
    )
    out = repo / "results" / "scalability"
    doc = json.loads((out / "scalability.json").read_text())
    groups = {(g["series"], g["world_size"]): g for g in doc["groups"]}
    single, slow_lr = "single, lr=0.001, machine=local", "single, lr=0.0003, machine=local"
    ddp, cluster = "ddp, lr=0.001, machine=local", "ddp, lr=0.001, machine=simcluster"
    assert set(groups) == {(single, 1), (slow_lr, 1), (ddp, 1), (ddp, 2), (cluster, 2)}
    assert doc["split_on"] == {"train.lr": ["0.0003", "0.001"], "machine": ["local", "simcluster"]}
    # 6 experiments and the workspace: the no-op experiment is the lr=0.0003 one counted once.
    assert len(doc["experiments"]) == 6 and len(doc["duplicates"]) == 1
    ((dup, kept),) = doc["duplicates"].items()
    assert {dup, kept} <= set(exps) and groups[(slow_lr, 1)]["runs"] == kept
    assert groups[(slow_lr, 1)]["n_runs"] == 1
    assert groups[(single, 1)]["n_runs"] == 2 and groups[(single, 1)]["spread_over"] == "2 runs"
    ddp1, ddp2g, sim = groups[(ddp, 1)], groups[(ddp, 2)], groups[(cluster, 2)]
    assert ddp2g["baseline"] == f"{ddp} @ 1 (1x1)" and ddp2g["runs"] == ddp2
    assert ddp2g["speedup"] == pytest.approx(ddp1["epoch_time_s"] / ddp2g["epoch_time_s"])
    assert ddp2g["efficiency"] == pytest.approx(ddp2g["speedup"] / 2)
    # 3 epochs, the first one is warm-up: the spread is over the 2 timed epochs, less any the trainer
    # recorded under host load (a busy machine can load one; if both are, both are kept and noted).
    assert ddp2g["excluded_epochs"] in (0, 1)
    assert ddp2g["spread_over"] == ("2 epochs (1 run)" if ddp2g["excluded_epochs"] == 0 else "none"), ddp2g
    # The cluster run is not measured against a local baseline: its own group, and it says so.
    assert sim["runs"] == "workspace" and sim["baseline"] == f"{cluster} @ 2 (1x2)" and sim["speedup"] == 1.0
    assert sim["speedup_vs_single"] is None and ddp2g["speedup_vs_single"] > 0
    assert any(n.startswith(f"'{cluster}' has no 1-process run of its own") for n in doc["notes"])
    assert all(g["scaling"] == "strong (fixed global batch 8)" for g in doc["groups"])
    # Measured figures are flagged exactly when they are suspicious (on a loaded 2-core machine the
    # 2-process run has been seen at 1400% efficiency against 1 process).
    for g in doc["groups"]:
        assert ("efficiency>100%" in g["flags"]) == (g["efficiency"] > 1 + 1e-9), g
        assert ("speedup>world" in g["flags"]) == (g["speedup"] > g["world_size"] + 1e-9), g
    assert all(g["val_loss"] > 0 for g in doc["groups"])
    # Where it comes from, by default.
    assert doc["provenance"]["machines"] == ["local", "simcluster"] and doc["provenance"]["commits"] == [head[:8]]
    assert f"machine local, simcluster | device cpu | commit {head[:8]} |" in doc["origin"]
    assert f"From: {doc['origin']}" in (out / "index.html").read_text()
    # The trainer records the host's load per epoch.
    assert not any("host load per epoch not recorded" in n for n in doc["notes"])
    for name in (
        "epoch_time.png",
        "speedup.png",
        "efficiency.png",
        "throughput.png",
        "computation.png",
        "val_loss.png",
    ):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert any("GPU utilisation and energy: not measured" in n for n in doc["notes"])

    # Named experiments only.
    names = sorted(e["name"] for e in doc["experiments"] if e["series"] == ddp)
    sh(cli + ["--exp", *names, "--out", "ddp-only"], repo)
    only = json.loads((repo / "ddp-only" / "scalability.json").read_text())
    assert {g["series"] for g in only["groups"]} == {"ddp"} and len(only["experiments"]) == 2
    assert only["split_on"] == {}

    # The runs that trained, from MLflow (local store of this checkout): the same groups and times. MLflow
    # knows no data or software hash and holds no workspace copy; the no-op run logged nothing.
    sh(cli + ["--mlflow", "--out", "from-mlflow"], repo, env=tool_env())
    via = json.loads((repo / "from-mlflow" / "scalability.json").read_text())
    assert via["split_on"] == {"train.lr": ["0.0003", "0.001"]} and via["duplicates"] == {}
    local = {(s.replace(", machine=local", ""), w): g for (s, w), g in groups.items() if "simcluster" not in s}
    assert {(g["series"], g["world_size"]): g["n_runs"] for g in via["groups"]} == {
        k: g["n_runs"] for k, g in local.items()
    }
    for g in via["groups"]:
        mine = local[(g["series"], g["world_size"])]
        assert g["epoch_time_s"] == pytest.approx(mine["epoch_time_s"], rel=1e-9)
        assert g["samples_per_s"] == pytest.approx(mine["samples_per_s"], rel=1e-9)
    assert sorted(e["name"] for e in via["experiments"]) == sorted(
        e["name"] for e in doc["experiments"] if e["source"] == "experiment"
    )


def test_dollar_signs_in_names_and_stamp_are_drawn_as_text(tmp_path):
    """Names come from params and experiments; matplotlib would read `$...$` as TeX and fail on `\\q`."""
    write_run(tmp_path / "runs", "x$\\q$y", "ddp", 1, [3.0, 2.0, 2.0], machine="d$HOME${PATH}", computation=0.75)
    write_run(tmp_path / "runs", "b$", "ddp", 2, [3.0, 1.2, 1.2], machine="d$HOME${PATH}", computation=0.5)
    report = summarize(load_files([tmp_path / "runs"])[0])
    out = write_report(report, tmp_path / "report", stamp="cost x$\\q$y")
    for name in ("epoch_time.png", "speedup.png", "efficiency.png", "computation.png"):
        assert (out / name).stat().st_size > 0
    assert "cost x$\\q$y" in (out / "index.html").read_text()


def test_a_diverged_run_is_left_out_not_pooled(tmp_path):
    write_run(tmp_path, "ok", "ddp", 1, [3.0, 1.0, 1.0])
    write_run(tmp_path, "diverged", "ddp", 2, [3.0, 0.5, 0.5])
    path = tmp_path / "diverged" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["val_loss"] = None  # what an older trainer wrote for a loss that was nan
    path.write_text(json.dumps(metrics))
    report = summarize(load_files([tmp_path])[0])
    assert "diverged left out (not a successful run: val_loss is None" in " ".join(report.notes)
    assert list(report.groups["world_size"]) == [1]


def test_runs_of_other_code_are_never_pooled(tmp_path):
    runs = (("old-a", "aaaa1111aaaa1111", 1.0), ("old-b", "aaaa1111aaaa1111", 1.1), ("new", "bbbb2222bbbb2222", 8.0))
    for seed, (name, code, t) in enumerate(runs):
        write_run(tmp_path, name, "ddp", 1, [3.0, t, t], seed=seed)
        path = tmp_path / name / "metrics.json"
        metrics = json.loads(path.read_text())
        metrics["provenance"] = {"params": "p", "data": "d", "code": code}
        path.write_text(json.dumps(metrics))
    report = summarize(load_files([tmp_path])[0])
    assert sorted(report.groups["n_runs"]) == [1, 2], report.groups
    assert any("code=bbbb2222" in str(label) for label in report.groups["series"]), report.groups["series"]
