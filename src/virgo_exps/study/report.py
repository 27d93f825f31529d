"""The per-experiment report: training curves as PNG and a summary in Markdown.

Besides the curves it records what the run was (every param as used, the git
revision, ``version.lock``) and what its losses mean: the validation loss of
predicting the training mean of ``y`` and of the untrained network (the
initialisation of ``train.seed``), both drawn as reference lines on the loss
figure, and a panel of true and predicted main-channel images of the best and
the worst validation samples.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import yaml

matplotlib.use("Agg")
# Labels, titles and stamps carry names from params and experiments: a `$` in them is text, not TeX math.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402

from virgo_exps import fsio  # noqa: E402
from virgo_exps.gitrun import git  # noqa: E402
from virgo_exps.modelfile import load_model  # noqa: E402
from virgo_exps.provenance import flatten, read_metrics, used_params  # noqa: E402
from virgo_exps.store import read  # noqa: E402
from virgo_exps.study.models import build_model  # noqa: E402

# The network-based reference losses and the examples look at this many
# validation samples at most (on the CPU): the whole split of the default data,
# a fixed prefix of a paper-scale one (the report says so).
MAX_EVAL_SAMPLES = 2048
EXAMPLES = 3  # best and worst samples each in the images panel
WARMUP_EPOCH = 1  # excluded from the timing figures' medians


def _one_line(value) -> str:
    """``value`` as one line of printable text: line breaks and other control characters become spaces."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return " ".join(text.split())


def md_text(value) -> str:
    """Text from params or a run as literal Markdown: one line, HTML escaped, markup characters backslashed.

    A line break in ``report.title`` would start a new block (a second heading, a raw
    ``<script>`` line); ``<``, ``>`` and ``&`` would be read as HTML.
    """
    text = html.escape(_one_line(value), quote=False)
    return re.sub(r"([\\`*_\[\]{}#|!~])", r"\\\1", text)


def md_code(value) -> str:
    """``value`` as a Markdown code span (literal, also for ``<``): fenced by more backticks than it holds."""
    text = _one_line(value)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _fmt(v) -> str:
    if v is None:
        return "not measured"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _flat(metrics: dict, prefix: str = "") -> dict:
    """Nested metrics (the ``cost`` figures) as ``cost.core_h`` rows."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(value: float, _pos=None) -> str:
    return f"{value:g}"


def _plot(
    df: pd.DataFrame,
    columns: list[str],
    ylabel: str,
    title: str,
    path: Path,
    log: bool = False,
    references: dict[str, float] | None = None,
    from_zero: bool = False,
    warmup: bool = False,
) -> None:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if warmup and (df["epoch"] == WARMUP_EPOCH).any():
        ax.axvspan(WARMUP_EPOCH - 0.5, WARMUP_EPOCH + 0.5, color="0.85", label="warm-up epoch (not timed)")
    for col in columns:
        ax.plot(df["epoch"], df[col], marker="o", label=col)
    for (name, value), style in zip((references or {}).items(), ("--", ":", "-.")):
        ax.axhline(value, color="0.35", linestyle=style, linewidth=1.2, label=f"{name} ({value:.4g})")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    values = [float(v) for col in columns for v in df[col] if pd.notna(v)] + list((references or {}).values())
    positive = [v for v in values if v > 0]
    if log and positive:
        ax.set_yscale("log")
        # plain numbers at 1-9 x 10^k within a decade, at 1, 2, 5 x 10^k over several
        subs = range(1, 10) if max(positive) / min(positive) < 10 else (1.0, 2.0, 5.0)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=tuple(float(v) for v in subs)))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(NullFormatter())
    if from_zero:
        ax.set_ylim(bottom=0, top=1.15 * max(values) if values and max(values) > 0 else None)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------
# What the run was: params, git revision, software
# --------------------------------------------------------------------------

# Files DVC itself rewrites in a run: a difference there (or in an output of
# a stage) is not a change of the code or params the run was made with.
_PIPELINE_FILES = ("dvc.lock", ".gitignore")


def _stage_outputs(repo: Path) -> list[str]:
    """The outputs of every stage of ``repo/dvc.yaml`` (git-tracked ones change in every run)."""

    try:
        stages = (yaml.safe_load((Path(repo) / "dvc.yaml").read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return []
    outs = []
    for spec in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in (spec or {}).get(kind) or []:
                outs += [entry] if isinstance(entry, str) else list(entry) if isinstance(entry, dict) else []
    return [o.rstrip("/") for o in outs]


def _is_output(name: str, outputs: list[str]) -> bool:
    return name.endswith(_PIPELINE_FILES) or any(name == o or name.startswith(o + "/") for o in outputs)


def git_revision(repo: Path | str) -> str:
    """The short commit of ``repo``'s HEAD, with ``+ uncommitted changes (files)``
    when tracked files other than the pipeline's records and stage outputs differ from it."""

    def here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return git(repo, *args, check=False, timeout=60, env=env)

    try:
        head = here("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (git: {type(exc).__name__})"
    if head.returncode != 0:
        return "unknown (not a git repository with a commit)"
    # Tracked files whose content differs from HEAD, compared through a fresh
    # index of HEAD: the repository's own index can carry stat data that hides
    # a change (DVC writes it when it sets up an experiment's workspace).
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}
        here("read-tree", "HEAD", env=env)
        diff = here("diff", "--name-only", "-z", env=env)
    top = here("rev-parse", "--show-toplevel").stdout.strip()
    outputs = _stage_outputs(Path(top)) if top else []
    changed = sorted({name for name in diff.stdout.split("\0") if name and not _is_output(name, outputs)})
    text = head.stdout.strip()
    if changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        text += f" + uncommitted changes ({shown})"
    return text


