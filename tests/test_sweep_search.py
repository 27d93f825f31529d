"""Sweep specs and the Optuna search behind a sweep.

Unit tests: what a sweep file or a -S grid may say, and the one-line errors for what it may not.
Slow test: a search run by hand on the local machine, the way an array task runs it (ask, `dvc exp run`
with the trial's -S overrides and environment, tell), through real Optuna and real DVC on a copy of the
project with tiny params. One trial is steered to a learning rate that diverges and runs with two DDP
ranks: the median pruner must stop it after an epoch, both ranks together, with exit 0, and the journal
and the experiment's metrics must both say so.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, make_repo, sh, tool_env
from virgo_exps.config import ConfigError
from virgo_exps.provenance import read_metrics
from virgo_exps.records import merge
from virgo_exps.sweeps import spec as sweep_spec

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- specs (unit) ---------------------------------------------------------------------------------------------


def test_example_file_loads():
    s = sweep_spec.load(ROOT / "sweeps" / "lr-wd.yaml")
    assert (s.name, s.kind, s.metric, s.direction, s.trials, s.parallel, s.pruner, s.sampler) == (
        "lr-wd",
        "search",
        "val_loss",
        "minimize",
        8,
        2,
        "median",
        "tpe",
    )
    assert s.space["train.lr"]["type"] == "loguniform" and s.space["train.lr"]["low"] < s.space["train.lr"]["high"]
    assert set(s.space) == {"train.lr", "train.weight_decay"}
    assert sweep_spec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "trials: 3\nparameters: {train.lrx: {type: uniform, low: 0.1, high: 0.2}}",
            "parameters: train.lrx: 'train.lrx' is not a key of params.yaml; the keys of 'train' are:",
        ),
        (
            "trials: 3\nparameters: {optim.lr: {type: uniform, low: 0.1, high: 0.2}}",
            "'optim.lr' is not a key of params.yaml; write section.key",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: uniform, low: 1e-4, high: 0.2}}",
            "parameters: train.lr: low: expected a number, got '1e-4' (str) (YAML reads 1e-4 as text: write 1.0e-4)",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: loguniform, low: 0.0, high: 0.2}}",
            "train.lr: low: 0.0 must be > 0 on a log scale; raise it or use type: uniform",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: uniform, low: 0.5, high: 0.2}}",
            "train.lr: low (0.5) must be below high (0.2)",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: uniform, low: 0.1, high: 20.0}}",
            "train.lr: high: 20.0 is outside what train.lr allows; use a number between 0 and 10",
        ),
        (
            "trials: 3\nparameters: {train.epochs: {type: uniform, low: 1, high: 3}}",
            "train.epochs: type: uniform does not fit train.epochs (int); use type: int",
        ),
        (
            "trials: 3\nparameters: {train.strategy: {type: choice, values: [single, mpi]}}",
            "train.strategy: values: mpi is outside what train.strategy allows; use one of 'single'",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: normal, low: 0.1, high: 0.2}}",
            "train.lr: type: 'normal' is not allowed; expected one of loguniform, uniform, int, choice",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: uniform, high: 0.2}}",
            "parameters: train.lr: low: missing; expected a number",
        ),
        (
            "trials: 3\nparameters: {train.lr: {type: uniform, low: 0.1, high: 0.2, scale: 2}}",
            "parameters: train.lr: scale: unknown key; allowed keys in",
        ),
        ("parameters: {train.lr: {type: uniform, low: 0.1, high: 0.2}}", "trials: missing; give the number of trials"),
        ("trials: 0\nparameters: {train.lr: {type: uniform, low: 0.1, high: 0.2}}", "trials: 0 is not allowed"),
        (
            "trials: 3\ndirection: up\nparameters: {train.lr: {type: uniform, low: 0.1, high: 0.2}}",
            "direction: 'up' is not allowed; expected one of minimize, maximize",
        ),
        (
            "trials: 3\npruner: hyperband\nparameters: {train.lr: {type: uniform, low: 0.1, high: 0.2}}",
            "pruner: 'hyperband' is not allowed; expected one of median, none",
        ),
        (
            "trials: 3\nname: -x\nparameters: {train.lr: {type: uniform, low: 0.1, high: 0.2}}",
            "name: '-x' is not allowed",
        ),
        ("trials: 3\ntrails: 4\nparameters: {}", "trails: unknown key; allowed keys in"),
        ("trials: 3", "give either parameters: (a search space) or grid: (lists of values), none is set"),
        ("grid: {train.seed: [0, 1]}\ntrials: 3", "trials: 3 but the grid has 2 combinations; remove trials:"),
        ("grid: {train.seed: [0, 0]}", "train.seed: ['0', '0'] repeats a value"),
        ("- a\n- b", "expected a mapping of keys"),
        ("trials: [3", "not valid YAML at line"),
    ],
)
def test_spec_errors_name_key_problem_and_fix(tmp_path, body, expected):
    path = write(tmp_path, body + "\n")
    with pytest.raises(ConfigError) as err:
        sweep_spec.load(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found; give the path of a sweep file"):
        sweep_spec.load(tmp_path / "nope.yaml")


def test_search_spec_defaults_and_kinds(tmp_path):
    path = write(
        tmp_path,
        "trials: 5\nparallel: 9\nmetric: cost.core_h\nseed: 7\n"
        "parameters:\n"
        "  train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}\n"
        "  train.warmup_steps: {type: int, low: 0, high: 40, step: 10}\n"
        "  train.model: {type: choice, values: [decoder, unet]}\n"
        "  train.weight_decay: {type: uniform, low: 0, high: 0.1, step: 0.05}\n",
        "my_sweep-2.yaml",
    )
    s = sweep_spec.load(path)
    assert s.name == "my_sweep-2"  # the file name when name: is left out
    assert s.parallel == 5  # never more at once than the budget
    assert (s.pruner, s.sampler, s.seed, s.metric) == ("median", "tpe", 7, "cost.core_h")
    assert s.space["train.warmup_steps"] == {"type": "int", "low": 0, "high": 40, "step": 10, "log": False}
    assert s.space["train.model"] == {"type": "choice", "values": ["decoder", "unet"]}
    assert s.space["train.weight_decay"]["low"] == 0.0 and isinstance(s.space["train.weight_decay"]["low"], float)
    with pytest.raises(ValueError, match="is a search"):
        sweep_spec.overrides_of(s, 0)


def test_grid_from_sets_is_the_product_in_order():
    s = sweep_spec.from_grid("lr-seed", ["train.lr=0.001,1e-2", "train.seed=0,1,2"], parallel=2)
    assert (s.kind, s.trials, s.parallel, s.pruner) == ("grid", 6, 2, "none")
    assert [sweep_spec.overrides_of(s, n) for n in (0, 1, 3, 5)] == [
        {"train.lr": "0.001", "train.seed": "0"},
        {"train.lr": "0.001", "train.seed": "1"},
        {"train.lr": "1e-2", "train.seed": "0"},
        {"train.lr": "1e-2", "train.seed": "2"},
    ]
    assert s.experiment(5) == "lr-seed-005"
    assert sweep_spec.set_args(sweep_spec.overrides_of(s, 4)) == ["-S", "train.lr=1e-2", "-S", "train.seed=1"]
    with pytest.raises(IndexError):
        sweep_spec.overrides_of(s, 6)
    assert sweep_spec.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_grid_file(tmp_path):
    s = sweep_spec.load(
        write(tmp_path, "grid:\n  train.seed: [0, 1]\n  preprocess.whiten: [true, false]\nparallel: 3\n")
    )
    assert s.kind == "grid" and s.trials == 4 and s.parallel == 3
    assert s.grid[1] == {"train.seed": "0", "preprocess.whiten": "false"}


@pytest.mark.parametrize(
    ("sets", "parallel", "expected"),
    [
        (["train.lr=0.001,abc"], 1, "-S: train.lr: 'abc' is not a number; train.lr takes a number between 0 and 10"),
        (["train.lr=0.001,12"], 1, "-S: train.lr: 12 is outside what train.lr allows"),
        (["train.nodes=1,2.5"], 1, "-S: train.nodes: '2.5' is not an integer"),
        (["lr=0.1"], 1, "-S: lr: 'lr' is not a key of params.yaml; write section.key"),
        (["train.lr"], 1, "-S train.lr: expected key=value[,value...]"),
        (["train.lr=0.1", "train.lr=0.2"], 1, "train.lr is given twice; list all its values in one -S"),
        ([], 1, "-S: no parameters; give at least one"),
        (["train.lr=0.1"], 0, "--parallel: 0 is not allowed; expected an integer > 0"),
    ],
)
def test_grid_errors(sets, parallel, expected):
    with pytest.raises(ConfigError) as err:
        sweep_spec.from_grid("g", sets, parallel=parallel)
    assert expected in str(err.value), str(err.value)


def test_grid_name_is_checked():
    with pytest.raises(ConfigError, match="is not a sweep name"):
        sweep_spec.from_grid("a b", ["train.seed=0,1"], parallel=1)


# --- a search through real Optuna and real DVC (local machine) --------------------------------------------------

EPOCHS = 3
GOOD_LR, BAD_LR = 0.003, 8.0
SEARCH = f"""
name: lr-test
metric: val_loss
direction: minimize
trials: 4
parallel: 1
pruner: median
startup_trials: 1     # judge from the first complete trial on
warmup_epochs: 0      # from the first epoch on
seed: 11
parameters:
  train.lr: {{type: loguniform, low: 1.0e-4, high: {BAD_LR + 1}}}
  train.weight_decay: {{type: uniform, low: 0.0, high: 0.1}}
