"""Stage 'preprocess': Q-transform images, patches, split and normalisation.

python stages/preprocess.py --params params.yaml --in data/raw.zarr --out data/images.zarr
"""

import argparse
from pathlib import Path

from virgo_exps.config import load_params
from virgo_exps.entry import stage_main


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--in", dest="source", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_params(args.params).preprocess
    from virgo_exps.provenance import check_input

    check_input(args.source, args.params)  # the store was made with the generate params we were given
    from virgo_exps.study.preprocess import preprocess

    preprocess(args.source, cfg, args.out, workers=cfg.workers or None, device=cfg.device)  # prints its summary
    from virgo_exps.stagelog import output_line

    print(output_line("preprocess", args.out, inputs=(args.source,)), flush=True)
    return 0


if __name__ == "__main__":
    stage_main(run, log="preprocess")
