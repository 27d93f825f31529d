"""Names and paths with quotes, ``%``, ``$``, ``#``, spaces or unicode reach a SLURM job unchanged.

The experiment name (``dvc exp run -n NAME``, or ``DVC_EXP_NAME``) becomes the job
name and the log's file name; the checkout and workspace paths become
``--output`` and ``--chdir``. sbatch parses ``#SBATCH`` lines with its own quoting
and Slurm expands ``%`` patterns in ``--output``: what we write is escaped for
both, and what cannot be made safe (a control character, a backslash, a '/' in
the name) is refused before anything is submitted.

Fast tests check the script text for every name; against the real test Slurm
(``slurm_cluster``, root needed) every name is submitted through the launcher
from a checkout whose own path is hostile, and one name goes through
``dvc exp run -n``.
"""

from __future__ import annotations

import dataclasses
import html as html_module
import re
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, TRAIN_WORKER_ARGV, make_repo, sh, tool_env
from virgo_exps.config import ConfigError, TrainConfig
from virgo_exps.launch import slurm
from virgo_exps.launch.job import JobSpec
from virgo_exps.machines import load_machine

# Each one broke a batch script, moved the log, or could run a command if written unquoted.
HOSTILE = [
    "a'b",
    'a"b',
    "x%jy",
    "%%j%A%a%x%u%",
    "d$HOME${PATH}",
    "$(touch pwned1)",
    "`touch pwned2`",
    "q'; touch pwned3; '",
    "sp ace #not-a-comment",
    "ünï漢字-é",
    "a|b;c&d>e<f",
    "-n",
]
REFUSED = {
    "a\\b": "contains a backslash",
    "line\nbreak": "contains a control character ('\\n')",
    "tab\there": "contains a control character ('\\t')",
    "sub/dir": "contains a '/'",
}
# The checkout's own folder: quotes, %, $, # and a space in the path the logs go to.
HOSTILE_DIR = 'it\'s "100%j" $HOME #1 é'

CHECKOUT = "/home/user/virgo-exps"
TRAIN = JobSpec.training("train", TRAIN_WORKER_ARGV, TrainConfig())  # what stages/train.py asks the launcher for


def context(name: str, home: str = CHECKOUT) -> slurm.JobContext:
    return slurm.JobContext(
        stage="train",
        experiment=name,
        workdir=Path(f"{home}/.dvc/tmp/exps/tmpk2x8q1zd"),
        home=Path(home),
        python=f"{home}/.venv/bin/python",
    )


def sbatch_words(line: str) -> list[str]:
    """The arguments sbatch reads from one ``#SBATCH`` line, by its rules: white space outside
    quotes ends an argument (even after a backslash), quotes group and are removed, a backslash
    keeps the next character, an unquoted ``#`` ends the line, an unmatched quote is fatal."""
    words, word, quote, escape, started = [], [], "", False, False
    for ch in line:
        if not quote and ch.isspace():
            if started:
                words.append("".join(word))
            word, started, escape = [], False, False
        elif escape:
            word.append(ch)
            escape = False
        elif ch == "\\":
            escape = started = True
        elif quote:
            if ch == quote:
                quote = ""
            else:
                word.append(ch)
        elif ch in "'\"":
            quote, started = ch, True
        elif ch == "#":
            break
        else:
            word.append(ch)
            started = True
    assert not quote, f"unmatched {quote} in {line!r}"
    if started:
        words.append("".join(word))
    return words


def sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            words = sbatch_words(line[len("#SBATCH ") :])
            assert len(words) == 1, f"one option a line, got {words} from {line!r}"
            key, _, value = words[0].partition("=")
            options[key] = value
    return options


