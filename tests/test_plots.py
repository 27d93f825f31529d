"""`dvc plots show` draws exactly the plots of dvc.yaml, every axis labelled (real dvc)."""

from __future__ import annotations

import json

from conftest import BIN, make_repo, sh

COLUMNS = ("epoch", "step", "train_loss", "val_loss", "train_time_s", "val_time_s", "samples_per_s", "lr", "load_avg")


def _encodings(node):
    """Every x/y encoding of a vega-lite spec, wherever its layers put them."""
    if isinstance(node, dict):
        enc = node.get("encoding")
        if isinstance(enc, dict):
            for axis in ("x", "y"):
                if isinstance(enc.get(axis), dict):
                    yield axis, enc[axis]
        for value in node.values():
            yield from _encodings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _encodings(value)


def test_only_the_intended_plots_with_labelled_axes(tmp_path):
    repo = make_repo(tmp_path / "repo")
    rows = [dict(zip(COLUMNS, (e, 4 * e, 0.9 - e / 10, 0.8 - e / 10, 1.5, 0.2, 120.0, 0.001, 0.5))) for e in (1, 2, 3)]
    (repo / "results").mkdir(exist_ok=True)
    (repo / "results" / "epochs.json").write_text(json.dumps(rows))  # as the trainer writes it, beside epochs.csv
    shown = json.loads(sh([str(BIN / "dvc"), "plots", "show", "--json"], repo).stdout)["data"]
    # Numbers reach the plots as numbers (from a CSV file, DVC gives every value as a string).
    for name, [plot] in shown.items():
        for value in plot["content"]["data"]["values"]:
            assert all(isinstance(value[c], (int, float)) for c in COLUMNS), (name, value)
    # No default plot of the file's last column (lr against the row number) beside them.
    assert sorted(shown) == ["Epoch time (s)", "Loss", "Throughput (samples/s)"]
    expected_y = {
        "Loss": "MSE loss (normalised units)",
        "Epoch time (s)": "time per epoch (s)",
        "Throughput (samples/s)": "training samples per second",
    }
    for name, [plot] in shown.items():
        titles = {}
        for axis, enc in _encodings(plot["content"]):
            if enc.get("field") and enc.get("type") == "quantitative":
                titles.setdefault(axis, enc.get("title"))
        assert titles == {"x": "epoch", "y": expected_y[name]}, (name, titles)
