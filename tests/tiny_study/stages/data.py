"""Stage 'data': write the split store the trainer reads (<split>/x, <split>/y), published atomically."""

import argparse
from pathlib import Path

import zarr
from tiny import load_study, make_splits

from virgo_exps import store
from virgo_exps.cli.main import stage_main


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--study", default="study.yaml")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_study(args.study)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = store.partial_path(args.out)
    group = zarr.open_group(str(partial), mode="w")
    for split, (x, y) in make_splits(cfg).items():
        for name, a in (("x", x), ("y", y)):
            group.create_array(f"{split}/{name}", data=a, chunks=(16, *a.shape[1:]), compressors=store.compressors())
    group.attrs["complete"] = True
    store.publish(partial, args.out)
    print(f"data: wrote {args.out} ({cfg.n_samples} samples)")
    return 0


if __name__ == "__main__":
    stage_main(run)