@pytest.mark.parametrize("home", [CHECKOUT, f"/home/user/{HOSTILE_DIR}/virgo-exps"])
@pytest.mark.parametrize("name", HOSTILE)
def test_script_text_passes_every_name_unchanged(name, home):
    script = slurm.batch_script(context(name, home), TRAIN, load_machine("slurm"))
    options = sbatch_options(script)
    assert options["--job-name"] == f"virgo-train-{name}"
    assert options["--output"] == f"{home}/logs/train/{name}".replace("%", "%%") + "-%j.out"
    assert options["--chdir"] == f"{home}/.dvc/tmp/exps/tmpk2x8q1zd"
    # the shell part: valid, and every variable holds the value itself
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    exports = "\n".join(
        line
        for line in script.splitlines()
        if line.startswith(("export DVC_EXP_NAME=", "export VIRGO_HOME=", "VIRGO_PYTHON="))
    )
    shown = subprocess.run(
        ["bash", "-c", exports + '\nprintf "%s\\0" "$DVC_EXP_NAME" "$VIRGO_HOME" "$VIRGO_PYTHON"'],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.split("\0")[:3] == [name, home, f"{home}/.venv/bin/python"]
    # the job array of generate as well
    ctx = dataclasses.replace(context(name, home), stage="generate")
    array = sbatch_options(
        slurm.batch_script(ctx, JobSpec.job_array("generate", ["stages/generate.py"], 2), load_machine("slurm"))
    )
    assert array["--output"] == f"{home}/logs/generate/{name}".replace("%", "%%") + "-%A_%a.out"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_names_that_cannot_be_made_safe_are_refused(name):
    with pytest.raises(ConfigError) as err:
        slurm.batch_script(context(name), TRAIN, load_machine("slurm"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"experiment name {name!r}: {REFUSED[name]}") and "dvc exp run -n" in message


def test_a_checkout_path_that_cannot_be_made_safe_is_refused():
    with pytest.raises(ConfigError, match=r"^checkout path '/home/a\\\\b': contains a backslash.*move it"):
        slurm.batch_script(context("ok", "/home/a\\b"), TRAIN, load_machine("slurm"))


def test_job_list_and_log_path_survive_hostile_text():
    info = slurm.parse_show_job(
        "JobId=7 JobName=virgo-train-a|b c JobState=RUNNING Requeue=1 Restarts=0 ExitCode=0:0 "
        "StdErr=/h/it's 100%/logs/train/a|b c-7.out StdIn=/dev/null StdOut=/h/it's 100%/logs/train/a|b c-7.out "
        "Power= MailUser=(null)"
    )
    assert info.stdout == "/h/it's 100%/logs/train/a|b c-7.out" and info.state == "RUNNING"


# --------------------------------------------------------------------------
# against the real test Slurm
# --------------------------------------------------------------------------

PROBE = """\
import os, sys
print("probe: name=" + repr(os.environ["DVC_EXP_NAME"]) + " cwd=" + repr(os.getcwd()), flush=True)
"""
LAUNCH = """\
import sys
from virgo_exps.entry import stage_main
from virgo_exps.config import TrainConfig
from virgo_exps.launch.launcher import run
stage_main(lambda: run("train", ["probe.py"], TrainConfig()))
"""


def slurm_env(cluster, name: str) -> dict:
    env = {k: v for k, v in tool_env().items() if not k.startswith("SLURM_")}
    env.update(cluster.env, VIRGO_MACHINE="slurm", OMP_NUM_THREADS="1", DVC_EXP_NAME=name)
    return env


def job_name_of(cluster, job: str) -> str:
    out = cluster.slurm("scontrol", "show", "job", job).stdout
    return re.search(r"JobName=(.*)$", out.splitlines()[0]).group(1)


def injected(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("pwned*")]


@pytest.fixture(scope="module")
def hostile_repo(tmp_path_factory) -> Path:
    repo = make_repo(tmp_path_factory.mktemp("hostile") / HOSTILE_DIR / "repo")
    (repo / "probe.py").write_text(PROBE)
    (repo / "launch_probe.py").write_text(LAUNCH)
    return repo


@pytest.mark.slurm
@pytest.mark.slow
def test_hostile_names_run_and_log_where_announced(slurm_cluster, hostile_repo):
    repo = hostile_repo
    logs = repo / "logs" / "train"
    for name in HOSTILE:
        before = set(logs.iterdir()) if logs.exists() else set()
        proc = sh(
            [str(BIN / "python"), "launch_probe.py"], repo, slurm_env(slurm_cluster, name), check=False, timeout=300
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{name!r}:\n{out[-4000:]}"
        m = re.search(rf"submitted job (\d+) \({re.escape('virgo-train-' + name)}\); log (.*)\n", out)
        assert m, f"{name!r}:\n{out[-3000:]}"
        job, announced = m.group(1), m.group(2)
        expected = logs / f"{name}-{job}.out"
        assert announced == str(expected), (name, announced)
        assert f"job {job} COMPLETED on {slurm_cluster.node_names[0]}; log {expected}" in out, out[-3000:]
        # the log is where it was announced, and nowhere else
        assert set(logs.iterdir()) - before == {expected, logs / f"{name}.sbatch"} - before, (
            name,
            sorted(p.name for p in set(logs.iterdir()) - before),
        )
        log = expected.read_text()
        assert f"probe: name={name!r} cwd={str(repo)!r}" in log, log
        assert f"virgo: job {job} (virgo-train-{name}) on 1 node(s)" in log, log
        assert job_name_of(slurm_cluster, job) == f"virgo-train-{name}"
        # streamed to the terminal as well (the launcher followed the announced file)
        assert f"probe: name={name!r}" in out
    assert injected(repo, Path.cwd()) == []


@pytest.mark.slurm
@pytest.mark.slow
def test_a_refused_name_submits_nothing(slurm_cluster, hostile_repo):
    repo = hostile_repo
    before = cluster_jobs(slurm_cluster)
    proc = sh([str(BIN / "python"), "launch_probe.py"], repo, slurm_env(slurm_cluster, "a\\b"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: experiment name 'a\\\\b': contains a backslash, which cannot be passed "
        "safely to a SLURM batch script and its log file name; choose another name "
        "(`dvc exp run -n <name>` with letters, digits, '-', '_' or '.')"
    )
    assert not (repo / "logs" / "train" / "a\\b.sbatch").exists()
    assert cluster_jobs(slurm_cluster) == before


def cluster_jobs(cluster) -> int:
    """Every job the controller still knows (squeue lists pending and running ones)."""
    return cluster.slurm("scontrol", "show", "job", "-o", check=False).stdout.count("JobId=")


@pytest.mark.slurm
@pytest.mark.slow
def test_dvc_exp_run_with_a_quote_and_percent_in_the_name(slurm_cluster, tmp_path):
    """The reported cases, `-n "a'b"` (sbatch: Unmatched ') and `-n 'x%jy'` (log moved by %j), in
    one name through the whole pipeline: generate as a job array, train as a job."""
    repo = make_repo(
        tmp_path / "repo",
        {
            "generate": {"n_samples": 20, "chunk_size": 10},
            "train": {"epochs": 1, "profile_steps": 0},
            "report": {"title": "<script>alert(1)</script> #1 | *x*"},
        },
    )
    name = "a'b%jy$x"
    env = slurm_env(slurm_cluster, "")
    env.pop("DVC_EXP_NAME")
    proc = sh([str(BIN / "dvc"), "exp", "run", "-n", name], repo, env, check=False, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Unmatched" not in out
    gen = re.search(
        rf"submitted job (\d+) \({re.escape('virgo-generate-' + name)}, array of 2 tasks\); log (.*)\n", out
    )
    assert gen, out[-4000:]
    gen_logs = repo / "logs" / "generate"
    assert gen.group(2) == str(gen_logs / f"{name}-{gen.group(1)}_<task>.out")
    jobs = sorted(p.name for p in gen_logs.glob(f"*-{gen.group(1)}_*.out"))
    assert jobs == [f"{name}-{gen.group(1)}_{t}.out" for t in (0, 1)]
    # the stage's own log (stagelog) beside its job's, under the same literal name
    assert [p.name.startswith(f"{name}-local-") for p in gen_logs.glob("*-local-*.out")] == [True]
    train = re.search(rf"submitted job (\d+) \({re.escape('virgo-train-' + name)}\); log (.*)\n", out)
    assert train, out[-4000:]
    log = repo / "logs" / "train" / f"{name}-{train.group(1)}.out"
    assert train.group(2) == str(log) and f"COMPLETED on {slurm_cluster.node_names[0]}; log {log}" in out
    assert sorted(p.name for p in log.parent.glob("*.out")) == [log.name]
    assert f"virgo: job {train.group(1)} (virgo-train-{name})" in log.read_text()
    assert job_name_of(slurm_cluster, train.group(1)) == f"virgo-train-{name}"
    report = (repo / "results" / "report" / "report.md").read_text()
    assert report.startswith("# &lt;script&gt;alert(1)&lt;/script&gt; \\#1 \\| \\*x\\*\n"), report[:200]
    assert injected(repo) == []


def test_the_log_followed_comes_from_the_job_ids():
    """scontrol shows StdOut=...100%2... for a pattern with `100%%j`: the path is built from the ids."""
    ctx = context("x%jy", "/h/100%j")
    job = slurm.parse_show_job("JobId=2 JobState=RUNNING StdOut=/h/100%2/logs/train/x%2y-2.out Power=")
    assert ctx.log_of(job) == Path("/h/100%j/logs/train/x%jy-2.out")
    task = slurm.parse_show_job("JobId=11 ArrayJobId=10 ArrayTaskId=1 JobState=RUNNING StdOut=/wrong Power=")
    assert ctx.log_of(task) == Path("/h/100%j/logs/train/x%jy-10_1.out")


# --------------------------------------------------------------------------
# text from params in the report
# --------------------------------------------------------------------------

HOSTILE_TITLE = "Study\n# Second heading\n<script>alert(1)</script> *bold* [link](http://x) | &amp; `code`"


def test_report_title_and_names_are_literal_text_in_markdown(tmp_path):
    """A title with line breaks, '#', HTML and Markdown markup is one heading of literal text."""
    markdown_it = pytest.importorskip("markdown_it")
    repo = make_repo(tmp_path / "repo", {"report": {"title": HOSTILE_TITLE}})
    results = repo / "results"
    results.mkdir()
    (results / "metrics.json").write_text(
        '{"strategy": "single", "world_size": 1, "machine": "m|<b>x</b>", "train_loss": 0.8, "val_loss": 0.5}'
    )
    (results / "epochs.csv").write_text(
        "epoch,train_loss,val_loss,train_time_s,val_time_s,samples_per_s\n1,1.0,0.9,2.0,0.5,10\n2,0.8,0.7,2.0,0.5,11\n"
    )
    name = "a`b<i>x</i>"
    proc = sh(
        [
            str(BIN / "python"),
            "stages/report.py",
            "--params",
            "params.yaml",
            "--metrics",
            "results/metrics.json",
            "--epochs",
            "results/epochs.csv",
            "--out",
            "results/report",
        ],
        repo,
        tool_env({"DVC_EXP_NAME": name}),
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (results / "report" / "report.md").read_text()
    assert "<script" not in text and "<b>" not in text  # (the name's <i> is in a code span: literal)
    assert [line for line in text.splitlines() if line.startswith("#")] == [
        text.splitlines()[0],
        *("## Reference losses", "## Validation examples", "## Per epoch", "## Params", "## Software (version.lock)"),
    ]
    page = markdown_it.MarkdownIt("commonmark").enable("table").render(text)
    assert page.count("<h1>") == 1 and "<script" not in page and "<b>" not in page and "<i>" not in page
    assert "<a " not in page and "<em>" not in page
    heading = re.search(r"<h1>(.*)</h1>", page).group(1)
    # the title as one line of text: the renderer shows exactly the characters of the title
    assert html_module.unescape(heading) == " ".join(HOSTILE_TITLE.split())
    assert f"<code>{html_module.escape(name, quote=False)}</code>" in page
    assert "<td>m|&lt;b&gt;x&lt;/b&gt;</td>" in page  # a '|' in a value stays in its cell