"""


def dvc(repo, *args, env=None, timeout=900):
    return sh([str(BIN / "dvc"), *args], repo, env=env or tool_env(), timeout=timeout)


def run_trial(repo: Path, s, sweep_dir: Path, extra: dict[str, str] | None = None):
    """One trial as an array task runs it: ask, `dvc exp run` with the overrides and the trial's env, tell."""
    from virgo_exps.sweeps import search

    asked = search.ask(s, sweep_dir)
    assert asked is not None
    number, overrides = asked
    name = s.experiment(number)
    sets = sweep_spec.set_args({**overrides, **(extra or {})})
    proc = dvc(repo, "exp", "run", "-n", name, *sets, env=tool_env(search.trial_env(s, sweep_dir, number)))
    metrics = read_metrics(repo / "results" / "metrics.json")
    state = "pruned" if metrics.get("pruned") else "complete"
    search.tell(s, sweep_dir, number, metrics["val_loss"], state, attrs={"experiment": name, "cost": metrics["cost"]})
    return number, overrides, metrics, proc.stdout + proc.stderr


def exp_metrics(repo: Path) -> dict[str, tuple[dict, dict]]:
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    out = {}
    for rev in shown:
        for exp in rev.get("experiments") or []:
            for run in exp["revs"]:
                data = run["data"]
                out[run["name"]] = (
                    data["params"]["params.yaml"]["data"]["train"],
                    # the record as DVC shows it: metrics.json's numbers and run.json's text (as params)
                    merge(data["metrics"]["results/metrics.json"]["data"], data["params"]["results/run.json"]["data"]),
                )
    return out


