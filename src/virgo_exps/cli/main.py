"""The ``virgo-exps`` command line: its parser and subcommands (the stage scripts' entry: :mod:`virgo_exps.entry`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import yaml

from virgo_exps import dvcrun, fsio
from virgo_exps.cli import scalability as scalability_cli
from virgo_exps.cli import share as share_cli
from virgo_exps.cli import sweep as sweep_cli
from virgo_exps.cli import verify as verify_cli
from virgo_exps.config import ConfigError, Params, as_flat_dict, describe, load_params, params_from_dict, read_yaml
from virgo_exps.entry import stage_main
from virgo_exps.envvars import listing
from virgo_exps.experiments.failures import record
from virgo_exps.gitrun import git
from virgo_exps.paths import (
    CHECKPOINTS_DIR,
    EPOCHS_FILE,
    EPOCHS_PLOT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    REPORT_DIR,
    RUN_FILE,
    TRAIN_LOG,
    main_checkout,
)
from virgo_exps.train.tracking import redact, tracking_uri

RESULTS = {
    "model": MODEL_FILE,
    "metrics (numbers)": METRICS_FILE,
    "run (device, provenance...)": RUN_FILE,
    "per-epoch rows": EPOCHS_FILE,
    "per-epoch rows (dvc plots)": EPOCHS_PLOT_FILE,
    "training log": TRAIN_LOG,
    "report": f"{REPORT_DIR}/report.md",
    "checkpoint": f"{CHECKPOINTS_DIR}/snapshot.pt",
}


def run_pipeline(dvc_args: list[str]) -> int:
    """``dvc exp run`` with a summary: which stages ran, where the results are."""
    refused = _refuse_before_dvc(dvc_args)
    if refused is not None:
        return refused
    # `dvc exp run` records an experiment even when nothing changed; such a row
    # would count as a repeated run. Ask DVC first, and record nothing then.
    if _plain_run(dvc_args) and _up_to_date():
        print(
            "Pipeline is up to date, no experiment recorded (`dvc status`: nothing to reproduce; "
            "the environment was checked and is unchanged)."
        )
        _print_results(main_checkout(), redact(tracking_uri()))
        return 0
    print("$ " + " ".join(["dvc", "exp", "run", *dvc_args]), flush=True)
    proc = dvcrun.start(["exp", "run", *dvc_args])
    ran: list[str] = []
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
        m = re.match(r"Running stage '([^']+)'", line.strip())
        if m:
            ran.append(m.group(1))
    rc = proc.wait()
    if rc != 0:
        text = "".join(lines)
        m = re.search(r"Reproducing experiment '([^']+)'", text)
        kept = record(text, m.group(1) if m else "workspace")
        print(
            f"\npipeline failed (dvc exit code {rc}); output kept in {kept}; stage logs in logs/<stage>/",
            file=sys.stderr,
        )
        return rc
    root = main_checkout()
    work = [s for s in ran if s != "environment"]
    print()
    if not work:
        print("Pipeline is up to date: no stage reran (the environment was checked and is unchanged).")
    else:
        print(f"Stages run: {', '.join(ran)}")
    _print_results(root, redact(tracking_uri()))
    return 0


def _refuse_before_dvc(dvc_args: list[str]) -> int | None:
    """What DVC would refuse only after it has started, or what the first stage would, said first in one
    line (exit 2): git without a user name and email (every experiment is a git commit), and, for a plain
    run (params.yaml as it is), the first stage's checks. None when there is nothing to refuse."""
    from virgo_exps import preflight  # loads the launcher and Slurm's side: `virgo-exps --help` starts without them

    ident = git(None, "var", "GIT_COMMITTER_IDENT", check=False)
    if ident.returncode != 0:
        print(
            "error: git has no user name and email here, and DVC records every experiment as a git commit; "
            'set them once: git config --global user.name "Your Name"; git config --global user.email you@site',
            file=sys.stderr,
        )
        return 2
    if _plain_run(dvc_args):
        try:
            preflight.check("params.yaml")
        except ConfigError as exc:
            return preflight.refuse(exc, "params.yaml")
    return None


# Options of `dvc exp run` that do not change what runs; with any other
# argument (-S, --queue, --force, targets, ...) DVC alone decides.
_PLAIN_OPTIONS = {"-n", "--name", "-m", "--message"}
_PLAIN_FLAGS = {"-q", "--quiet", "-v", "--verbose"}


def _plain_run(dvc_args: list[str]) -> bool:
    i = 0
    while i < len(dvc_args):
        arg = dvc_args[i]
        if arg in _PLAIN_FLAGS:
            i += 1
        elif arg in _PLAIN_OPTIONS:
            i += 2
        elif arg.split("=", 1)[0] in _PLAIN_OPTIONS and "=" in arg:
            i += 1
        else:
            return False
    return True


def _dvc_status() -> dict | None:
    proc = dvcrun.run(["status", "--json"], ".", check=False, timeout=None)
    if proc.returncode != 0:
        return None
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        return None


def _up_to_date() -> bool:
    """True when no stage would rerun: ``dvc status`` is clean but for the always-changed
    environment stage, which is then run on its own; it rewrites ``version.lock`` only when
    the environment changed, and ``dvc status`` is asked again."""

    def pending(status: dict) -> list[str]:
        return [stage for stage, changes in status.items() if [c for c in changes if c != "always changed"]]

    status = _dvc_status()
    if status is None or pending(status):
        return False
    always = [stage for stage in status]
    for stage in always:
        proc = dvcrun.run(["repro", "--single-item", stage], ".", check=False, timeout=None)
        if proc.returncode != 0:
            return False  # let `dvc exp run` show the failure
    status = _dvc_status()
    return status is not None and not pending(status)


