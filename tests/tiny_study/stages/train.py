"""Stage 'train' of the tiny study: virgo_exps' launcher and trainer with this study's model factory.

Without --worker: check the params against the machine and start the workers there
(directly, torchrun, or a SLURM job); each worker runs this script with --worker.
"""

import argparse
import sys
from pathlib import Path

from tiny import MODELS, build

from virgo_exps.cli.main import stage_main, worker_main
from virgo_exps.config import ConfigError, load_params

OUTPUTS = ("checkpoints", "model", "metrics", "epochs", "ranks")


def parse():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    for name in OUTPUTS:
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--worker", action="store_true")
    return parser.parse_args()


def launch(args) -> int:
    from virgo_exps import preflight
    from virgo_exps.launch import launcher
    from virgo_exps.launch.job import JobSpec
    from virgo_exps.launch.protocol import WorkerFiles
    from virgo_exps.machines import load_machine

    params = load_params(args.params)
    if params.train.model not in MODELS:
        raise ConfigError(f"train.model: {params.train.model!r} is not allowed; expected one of {MODELS}")
    preflight.check_machine(params, load_machine())
    argv = [sys.argv[0], *sys.argv[1:], "--worker"]
    files = WorkerFiles(params=str(args.params), checkpoints=str(args.checkpoints))
    return launcher.launch(JobSpec.training("train", argv, params.train, files))


def work(args, box) -> int:
    from virgo_exps.launch.protocol import EXIT_INTERRUPTED
    from virgo_exps.train.strategies import get_strategy
    from virgo_exps.train.tracking import Tracker
    from virgo_exps.train.trainer import Interrupted, ModelFactory, Trainer, TrainOutputs

    params = load_params(args.params)
    strategy = get_strategy(params.train.strategy)
    box.append(strategy)
    strategy.init()
    outputs = TrainOutputs(**{name: getattr(args, name) for name in OUTPUTS})
    models = ModelFactory(build, code=(Path("stages/tiny.py"),))
    try:
        Trainer(params, strategy, args.data, outputs, Tracker(enabled=True), models).fit()
    except Interrupted:
        return EXIT_INTERRUPTED
    finally:
        strategy.shutdown()
    return 0


if __name__ == "__main__":
    args = parse()
    if args.worker:
        box = []
        worker_main(lambda: work(args, box), lambda: box[0].rank if box else -1)
    else:
        stage_main(lambda: launch(args))