ASK_AND_DIE = """
import os, sys
from pathlib import Path
from virgo_exps.sweeps import search, spec
number, overrides = search.ask(spec.load(Path(sys.argv[1])), Path(sys.argv[2]), task=sys.argv[3])
print(number, overrides, flush=True)
if sys.argv[4] == "kill":
    os.kill(os.getpid(), 9)  # a node lost before the task wrote its state file
"""


def test_a_task_killed_after_its_ask_gets_the_same_trial_back(tmp_path):
    """An array task killed between asking the study and writing its state is requeued under the same
    name and asks again: it gets its own running trial back, with the same values, and the budget is
    not spent on a trial that nobody would ever finish."""
    from virgo_exps.sweeps import search

    spec_file = write(tmp_path, SEARCH, "lr-test.yaml")
    sweep_dir = tmp_path / "sweep"

    def task(name: str, how: str = "exit") -> tuple[str, int]:
        proc = subprocess.run(
            [str(BIN / "python"), "-c", ASK_AND_DIE, str(spec_file), str(sweep_dir), name, how],
            capture_output=True,
            text=True,
            timeout=120,
            env=tool_env(),
        )
        return proc.stdout.strip(), proc.returncode

    first, rc = task("41_0", "kill")
    assert rc == -9 and first.startswith("0 {"), first
    assert task("41_0") == (first, 0)  # requeued: trial 0 again, the same values
    other, _ = task("41_1")
    assert other.startswith("1 {") and other[1:] != first[1:]
    s = sweep_spec.load(spec_file)
    search.tell(s, sweep_dir, 0, 0.5, "complete")
    assert task("41_0")[0].startswith("2 {")  # a finished trial is not handed out again
    trials = search.open_study(s, sweep_dir).trials
    assert [(t.user_attrs["task"], t.state.name) for t in trials] == [
        ("41_0", "COMPLETE"),
        ("41_1", "RUNNING"),
        ("41_0", "RUNNING"),
    ]
    # Killed in the middle of an ask (one of two values drawn): that trial is failed and a new one asked.
    study = search.open_study(s, sweep_dir)
    half = study.ask()
    half.set_user_attr("task", "41_2")
    half.suggest_float("train.lr", 1e-4, 1.0, log=True)
    number, overrides = search.ask(s, sweep_dir, task="41_2")
    assert number == half.number + 1 and set(overrides) == set(s.space)
    states = {t.number: t.state.name for t in search.open_study(s, sweep_dir).trials}
    assert states[half.number] == "FAIL" and states[number] == "RUNNING"


