"""Stage 'data': the labelled sequences, as the split store the trainer reads.

python stages/data.py --params params.yaml --out data/sequences.zarr
"""

import argparse
from pathlib import Path

from virgo_exps.config import as_flat_dict, load_params
from virgo_exps.entry import stage_main
from virgo_exps.study.data import write


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    params = load_params(args.params)
    write(params.sequences, as_flat_dict(params), args.out)
    print(f"data: wrote {args.out} ({params.sequences.n_samples} sequences)", flush=True)
    return 0


if __name__ == "__main__":
    stage_main(run, log="data")