def _flat_table(header: tuple[str, str], values: dict) -> str:
    rows = "\n".join(f"| {md_text(k)} | {md_text(v)} |" for k, v in values.items())
    return f"| {header[0]} | {header[1]} |\n|---|---|\n{rows}"


# --------------------------------------------------------------------------
# What the losses mean: reference losses and examples
# --------------------------------------------------------------------------


def mean_predictor_loss(store: Path | str) -> float:
    """Validation MSE of predicting the training split's mean of ``y`` everywhere
    (in the store's normalised units), read chunk by chunk with checksums."""
    import zarr

    group = zarr.open_group(str(store), mode="r")

    def sums(array, centre: float = 0.0) -> tuple[float, float, int]:
        s1 = s2 = 0.0
        n = 0
        step = max(1, array.chunks[0])
        for start in range(0, array.shape[0], step):
            block = np.asarray(read(array, store, start, start + step, stage="preprocess"), dtype=np.float64)
            s1 += float(block.sum())
            s2 += float(((block - centre) ** 2).sum())
            n += block.size
        return s1, s2, n

    total, _, count = sums(group["train/y"])
    mean = total / count
    _, squared, n_val = sums(group["val/y"], mean)
    return squared / n_val


def _per_sample_mse(model, x, y, batch: int = 64):
    import torch

    model.eval()
    out_err, out_pred = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            pred = model(x[start : start + batch])
            out_pred.append(pred)
            out_err.append(((pred - y[start : start + batch]) ** 2).mean(dim=(1, 2, 3)).double())
    return torch.cat(out_err), torch.cat(out_pred)


def evaluate(model_path: Path | str, store: Path | str, seed: int) -> dict:
    """Per-sample validation MSE of the trained model in ``model_path`` and of
    the same network freshly initialised with ``seed`` (as the train stage
    does), on the first :data:`MAX_EVAL_SAMPLES` validation samples."""
    import torch
    import zarr

    group = zarr.open_group(str(store), mode="r")
    n_val = group["val/y"].shape[0]
    n = min(n_val, MAX_EVAL_SAMPLES)
    x = torch.from_numpy(np.asarray(read(group["val/x"], store, 0, n, stage="preprocess"), dtype=np.float32))
    y = torch.from_numpy(np.asarray(read(group["val/y"], store, 0, n, stage="preprocess"), dtype=np.float32))
    payload = load_model(model_path)  # checksum verified
    trained = build_model(**payload["model_args"])
    trained.load_state_dict(payload["model"])
    torch.manual_seed(seed)  # as the train stage does before it builds the network
    untrained = build_model(**payload["model_args"])
    err, pred = _per_sample_mse(trained, x, y)
    err0, _ = _per_sample_mse(untrained, x, y)
    return {"n": n, "n_val": n_val, "err": err.numpy(), "err_untrained": err0.numpy(), "x": x, "y": y, "pred": pred}


