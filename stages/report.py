"""Stage 'report': loss curves (PNG) and a Markdown summary of this experiment.

    python stages/report.py --params params.yaml --metrics results/metrics.json \\
        --epochs results/epochs.csv --out results/report
"""

import argparse
from pathlib import Path

from virgo_exps.cli import stage_main
from virgo_exps.config import load_params


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--epochs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_params(args.params).report
    from virgo_exps.provenance import check_metrics

    check_metrics(args.metrics, args.params)  # the metrics were made with the train params we were given
    from virgo_exps.paths import experiment_name
    from virgo_exps.report import build

    path = build(args.metrics, args.epochs, args.out, cfg.title, experiment_name())
    print(f"report: wrote {path}")
    return 0


if __name__ == "__main__":
    stage_main(run)
