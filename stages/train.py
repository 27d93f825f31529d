"""Stage 'train': train the model with the strategy and resources of params.yaml.

    python stages/train.py --params params.yaml --data data/images.zarr \\
        --checkpoints checkpoints --model results/model.pt --metrics results/metrics.json \\
        --epochs results/epochs.csv --ranks results/ranks.json

--checkpoints receives the final snapshot of a completed run; an unfinished
run keeps its snapshot in .virgo/snapshots/ of the main checkout (see
virgo_exps.train.trainer), so DVC restoring its outputs never overwrites it.

Without --worker this validates the configuration and starts the training
processes on the active machine (directly, torchrun, horovodrun, or a SLURM
job: see virgo_exps.launch.launcher); each process runs this script again with --worker.
"""

import argparse
import sys
from pathlib import Path

from virgo_exps.cli.main import stage_main, worker_main
from virgo_exps.config import load_params

OUTPUTS = ("checkpoints", "model", "metrics", "epochs", "ranks")


def parse():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True)
    for name in OUTPUTS:
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--worker", action="store_true", help="run as one training process")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return parser.parse_args()


def launch(args) -> int:
    from virgo_exps.launch import launcher
    from virgo_exps.launch.job import JobSpec
    from virgo_exps.launch.protocol import WorkerFiles

    params = load_params(args.params)
    from virgo_exps.provenance import check_input

    check_input(args.data, args.params)  # the data was made with the params we were given
    # The workers run this same script, from the same directory, with --worker.
    argv = [sys.argv[0], *sys.argv[1:], "--worker"]
    files = WorkerFiles(params=args.params, checkpoints=str(args.checkpoints))
    return launcher.launch(JobSpec.training("train", argv, params.train, files))


def work(args, strategy_box) -> int:
    from virgo_exps.study.models import build_model
    from virgo_exps.train.strategies import get_strategy
    from virgo_exps.train.tracking import Tracker
    from virgo_exps.train.trainer import EXIT_INTERRUPTED, Interrupted, ModelFactory, Trainer, TrainOutputs

    params = load_params(args.params)
    strategy = get_strategy(params.train.strategy)
    strategy_box.append(strategy)
    strategy.init()
    outputs = TrainOutputs(**{name: getattr(args, name) for name in OUTPUTS})
    # The study's networks; the rest of training is the machinery's (virgo_exps.train).
    models = ModelFactory(build_model)
    trainer = Trainer(params, strategy, args.data, outputs, Tracker(enabled=not args.no_tracking), models)
    try:
        trainer.fit()
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
