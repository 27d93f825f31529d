"""Stage 'generate': synthetic main + auxiliary channels into a zarr store.

    python stages/generate.py --params params.yaml --out data/raw.zarr
"""

import argparse
from pathlib import Path

from virgo_exps.cli import stage_main
from virgo_exps.config import load_params


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_params(args.params).generate
    from virgo_exps.data.generate import estimate, generate

    print(f"generate: {estimate(cfg)['summary']}", flush=True)
    generate(cfg, args.out)
    return 0


if __name__ == "__main__":
    stage_main(run)
