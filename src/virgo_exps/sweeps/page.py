"""The page of a search sweep: how the search went, what mattered, the best trial and what it all cost.

:func:`build` writes ``index.html`` and its PNGs into one folder (figures by relative path, so the folder
can be copied or served as it is): the optimisation history, the parameter importances (they need at
least two complete trials; the page says so when there are fewer), the parallel coordinates of the
trials, each trial's validation loss epoch by epoch (pruned ones stop early), every trial with its
state, value, parameters and cost, the best trial with the ``dvc exp apply`` line that brings it into
the workspace, and the total cost. The figures are Optuna's own (``optuna.visualization.matplotlib``)
drawn from the sweep's journal.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from virgo_exps import fsio
from virgo_exps.scalability.html import STYLE as REPORT_STYLE
from virgo_exps.sweeps import search
from virgo_exps.sweeps.spec import SweepSpec, trial_name
from virgo_exps.sweeps.status import reconcile
from virgo_exps.sweeps.submit import SWEEP_FILE

DPI = 110
# The cost columns of a trial (keys of metrics.json's "cost", kept by search.tell as the "cost" attr).
COST_KEYS = (("wall_s", "wall s"), ("core_h", "core-h"), ("gpu_h", "GPU-h"), ("energy_wh", "energy Wh"))
# The scalability page's look, and what this page adds: command lines, notes, the best trial's row.
STYLE = (
    REPORT_STYLE
    + """
