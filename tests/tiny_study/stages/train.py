"""Stage 'train' of the tiny study: virgo_exps' launcher and trainer with this study's model factory.

Without --worker: check the params against the machine and start the workers there
(directly, torchrun, or a SLURM job); each worker runs this script with --worker.
"""

from pathlib import Path

from tiny import MODELS, build

from virgo_exps.config import ConfigError
from virgo_exps.train import stage


def models():
    from virgo_exps.train.trainer import ModelFactory

    return ModelFactory(build, code=(Path("stages/tiny.py"),))


def check(params, args) -> None:
    from virgo_exps import preflight
    from virgo_exps.machines import load_machine

    if params.train.model not in MODELS:
        raise ConfigError(f"train.model: {params.train.model!r} is not allowed; expected one of {MODELS}")
    preflight.check_machine(params, load_machine())


if __name__ == "__main__":
    stage.main(models, check, __doc__)
