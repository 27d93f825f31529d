"""Stage 'report': loss curves (PNG) and a Markdown summary of this experiment.

    python stages/report.py --params params.yaml --metrics results/metrics.json \\
        --epochs results/epochs.csv --model results/model.pt --data data/images.zarr \\
        --version-lock version.lock --out results/report

Without --model and --data the reference losses and the validation images are left out.
"""

import argparse
from pathlib import Path

from virgo_exps.config import load_params
from virgo_exps.entry import stage_main


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--epochs", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="the trained model (results/model.pt)")
    parser.add_argument("--data", type=Path, help="the preprocessed store (data/images.zarr)")
    parser.add_argument("--version-lock", type=Path, help="the software versions (version.lock)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = load_params(args.params).report
    from virgo_exps.provenance import check_metrics

    check_metrics(args.metrics, args.params)  # the metrics were made with the train params we were given
    from virgo_exps.config import DamagedInputError
    from virgo_exps.provenance import read_metrics
    from virgo_exps.train.outcome import metrics_refusal

    why = metrics_refusal(read_metrics(args.metrics))
    if why:  # the one rule of what a successful run is: a report of no result is no report
        raise DamagedInputError(f"{args.metrics}: not a successful run's result: {why}; rerun the train stage")
    from virgo_exps.paths import experiment_name
    from virgo_exps.study.report import build

    if (args.model is None) != (args.data is None):
        parser.error("--model and --data: give both (for the reference losses and images) or neither")
    for option, path in (("--model", args.model), ("--data", args.data), ("--version-lock", args.version_lock)):
        if path is not None and not path.exists():
            parser.error(f"{option}: {path} does not exist; run the stage that writes it first (dvc repro)")
    path = build(
        args.metrics,
        args.epochs,
        args.out,
        cfg.title,
        experiment_name(),
        params_path=Path(args.params),
        model_path=args.model,
        data_path=args.data,
        lock_path=args.version_lock,
    )
    print(f"report: wrote {path}", flush=True)
    from virgo_exps import fsio, stagelog

    log = stagelog.current()
    if log is not None:  # the report's own log goes with it (git holds results/report)
        fsio.write_bytes(args.out / "report.log", stagelog.public(log.text().encode()))
    return 0


if __name__ == "__main__":
    stage_main(run, log="report")
