"""index.html of the scalability report: summary table, notes, figures, experiments and their params.

One self-contained page; figures are referenced by relative path so the
folder can be copied or served as it is.
"""

from __future__ import annotations

import html

import pandas as pd

from virgo_exps.scalability.summary import cost_line

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 48%; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; }
.notes li { margin: 0.3em 0; }
dt { font-weight: bold; font-family: monospace; }
dd { margin: 0 0 0.5em 1.5em; }
tr.flagged td { background: #fff0e0; }
td.flag { color: #b00; font-weight: bold; }
.origin { color: #555; font-size: 0.9em; }
.split { background: #fff8d0; padding: 0.4em 0.6em; border-left: 4px solid #d8b400; }
"""


def _e(v) -> str:
    return html.escape("-" if v is None else str(v))


def _table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p>(none)</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    flag_col = list(df.columns).index("flags") if "flags" in df.columns else None
    rows = []
    for row in df.itertuples(index=False):
        flagged = flag_col is not None and bool(row[flag_col])
        cells = "".join(
            f'<td class="flag">{_e(_cell(v))}</td>' if flagged and i == flag_col else f"<td>{_e(_cell(v))}</td>"
            for i, v in enumerate(row)
        )
        rows.append(('<tr class="flagged">' if flagged else "<tr>") + cells + "</tr>")
    body = "\n".join(rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _cell(v):
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def render(
    report, plots, skipped, title: str, summary: pd.DataFrame, definitions: dict[str, str], origin: str = ""
) -> str:
    n_groups = report.groups["series"].nunique() if not report.groups.empty else 0
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="origin">From: {_e(origin)}</p>',
        f"<p>Source: {_e(', '.join(report.sources) or 'runs given')}. "
        f"{len(report.experiments)} experiment(s) in {n_groups} group(s) and {len(report.groups)} configuration(s). "
        "Runs are pooled only when everything but the seed and the scaling axis (nodes, processes per node) is "
        "equal: parameters, machine, device, software (version.lock) and data.</p>",
    ]
    if report.split_on:
        parts.append(
            '<p class="split">Not all experiments are comparable; separate groups on: '
            + "; ".join(f"<b>{_e(k)}</b> ({_e(', '.join(v))})" for k, v in report.split_on.items())
            + ".</p>"
        )
    if not report.groups.empty:
        modes = dict(zip(report.groups["series"], report.groups["scaling"]))
        if len(set(modes.values())) == 1:
            parts.append(f"<p>Scaling: {_e(next(iter(modes.values())))} in every group.</p>")
        else:
            parts.append("<p>Scaling: " + "; ".join(f"<b>{_e(s)}</b>: {_e(m)}" for s, m in modes.items()) + ".</p>")
    parts += ["<h2>Summary</h2>", _table(summary)]
    if getattr(report, "cost", None):
        parts.append(f'<p class="cost">{_e(cost_line(report.cost))}.</p>')
    if not report.groups.empty:
        bases = dict(zip(report.groups["series"], report.groups["baseline"]))
        parts.append(
            "<p>Speedup baselines (smallest world size within each group): "
            + "; ".join(f"<b>{_e(s)}</b> &rarr; {_e(b.split(' @ ', 1)[1])}" for s, b in bases.items())
            + "</p>"
        )
        flagged = [n for n in report.notes if n.startswith("FLAG ")]
        if flagged:
            parts += ["<h2>Flags</h2>", '<ul class="notes">']
            parts += [f'<li class="flag">{_e(n[5:])}</li>' for n in flagged]
            parts.append("</ul>")
    if report.notes:
        parts += ["<h2>Notes</h2>", '<ul class="notes">']
        parts += [f"<li>{_e(n)}</li>" for n in report.notes]
        parts.append("</ul>")
    parts.append("<h2>Figures</h2>")
    for p in plots:
        parts.append(
            f'<figure><img src="{_e(p.file)}" alt="{_e(p.title)}">'
            f"<figcaption><b>{_e(p.title)}.</b> {_e(p.caption)}</figcaption></figure>"
        )
    if not plots:
        parts.append("<p>No figures: nothing to plot.</p>")
    if skipped:
        parts += ["<p>Figures not drawn:</p>", "<ul>"]
        parts += [f"<li><b>{_e(t)}</b>: {_e(why)}</li>" for t, why in skipped]
        parts.append("</ul>")
    parts += ["<h2>What the numbers mean</h2>", "<dl>"]
    parts += [f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in definitions.items()]
    parts.append("</dl>")
    parts += [
        "<h2>Experiments</h2>",
        "<p>One row per run; parameters that differ between experiments are shown as columns.</p>",
        _table(report.experiments),
    ]
    if report.common:
        common = pd.DataFrame({"parameter": list(report.common), "value": [report.common[k] for k in report.common]})
        parts += ["<h3>Parameters shared by all experiments</h3>", _table(common)]
    parts += [
        '<p>Files: <a href="scalability.csv">scalability.csv</a>, '
        '<a href="scalability.json">scalability.json</a>, <a href="console.txt">console.txt</a></p>',
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"