def _print_results(root, mlflow_uri: str) -> None:
    print("Results:")
    for what, rel in RESULTS.items():
        mark = "" if (root / rel).exists() else "  (missing)"
        print(f"  {what:28s} {rel}{mark}")
    print(f"  {'MLflow store':28s} {mlflow_uri}")
    print(
        "Next: `dvc exp show`, `dvc plots show`, `dvc exp run -S train.lr=0.0003`, "
        "`mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`, `virgo-exps verify`"
    )


def apply_preset(preset_file: str, params_file: str) -> int:
    """Merge a preset's keys into params.yaml; nothing is written unless the result is valid."""
    preset = read_yaml(preset_file, "preset") or {}
    params = read_yaml(params_file) or {}
    for section, values in preset.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{preset_file}: {section}: expected a mapping")
        params.setdefault(section, {}).update(values)
    params_from_dict(params)
    text = Path(params_file).read_text()
    # Keep the comments and layout of params.yaml: rewrite only the values.
    lines = text.splitlines(keepends=True)
    section = None
    for i, line in enumerate(lines):
        stripped = line.rstrip("\n")
        if stripped and not stripped.startswith((" ", "#")) and stripped.endswith(":"):
            section = stripped[:-1]
        elif section in preset and stripped.startswith("  ") and ":" in stripped:
            key = stripped.strip().split(":", 1)[0]
            if key in preset[section]:
                value = yaml.safe_dump(preset[section][key], default_flow_style=True).strip()
                lines[i] = f"  {key}: {value.removesuffix(chr(10) + '...')}\n"
    with fsio.replacing(params_file) as tmp:
        tmp.write_text("".join(lines))
        if yaml.safe_load(tmp.read_text()) != params:
            raise ConfigError(f"{params_file}: could not merge {preset_file} while keeping the layout; edit it by hand")
    print(f"{params_file}: merged {preset_file}")
    return 0


def main(argv: list[str] | None = None) -> None:
    """The ``virgo-exps`` command; output cut short by its reader (``| head``) ends it quietly."""
    try:
        _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away: nothing more to say, and no traceback for it (Python's own advice:
        # point stdout at /dev/null so that the interpreter's last flush does not fail again).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, as a shell tool cut short by `head` ends


def params_listing(params_path: str = "params.yaml") -> str:
    """`virgo-exps params`: every key with its default, then where this checkout's params file differs."""
    lines = ["Every key of params.yaml with its DEFAULT value, meaning and allowed values.", "", describe()]
    try:
        current = as_flat_dict(load_params(params_path))
    except ConfigError as exc:
        lines += ["", f"{params_path}: not read ({exc})"]
        return "\n".join(lines)
    defaults = as_flat_dict(Params())
    differ = [f"  {k} = {v!r} (default {defaults.get(k)!r})" for k, v in current.items() if defaults.get(k) != v]
    head = f"{params_path} here sets {len(differ)} value(s) other than the default:"
    lines += ["", head if differ else f"{params_path} here holds the defaults.", *differ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``virgo-exps`` command line: every subcommand and option (also read by the test that holds the
    documentation to it)."""
    parser = argparse.ArgumentParser(prog="virgo-exps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("params", help="list every key of params.yaml with its default and allowed values")
    sub.add_parser("env", help="list every VIRGO_* environment variable, who sets it and what it does")
    check = sub.add_parser(
        "check", help="run the first stage's checks (params, machine, disk and memory), write nothing"
    )
    check.add_argument("--params", default="params.yaml")
    preset = sub.add_parser("preset", help="merge a preset (e.g. presets/paper.yaml) into params.yaml, validated")
    preset.add_argument("file")
    preset.add_argument("--params", default="params.yaml")
    run = sub.add_parser("run", help="run the pipeline with `dvc exp run` (extra arguments go to dvc)")
    run.add_argument("dvc_args", nargs=argparse.REMAINDER)
    scalability_cli.add_parser(sub)
    share_cli.add_parser(sub)
    sweep_cli.add_parser(sub)
    verify_cli.add_parser(sub)
    return parser


def _main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        # Everything after `run` belongs to dvc, options included (argparse's
        # REMAINDER would reject a leading `-S`).
        sys.exit(run_pipeline(argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "verify":
        sys.exit(verify_cli.run(args))
    if args.command in share_cli.COMMANDS:
        sys.exit(share_cli.run(args))
    if args.command == "scalability":
        sys.exit(scalability_cli.run(args))
    if args.command == "sweep":
        sys.exit(sweep_cli.run(args))
    if args.command == "run":
        sys.exit(run_pipeline(args.dvc_args))
    if args.command == "preset":
        stage_main(lambda: apply_preset(args.file, args.params), image=False)
    if args.command == "params":
        print(params_listing())
    elif args.command == "env":
        print(listing())
    elif args.command == "check":
        from virgo_exps import preflight  # as in _refuse_before_dvc

        def body():
            # exactly the checks of the pipeline's first stage (stages/environment.py)
            try:
                _params, machine, budget = preflight.check(args.params)
            except ConfigError as exc:
                return preflight.refuse(exc, args.params)
            print(preflight.summary(args.params, machine, budget))

        stage_main(body, image=False)


if __name__ == "__main__":
    main()