@pytest.mark.slow
def test_search_prunes_records_and_continues(tmp_path):
    from optuna.trial import TrialState

    from virgo_exps.sweeps import page, search

    repo = make_repo(tmp_path / "repo", {"preprocess": {"fmax": 64.0}, "train": {"epochs": EPOCHS}})
    s = sweep_spec.load(write(tmp_path, SEARCH, "lr-test.yaml"))
    sweep_dir = tmp_path / "store" / "sweeps" / s.name
    # Steer the first two trials: a learning rate that trains, then one that diverges. The others are TPE's.
    study = search.open_study(s, sweep_dir)
    study.enqueue_trial({"train.lr": GOOD_LR, "train.weight_decay": 0.0})
    study.enqueue_trial({"train.lr": BAD_LR, "train.weight_decay": 0.0})

    ran = {}
    for n in range(s.trials):
        # The diverging trial runs with two DDP ranks: both must stop after the same epoch, and the run end cleanly.
        extra = {"train.strategy": "ddp", "train.procs_per_node": "2"} if n == 1 else None
        number, overrides, metrics, output = run_trial(repo, s, sweep_dir, extra)
        assert number == n
        if n == 1:
            # The task requeued after the pruned snapshot, before it recorded the trial: the train
            # command run again in the same workspace stays pruned at the same epoch.
            cmd = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]["cmd"].split()
            again = sh([str(BIN / "python"), *cmd[1:]], repo, env=tool_env(search.trial_env(s, sweep_dir, number)))
            log = again.stdout + again.stderr
            assert f"epoch {metrics['pruned_at_epoch'] + 1}/" not in log, log[-3000:]
            rerun = read_metrics(repo / "results" / "metrics.json")
            assert rerun["pruned"] is True and rerun["pruned_at_epoch"] == metrics["pruned_at_epoch"], rerun
        ran[number] = (overrides, metrics, output)
    assert search.ask(s, sweep_dir) is None  # the budget is used up

    assert float(ran[0][0]["train.lr"]) == GOOD_LR and float(ran[1][0]["train.lr"]) == BAD_LR
    first = ran[0][1]
    assert "pruned" not in first and first["epochs"] == EPOCHS  # nothing to compare with yet
    bad = ran[1][1]
    assert bad["pruned"] is True and bad["world_size"] == 2
    assert 1 <= bad["pruned_at_epoch"] < EPOCHS and bad["epochs"] == bad["pruned_at_epoch"]
    assert bad.get("val_loss") is None or bad["val_loss"] > first["val_loss"]  # NaN is left out

    # The journal, read afresh, holds the same story as the experiments.
    trials = search.open_study(s, sweep_dir).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    shown = exp_metrics(repo)
    pruned = 0
    for t in trials:
        overrides, metrics, _ = ran[t.number]
        name = s.experiment(t.number)
        assert t.user_attrs["experiment"] == name and t.user_attrs["cost"] == metrics["cost"]
        params, recorded = shown[name]
        assert math.isclose(params["lr"], float(overrides["train.lr"]), rel_tol=1e-12)
        assert recorded.get("pruned") == metrics.get("pruned")
        assert sorted(t.intermediate_values) == list(range(1, metrics["epochs"] + 1))
        if metrics.get("pruned"):
            pruned += 1
            assert t.state == TrialState.PRUNED
            assert recorded["pruned_at_epoch"] == metrics["pruned_at_epoch"] == max(t.intermediate_values)
        else:
            assert t.state == TrialState.COMPLETE
            assert t.value == pytest.approx(metrics["val_loss"]) == t.intermediate_values[EPOCHS]
    assert pruned >= 1 and trials[1].state == TrialState.PRUNED

    # As optuna-dashboard and MLflow show them: the objective named; each cost figure a number under its
    # own key, a sortable column; each trial's MLflow run tagged with its sweep and trial, its cost as metrics.
    study = search.open_study(s, sweep_dir)
    assert study.metric_names == ["val_loss"]
    frame = study.trials_dataframe()
    assert str(frame["user_attrs_cost.core_h"].dtype) == "float64" and (frame["user_attrs_cost.core_h"] > 0).all()
    assert "user_attrs_cost.energy_wh" not in frame  # not measured on CPU: left out, not null
    con = sqlite3.connect(repo / "mlflow" / "mlflow.db")
    for t in trials:
        # the first run of the trial (trial 1's train command ran a second time above, as a requeued task)
        (run_id,) = con.execute(
            "select run_uuid from runs where run_uuid in (select run_uuid from tags where key = 'trial' "
            "and value = ?) and run_uuid in (select run_uuid from tags where key = 'sweep' and value = ?) "
            "order by start_time",
            (str(t.number), s.name),
        ).fetchone()
        got = dict(con.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)).fetchall())
        assert got["cost.core_h"] == pytest.approx(ran[t.number][1]["cost"]["core_h"]), got
    con.close()

    # The page.
    out = page.build(s, sweep_dir, tmp_path / "page")
    text = out.read_text()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert f"dvc exp apply {s.experiment(best.number)}" in text
    for png in ("history.png", "parallel.png", "epochs.png"):
        assert (out.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if len(complete) >= 2:
        assert (out.parent / "importances.png").read_bytes()[:4] == b"\x89PNG"
        assert f"only {len(complete)}, a rough indication until the sweep has 10 or more" in text
    else:
        assert "parameter importances need at least 2 complete trials" in text
    total = sum(ran[n][1]["cost"]["core_h"] for n in ran)
    assert f"{total:.4g} core-h" in text

    # The best trial, applied and run again without the sweep, is up to date: nothing reruns, same metrics.
    dvc(repo, "exp", "apply", s.experiment(best.number))
    rerun = dvc(repo, "exp", "run")
    log = rerun.stdout + rerun.stderr
    for stage in ("generate", "preprocess", "train", "report"):  # environment always runs (it checks the venv)
        assert f"Stage '{stage}' didn't change, skipping" in log, log[-3000:]
    assert read_metrics(repo / "results" / "metrics.json") == ran[best.number][1]

    # A second submission opens the same study and goes on numbering up to its (larger) budget.
    more = dataclasses.replace(s, trials=5)
    number, _ = search.ask(more, sweep_dir)
    assert number == 4 and search.ask(more, sweep_dir) is None
    search.tell(more, sweep_dir, number, None, "fail", attrs={"log": "never ran"})
    again = search.open_study(more, sweep_dir).trials
    assert len(again) == 5 and again[4].state == TrialState.FAIL and again[4].user_attrs["log"] == "never ran"


# --- the same search as a sweep: one job array on a 2-node Slurm cluster ---------------------------------------

ARRAY_SWEEP = f"""
name: lr-array
metric: val_loss
direction: minimize
trials: 5
parallel: 2
pruner: median
startup_trials: 1
warmup_epochs: 0
seed: 5
parameters:
  train.lr: {{type: loguniform, low: 1.0e-4, high: {BAD_LR + 1}}}
"""


def sweep_finished(directory: Path, trials: int) -> bool:
    states = []
    for i in range(trials):
        path = directory / "tasks" / f"{i}.json"
        states.append(json.loads(path.read_text()).get("state") if path.is_file() else None)
    return all(s in ("done", "failed", "pruned", "skipped") for s in states)


@pytest.mark.slurm
@pytest.mark.slow
def test_search_sweep_as_a_job_array(tmp_path, slurm_multinode):
    import grp
    import os

    from optuna.trial import TrialState

    from conftest import wait_until
    from virgo_exps.sweeps import search

    cluster = slurm_multinode
    repo = make_repo(tmp_path / "repo", {"preprocess": {"fmax": 64.0}, "train": {"epochs": EPOCHS}})
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update({**cluster.env, "VIRGO_MACHINE": "simcluster", "OMP_NUM_THREADS": "1"})
    local = {**env, "VIRGO_MACHINE": "local"}
    vx = [str(BIN / "virgo-exps")]
    (repo / "sweeps" / "lr-array.yaml").write_text(ARRAY_SWEEP)
    dvc(repo, "repro", "preprocess", env=local)  # the data, made once and committed with the sweep file
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "data and sweep"], repo)
    (repo / ".slurmsim").symlink_to(cluster.workdir, target_is_directory=True)
    store = tmp_path / "store"
    sh([*vx, "share", "--dir", str(store), "--group", grp.getgrgid(os.getgid()).gr_name], repo, env=env)

    s = sweep_spec.load(repo / "sweeps" / "lr-array.yaml")
    directory = store / "sweeps" / s.name
    # The first two trials (running together) train well; the next two diverge and start when one good
    # trial is complete, so the median pruner has a trial to compare with. The fifth is TPE's.
    study = search.open_study(s, directory)
    for lr in (GOOD_LR, GOOD_LR / 3, BAD_LR, BAD_LR):
        study.enqueue_trial({"train.lr": lr})
    submitted = sh([*vx, "sweep", "submit", "sweeps/lr-array.yaml", "--parsable"], repo, env=env)
    job_id = submitted.stdout.strip()
    assert job_id.isdigit(), submitted.stdout
    wait_until(lambda: sweep_finished(directory, s.trials), timeout=1500, what=f"the {s.trials} trials", interval=2)

    tasks = [json.loads((directory / "tasks" / f"{i}.json").read_text()) for i in range(s.trials)]
    states = {t["trial"]: t["state"] for t in tasks}
    assert sorted(states) == list(range(s.trials)) and "failed" not in states.values(), tasks
    trials = search.open_study(s, directory).trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert len(pruned) >= 1, [(t.number, t.state.name, t.params) for t in trials]
    for t in trials:
        assert states[t.number] == {"COMPLETE": "done", "PRUNED": "pruned"}[t.state.name], (t.number, states)
    for t in pruned:
        got = read_metrics(directory / "work" / s.experiment(t.number) / "results" / "metrics.json")
        assert got["pruned"] is True and got["pruned_at_epoch"] == max(t.intermediate_values) < EPOCHS, got
    assert {t.number for t in pruned} >= {2, 3}  # both diverging trials

    status = sh([*vx, "sweep", "status", s.name], repo, env=env).stdout
    done = sum(1 for v in states.values() if v == "done")
    assert f"{s.trials} trials: {done} done" in status and f"{len(pruned)} pruned" in status, status

    # The best trial, pulled from the team store and applied: nothing reruns, its metrics stay.
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = s.experiment(min(complete, key=lambda t: t.value).number)
    page_dir = tmp_path / "page"
    sh([*vx, "sweep", "page", s.name, "--out", str(page_dir)], repo, env=env)
    text = (page_dir / "index.html").read_text()
    assert f"dvc exp apply {best}" in text and (page_dir / "importances.png").is_file()
    dvc(repo, "exp", "pull", "team", best, env=local)
    dvc(repo, "exp", "apply", best, env=local)
    expected = read_metrics(directory / "work" / best / "results" / "metrics.json")
    log = dvc(repo, "exp", "run", env=local)
    log = log.stdout + log.stderr
    for stage in ("generate", "preprocess", "train", "report"):
        assert f"Stage '{stage}' didn't change, skipping" in log, log[-3000:]
    assert read_metrics(repo / "results" / "metrics.json") == expected

    # A second submission continues the search to a larger budget. While the first array is still
    # in the queue it is refused; afterwards the new array's tasks ask the study for the trials left
    # (the others end as skipped) and the first array's records are kept under its job id.
    sh(["git", "reset", "-q", "--hard", "HEAD"], repo)
    spec_file = repo / "sweeps" / "lr-array.yaml"
    spec_file.write_text(ARRAY_SWEEP.replace("trials: 5", "trials: 6"))
    sh(["git", "commit", "-q", "-am", "one trial more"], repo)
    again = sh([*vx, "sweep", "submit", "sweeps/lr-array.yaml", "--parsable"], repo, env=env).stdout.strip()
    refused = sh([*vx, "sweep", "submit", "sweeps/lr-array.yaml"], repo, env=env, check=False)
    assert refused.returncode == 2 and f"its job array {again} is still in the queue" in refused.stderr

    def continued() -> bool:
        paths = [directory / "tasks" / f"{i}.json" for i in range(6)]
        return all(p.is_file() and json.loads(p.read_text())["job_id"] == again for p in paths) and sweep_finished(
            directory, 6
        )

    wait_until(continued, timeout=600, what="the continued search", interval=2)
    kept = {i: json.loads((directory / "tasks" / f"{job_id}_{i}.json").read_text()) for i in range(s.trials)}
    assert {t["trial"]: t["state"] for t in kept.values()} == states
    now = [json.loads((directory / "tasks" / f"{i}.json").read_text()) for i in range(6)]
    assert all(t["job_id"] == again for t in now), now
    ran = [t for t in now if t["state"] != "skipped"]
    assert [t["trial"] for t in ran] == [5] and ran[0]["state"] in ("done", "pruned"), now
    trials = search.open_study(s, directory).trials
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    finished_now = {**states, 5: ran[0]["state"]}
    status = sh([*vx, "sweep", "status", s.name], repo, env=env).stdout
    done = sum(1 for v in finished_now.values() if v == "done")
    pruned_n = sum(1 for v in finished_now.values() if v == "pruned")
    assert f"6 trials: {done} done, 0 running, 0 pending, 0 failed, {pruned_n} pruned" in status, status
