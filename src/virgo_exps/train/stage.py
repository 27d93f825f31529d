"""A train stage's entry point, the same for every study.

A study's ``stages/train.py`` says only what is its own, its networks and
what to check before starting::

    from virgo_exps.train import stage

    def models():  # called in each worker: the networks, their code, the loss and the optimiser
        return ModelFactory(build_model, code=(Path("my_study/models.py"),), loss=nn.MSELoss, optimizer=adamw)

    if __name__ == "__main__":
        stage.main(models, check=None, description=__doc__)

Without ``--worker`` the script loads the params, runs ``check(params, args)``
and starts the workers on the active machine through the one launcher
(directly, torchrun, horovodrun, or a SLURM job); each worker runs the same
script with ``--worker`` and trains with the strategy of ``train.strategy``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virgo_exps import fsio, stagelog
from virgo_exps.config import Params, load_params
from virgo_exps.entry import stage_main, worker_main
from virgo_exps.launch import launcher
from virgo_exps.launch.job import JobSpec
from virgo_exps.launch.protocol import EXIT_INTERRUPTED, WorkerFiles, recorded_logs
from virgo_exps.train import outcome
from virgo_exps.train.tracking import Tracker

OUTPUTS = ("checkpoints", "model", "metrics", "epochs", "ranks")


def parse(description: str | None = None, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    for name in OUTPUTS:
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument(
        "--log", type=Path, help="copy the training's log (every job or run of it) here when it succeeds"
    )
    parser.add_argument("--worker", action="store_true", help="run as one training process")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser.parse_args(argv)


def launch(args: argparse.Namespace, check: Callable[[Params, argparse.Namespace], None] | None) -> int:
    params = load_params(args.params)
    if check is not None:
        check(params, args)
    # The workers run this same script, from the same directory, with --worker, and without --log: only
    # this process keeps the log (and torchrun would read `--log` as an abbreviation of its --log-dir).
    argv = [sys.argv[0], *_without_log(sys.argv[1:]), "--worker"]
    files = WorkerFiles(params=str(args.params), checkpoints=str(args.checkpoints))
    rc = launcher.launch(JobSpec.training("train", argv, params.train, files))
    if rc == 0 and args.log is not None:
        keep_log(args.log, args.data)
    return rc


def _without_log(args: list[str]) -> list[str]:
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--log":
            skip = True
        elif not arg.startswith("--log="):
            out.append(arg)
    return out


def keep_log(target: Path, data: Path | None = None) -> None:
    """The logs of the data stages that made ``data`` (:func:`virgo_exps.stagelog.data_logs`), then those
    of the training's runs or jobs, one after the other, as an output of the stage: git holds it with the
    experiment's metrics, so `dvc exp push/pull` carries it to the team."""
    logs = (stagelog.data_logs(data) if data is not None else []) + recorded_logs()
    fsio.write_bytes(target, stagelog.public(stagelog.joined(logs)))


def work(args: argparse.Namespace, models: Callable[[], Any], strategy_box: list) -> int:
    # torch: only the training processes (--worker) load these, not the process that starts them
    from virgo_exps.train.strategies import get_strategy
    from virgo_exps.train.trainer import Interrupted, Trainer, TrainOutputs  # torch, as above

    params = load_params(args.params)
    strategy = get_strategy(params.train.strategy, params.train)
    strategy_box.append(strategy)
    try:
        strategy.init()
    except outcome.RunFailed as exc:  # said by the rank that found it, whichever it is
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return outcome.EXIT_FAILED_RUN
    outputs = TrainOutputs(**{name: getattr(args, name) for name in OUTPUTS})
    trainer = Trainer(params, strategy, args.data, outputs, Tracker(enabled=not args.no_tracking), models())
    try:
        trainer.fit()
    except Interrupted:
        return EXIT_INTERRUPTED
    except outcome.RunFailed as exc:
        if strategy.rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return outcome.EXIT_FAILED_RUN
    finally:
        strategy.shutdown()
    return 0


def main(
    models: Callable[[], Any],
    check: Callable[[Params, argparse.Namespace], None] | None = None,
    description: str | None = None,
) -> None:
    """Run the train stage: ``models()`` gives the study's :class:`~virgo_exps.train.factory.ModelFactory`."""
    args = parse(description)
    if args.worker:
        box: list = []
        worker_main(lambda: work(args, models, box), lambda: box[0].rank if box else -1)
    else:
        stage_main(lambda: launch(args, check))
