"""Stage 'train': train the model with the strategy and resources of params.yaml.

    python stages/train.py --params params.yaml --data data/images.zarr \\
        --checkpoints checkpoints --model results/model.pt --metrics results/metrics.json \\
        --epochs results/epochs.csv --ranks results/ranks.json

--checkpoints receives the final snapshot of a completed run; an unfinished
run keeps its snapshot in .virgo/snapshots/ of the main checkout (see
virgo_exps.train.trainer), so DVC restoring its outputs never overwrites it.

Without --worker this validates the configuration and starts the training
processes on the active machine (directly, torchrun, horovodrun, or a SLURM
job: see virgo_exps.train.stage); each process runs this script again with --worker.
"""

from virgo_exps.train import stage


def models():
    """The Virgo study's networks (study/models.py); the rest of training is the machinery's."""
    from virgo_exps.study.models import build_model
    from virgo_exps.train.trainer import ModelFactory

    return ModelFactory(build_model)


def check(params, args) -> None:
    from virgo_exps.provenance import check_input

    check_input(args.data, args.params)  # the data was made with the params we were given


if __name__ == "__main__":
    stage.main(models, check, __doc__)