pre { background: #f6f6f6; padding: 0.5em 0.8em; }
.note { background: #fff8d0; padding: 0.4em 0.6em; border-left: 4px solid #d8b400; }
tr.best td { background: #e8f6e8; }
"""
)


def _e(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "-"
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def _figure(draw, path: Path) -> str | None:
    """Draw one of Optuna's matplotlib plots into ``path``; None and the reason when it cannot be drawn."""
    plt.close("all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        try:
            ax = draw()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            return f"{type(exc).__name__}: {exc}"
    axes = ax if not hasattr(ax, "figure") else [ax]
    fig = next(iter(getattr(axes, "flat", axes))).figure
    fig.set_size_inches(7.5, 4.8)
    fig.tight_layout()
    with fsio.replacing(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return None


def _log_if_wide(ax, trials):
    """A log y axis when the losses span more than two decades (a diverged trial would flatten the rest)."""
    values = [v for t in trials for v in t.intermediate_values.values() if v == v and abs(v) != float("inf")]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    return ax


def _cost(trial) -> dict[str, Any]:
    cost = trial.user_attrs.get("cost")
    return cost if isinstance(cost, dict) else {}


def _pruned_epoch(trial) -> int | None:
    if trial.state.name != "PRUNED":
        return None
    if trial.user_attrs.get("pruned_at_epoch") is not None:
        return trial.user_attrs["pruned_at_epoch"]
    return max(trial.intermediate_values) if trial.intermediate_values else None


# Fewer complete trials than this: the importances are drawn with a word of caution.
FEW_TRIALS = 10


def build(spec: SweepSpec, sweep_dir: Path, out_dir: Path) -> Path:
    """Write the sweep's page into ``out_dir``; return the path of its index.html."""
    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    st = None
    if (Path(sweep_dir) / SWEEP_FILE).is_file():  # an array's sweep: its tasks' records are the truth
        st = reconcile(sweep_dir)
    study = search.open_study(spec, sweep_dir)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    counts = {s: sum(1 for t in trials if t.state.name.lower() == s) for s in ("complete", "pruned", "fail", "running")}
    target_name = spec.metric

    figures: list[tuple[str, str, str | None]] = []  # (file, caption, why it is missing)
    if complete:
        why = _figure(lambda: ovm.plot_optimization_history(study, target_name=target_name), out_dir / "history.png")
    else:
        why = "no complete trial yet"
    figures.append(("history.png", f"{target_name} of each complete trial and the best so far", why))
    if len(complete) >= 2:
        why = _figure(lambda: ovm.plot_param_importances(study, target_name=target_name), out_dir / "importances.png")
    else:
        why = f"parameter importances need at least 2 complete trials; this sweep has {len(complete)}"
    caption = f"how much each parameter explains of {target_name}, from {len(complete)} complete trial(s)"
    if 2 <= len(complete) < FEW_TRIALS:
        caption += f": only {len(complete)}, a rough indication until the sweep has {FEW_TRIALS} or more"
    figures.append(("importances.png", caption, why))
    if complete:
        why = _figure(lambda: ovm.plot_parallel_coordinate(study, target_name=target_name), out_dir / "parallel.png")
    else:
        why = "no complete trial yet"
    figures.append(("parallel.png", f"parameters of the complete trials, coloured by {target_name}", why))

    reported = [t for t in trials if t.intermediate_values]
    if reported:
        why = _figure(lambda: _log_if_wide(ovm.plot_intermediate_values(study), reported), out_dir / "epochs.png")
    else:
        why = "no trial has reported an epoch yet"
    figures.append(("epochs.png", "validation loss after each epoch of every trial (pruned ones end early)", why))

    best = None
    if complete:
        pick = min if spec.direction == "minimize" else max
        best = pick(complete, key=lambda t: t.value)

    keys = list(spec.space)
    head = ["trial", "experiment", "state", target_name, *keys, "pruned at epoch", *(label for _, label in COST_KEYS)]
    rows = []
    totals = dict.fromkeys(k for k, _ in COST_KEYS)
    for t in trials:
        cost = _cost(t)
        for k, _ in COST_KEYS:
            if isinstance(cost.get(k), int | float):
                totals[k] = (totals[k] or 0.0) + cost[k]
        cells = [
            t.number,
            t.user_attrs.get("experiment", trial_name(spec.name, t.number)),
            t.state.name.lower(),
            t.value,
            *(t.params.get(k) for k in keys),
            _pruned_epoch(t),
            *(cost.get(k) for k, _ in COST_KEYS),
        ]
        css = ' class="best"' if best is not None and t.number == best.number else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    table = (
        "<table><thead><tr>"
        + "".join(f"<th>{_e(h)}</th>" for h in head)
        + "</tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )

    parts = [
        "<!doctype html>",
        '<html><head><meta charset="utf-8">',
        f"<title>Sweep {_e(spec.name)}</title><style>{STYLE}</style></head><body>",
        f"<h1>Sweep {_e(spec.name)}</h1>",
        f"<p>{_e(spec.direction)} <b>{_e(target_name)}</b> over {len(keys)} parameter(s); "
        f"{len(trials)} of {spec.trials} trial(s) asked: {counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['fail']} failed, {counts['running']} running. Sampler {_e(spec.sampler)}, "
        f"pruner {_e(spec.pruner)}.</p>",
        "<h2>Best trial</h2>",
    ]
    if best is None:
        parts.append('<p class="note">No complete trial yet.</p>')
    else:
        exp = best.user_attrs.get("experiment", trial_name(spec.name, best.number))
        params = ", ".join(f"{k} = {best.params[k]}" for k in keys if k in best.params)
        parts += [
            f"<p>Trial {best.number} ({_e(exp)}): {_e(target_name)} = {_e(best.value)} with {_e(params)}.</p>",
            "<p>To bring it into the workspace:</p>",
            f"<pre>dvc exp apply {_e(exp)}</pre>",
        ]
    parts.append("<h2>Figures</h2>")
    for name, caption, why in figures:
        if why is None:
            parts.append(
                f'<figure><img src="{name}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>'
            )
        else:
            parts.append(f'<p class="note">{_e(caption)}: not drawn, {_e(why)}.</p>')
    total = ", ".join(f"{_e(totals[k])} {label}" for k, label in COST_KEYS if totals[k] is not None)
    parts += [
        "<h2>Trials</h2>",
        table,
        "<h2>Cost</h2>",
        f"<p>The trainings of all trials (pruned and failed ones included): {total or 'no cost recorded'}.</p>",
    ]
    if st is not None and st.cost.get("attempts"):  # the same figures as `sweep status` (status.status)
        lost = st.cost["unmeasured"]
        parts.append(
            f"<p>Allocated to the array's tasks: {_e(st.cost['alloc_core_h'])} core-hours over "
            f"{st.cost['attempts']:.0f} task attempt(s), failed trials included"
            + (f"; {lost:.0f} attempt(s) killed without notice are not counted" if lost else "")
            + ".</p>"
        )
    parts.append("</body></html>")
    index = out_dir / "index.html"
    fsio.write_text(index, "\n".join(parts) + "\n")
    return index


__all__ = ["build"]
