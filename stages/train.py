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

from pathlib import Path

from virgo_exps.train import stage


def models():
    """The Virgo study's side of training: its networks (study/models.py), mean squared error of the
    main channel's patches, AdamW; the rest of training is the machinery's."""
    from torch import nn

    from virgo_exps.study import models as virgo
    from virgo_exps.train.trainer import ModelFactory, adamw

    return ModelFactory(virgo.build_model, code=(Path(virgo.__file__),), loss=nn.MSELoss, optimizer=adamw)


def check(params, args) -> None:
    from virgo_exps.provenance import check_input

    check_input(args.data, args.params)  # the data was made with the params we were given


if __name__ == "__main__":
    stage.main(models, check, __doc__)