def example_indices(err, k: int = EXAMPLES) -> tuple[list[int], list[int]]:
    """The ``k`` best and ``k`` worst samples by MSE (ties: lower index first), without repeats."""

    order = [int(i) for i in np.lexsort((np.arange(len(err)), err))]
    k = min(k, len(order))
    best = order[:k]
    worst = [i for i in reversed(order) if i not in best][:k]
    return best, worst


def _examples_png(ev: dict, best: list[int], worst: list[int], path: Path) -> None:
    rows = [("best", i) for i in best] + [("worst", i) for i in worst]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.3 * len(rows)), dpi=80, squeeze=False)
    for r, (kind, i) in enumerate(rows):
        true = ev["y"][i, 0].numpy()
        pred = ev["pred"][i, 0].numpy()
        lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
        for c, (img, name, kw) in enumerate(
            (
                (true, "true", {"vmin": lo, "vmax": hi, "cmap": "viridis"}),
                (pred, "predicted", {"vmin": lo, "vmax": hi, "cmap": "viridis"}),
                (pred - true, "predicted - true", {"cmap": "RdBu_r"}),
            )
        ):
            ax = axes[r, c]
            if c == 2:
                m = float(abs(img).max()) or 1.0
                kw = {**kw, "vmin": -m, "vmax": m}
            im = ax.imshow(img, origin="lower", aspect="auto", interpolation="nearest", **kw)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            ax.set_title(f"{kind}: val sample {i}, {name}" if c == 0 else name, fontsize=8)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("frequency bin", fontsize=7)
            if r == len(rows) - 1:
                ax.set_xlabel("time bin", fontsize=7)
    fig.suptitle(f"Main channel (normalised Q energy), MSE: best {len(best)} and worst {len(worst)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def build(
    metrics_path: Path,
    epochs_path: Path,
    out: Path,
    title: str,
    experiment: str = "workspace",
    *,
    params_path: Path | None = None,
    model_path: Path | None = None,
    data_path: Path | None = None,
    lock_path: Path | None = None,
) -> Path:
    """Write ``out/report.md`` and its PNGs atomically (a temporary folder renamed at the end).

    ``params_path``: the params file as used (listed in full, and its
    ``train.seed`` initialises the untrained reference network);
    ``model_path``/``data_path``: the trained model and the preprocessed store,
    for the reference losses and the images panel; ``lock_path``: version.lock.
    A part whose input is not given is left out with a line that says so.
    """

    metrics = read_metrics(metrics_path)  # with run.json beside it
    df = pd.read_csv(epochs_path)
    params = None
    if params_path is not None:
        params = used_params(params_path)

    tmp = fsio.temp_path(out)
    tmp.mkdir(parents=True)

    references: dict[str, float] = {}
    examples_md = "Not drawn: the report was made without the trained model and the data store."
    reference_md = "Not computed: the report was made without the trained model and the data store."
    if model_path is not None and data_path is not None and params is not None:
        references["predicting the training mean"] = mean_predictor_loss(data_path)
        ev = evaluate(model_path, data_path, int(params["train.seed"]))
        references["untrained model"] = float(ev["err_untrained"].mean())
        subset = (
            f"all {ev['n']} validation samples"
            if ev["n"] == ev["n_val"]
            else f"the first {ev['n']} of {ev['n_val']} validation samples"
        )
        trained = metrics.get("val_loss")
        reference_md = f"""Validation MSE in the store's normalised units (the images are normalised with \
statistics of the training split, so predicting the training mean is predicting about 0 everywhere).

| predictor | validation MSE |
|---|---|
| trained model (final epoch) | {md_text(_fmt(trained))} |
| predicting the training mean of y | {references["predicting the training mean"]:.4f} |
| untrained model (initialisation of train.seed={md_text(params["train.seed"])}) | \
{references["untrained model"]:.4f} |

The training-mean row uses the whole splits; the untrained model row uses {subset}."""
        best, worst = example_indices(ev["err"])
        _examples_png(ev, best, worst, tmp / "examples.png")
        listing = "; ".join(
            f"{kind} {r + 1}: sample {i} (MSE {float(ev['err'][i]):.4f})"
            for kind, chosen in (("best", best), ("worst", worst))
            for r, i in enumerate(chosen)
        )
        examples_md = f"""True and predicted main-channel Q-transform images (columns: true, predicted, difference) \
of the {len(best)} best and {len(worst)} worst of {subset} by per-sample MSE, trained model.

Rows: {listing}.

![validation examples](examples.png)"""

    _plot(
        df,
        ["train_loss", "val_loss"],
        "MSE loss (normalised units)",
        "Loss per epoch",
        tmp / "loss.png",
        log=True,
        references=references,
    )
    _plot(
        df,
        ["train_time_s", "val_time_s"],
        "seconds",
        "Time per epoch",
        tmp / "epoch_time.png",
        from_zero=True,
        warmup=True,
    )
    _plot(
        df, ["samples_per_s"], "samples / s", "Training throughput", tmp / "throughput.png", from_zero=True, warmup=True
    )
    gpu_note = (
        "GPU utilisation and energy: not measured (no NVIDIA GPU was used)."
        if metrics.get("gpu_energy_wh") is None
        else f"GPU energy: {_fmt(metrics['gpu_energy_wh'])} Wh, "
        f"utilisation {_fmt(metrics.get('gpu_utilization_pct'))} %."
    )
    rows = "\n".join(f"| {md_text(k)} | {md_text(_fmt(v))} |" for k, v in sorted(_flat(metrics).items()))
    # A column never measured on this run (GPU figures on a CPU) is named below the table, not shown as nan;
    # a value missing in one epoch is shown as "n/a".
    unmeasured = [c for c in df.columns if df[c].isna().all()]
    shown = df.drop(columns=unmeasured).astype(object)
    shown = shown.where(shown.notna(), None)
    if _has_tabulate():
        table = shown.to_markdown(index=False, floatfmt=".4g", missingval="n/a")
    else:
        table = shown.fillna("n/a").to_string(index=False)
    if unmeasured:
        table += f"\n\nNot measured on this run: {', '.join(md_text(c) for c in unmeasured)}."
    revision = git_revision(Path(params_path).resolve().parent if params_path is not None else Path.cwd())
    if lock_path is None:
        software = "Not recorded: the report was made without version.lock."
    elif not Path(lock_path).is_file():
        software = f"Not recorded: {md_code(lock_path)} does not exist."
    else:
        software = _flat_table(("software", "version"), flatten(yaml.safe_load(Path(lock_path).read_text()) or {}))
    params_md = (
        "Not recorded: the report was made without the params file."
        if params is None
        else _flat_table(("param", "value"), params)
    )
    text = f"""# {md_text(title)}

Experiment: {md_code(experiment)}; strategy {md_code(metrics.get("strategy"))} \
on {md_text(metrics.get("world_size"))} process(es).
Code revision: {md_code(revision)}.
The timing metrics leave out the first (warm-up) epoch, shaded in the timing figures, and validation.

| metric | value |
|---|---|
{rows}

{gpu_note}

## Reference losses

{reference_md}

![loss](loss.png)
![epoch time](epoch_time.png)
![throughput](throughput.png)

## Validation examples

{examples_md}

## Per epoch

{table if table.startswith("|") else "```" + chr(10) + table + chr(10) + "```"}

## Params

{params_md}

## Software (version.lock)

{software}
"""
    (tmp / "report.md").write_text(text)
    fsio.move_into_place(tmp, out)
    return out / "report.md"


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
