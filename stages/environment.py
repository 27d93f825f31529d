"""Stage 'environment': write version.lock (the environment that produces the results).

    python stages/environment.py --params params.yaml --out version.lock

It also validates params.yaml and the machine profile, so that a bad value
stops the pipeline before any other stage writes anything.
"""

import argparse
import os
from pathlib import Path

from virgo_exps.cli import stage_main
from virgo_exps.config import load_params
from virgo_exps.environment import collect, render


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    load_params(args.params)
    text = render(collect())
    if args.out.exists() and args.out.read_text() == text:
        print(f"environment: {args.out} unchanged")
        return 0
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(f"environment: wrote {args.out}")
    return 0


if __name__ == "__main__":
    stage_main(run)
