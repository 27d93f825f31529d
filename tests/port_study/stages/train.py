"""Stage 'train': the machinery's trainer with the sequence study's model factory.

    python stages/train.py --params params.yaml --data data/sequences.zarr --checkpoints checkpoints \\
        --model results/model.pt --metrics results/metrics.json --epochs results/epochs.csv \\
        --ranks results/ranks.json --log results/train.log
"""

from virgo_exps.provenance import check_input
from virgo_exps.study.models import factory
from virgo_exps.train import stage


def check(params, args) -> None:
    check_input(args.data, args.params)  # the data was made with the params we were given


if __name__ == "__main__":
    stage.main(factory, check, __doc__)
