"""Stage 'report': the sequence study's per-experiment report.

    python stages/report.py --params params.yaml --metrics results/metrics.json --epochs results/epochs.csv \\
        --out results/report
"""

import argparse
from pathlib import Path

from virgo_exps.config import DamagedInputError, load_params
from virgo_exps.entry import stage_main
from virgo_exps.provenance import check_metrics, read_metrics
from virgo_exps.study.report import build
from virgo_exps.train.outcome import metrics_refusal


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--epochs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    check_metrics(args.metrics, args.params)
    why = metrics_refusal(read_metrics(args.metrics))
    if why:
        raise DamagedInputError(f"{args.metrics}: not a successful run's result: {why}; rerun the train stage")
    path = build(args.metrics, args.epochs, args.out, load_params(args.params).report.title)
    print(f"report: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    stage_main(run, log="report")
