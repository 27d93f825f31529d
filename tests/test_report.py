"""The per-experiment report of a run made by the real pipeline (`dvc exp run`, tiny params):
what the run was (params, git revision, version.lock), reference losses recomputed here from
the store and a freshly initialised network, the images panel, and report-only reruns."""

from __future__ import annotations

import re

import numpy as np
import pytest
import yaml

from conftest import BIN, dvc_queue_status, make_repo, sh

pytestmark = pytest.mark.slow


def dvc(repo, *args, check=True):
    return sh([str(BIN / "dvc"), *args], repo, check=check)


def stages_run(proc) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", proc.stdout + proc.stderr))


def md(text: str) -> str:
    """A plain value as the report writes it in Markdown (markup characters backslashed)."""
    return re.sub(r"([\\`*_\[\]{}#|!~])", r"\\\1", text)


def reference_row(report: str, name: str) -> float:
    match = re.search(rf"^\| {re.escape(name)}[^|]* \| ([0-9.]+) \|$", report, re.M)
    assert match, f"no row {name!r} in\n{report}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("report") / "repo", {"train": {"epochs": 2}})
    proc = dvc(repo, "exp", "run")
    assert "report" in stages_run(proc), proc.stdout
    return repo


def test_report_names_params_revision_and_software(run):
    repo = run
    report = (repo / "results/report/report.md").read_text()
    head = sh(["git", "rev-parse", "--short", "HEAD"], repo).stdout.strip()
    # dvc.lock, rewritten by the run itself, is not an uncommitted change of the code
    assert f"Code revision: `{head}`.\n" in report, report[:600]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in params.items():
        for key, value in values.items():
            assert f"| {md(f'{section}.{key}')} | {md(str(value))} |" in report, (section, key)
    lock = yaml.safe_load((repo / "version.lock").read_text())
    assert lock["packages"]
    for name, version in lock["packages"].items():
        assert f"| {md(f'packages.{name}')} | {md(str(version))} |" in report, name
    assert f"| python | {md(str(lock['python']))} |" in report
    # the per-epoch table of a CPU run: no nan, the GPU column named as not measured
    assert " nan " not in report and "| nan" not in report
    assert f"Not measured on this run: {md('gpu_other_procs')}." in report, report[-1500:]


def test_reference_losses_match_an_independent_computation(run):
    import torch
    import zarr

    from virgo_exps.study.models import ConvDecoder

    repo = run
    report = (repo / "results/report/report.md").read_text()
    group = zarr.open_group(str(repo / "data/images.zarr"), mode="r")
    y_train = np.asarray(group["train/y"][:], dtype=np.float64)
    x_val = np.asarray(group["val/x"][:], dtype=np.float32)
    y_val = np.asarray(group["val/y"][:], dtype=np.float64)
    mean_loss = float(((y_val - y_train.mean()) ** 2).mean())
    torch.manual_seed(yaml.safe_load((repo / "params.yaml").read_text())["train"]["seed"])
    fresh = ConvDecoder(x_val.shape[1]).eval()  # train.model: decoder
    with torch.no_grad():
        untrained = float(((fresh(torch.from_numpy(x_val)).double().numpy() - y_val) ** 2).mean())
    shown_mean = reference_row(report, "predicting the training mean of y")
    shown_untrained = reference_row(report, "untrained model (initialisation of train.seed=0)")
    assert abs(shown_mean - mean_loss) <= 5.1e-5, (shown_mean, mean_loss)
    assert abs(shown_untrained - untrained) <= 5.1e-5, (shown_untrained, untrained)
    assert f"all {len(y_val)} validation samples" in report
    # both are reference lines of the loss figure (named in its legend, the figure is drawn from them)
    assert (repo / "results/report/loss.png").stat().st_size > 10_000


def test_images_panel_shows_best_and_worst_validation_samples(run):
    import torch
    import zarr
    from PIL import Image

    from virgo_exps.study.models import build_from_file

    repo = run
    report = (repo / "results/report/report.md").read_text()
    rows = re.findall(r"(best|worst) (\d): sample (\d+) \(MSE ([0-9.]+)\)", report)
    assert [(kind, int(rank)) for kind, rank, _, _ in rows] == [("best", r) for r in (1, 2, 3)] + [
        ("worst", r) for r in (1, 2, 3)
    ], report
    group = zarr.open_group(str(repo / "data/images.zarr"), mode="r")
    x = torch.from_numpy(np.asarray(group["val/x"][:], dtype=np.float32))
    y = torch.from_numpy(np.asarray(group["val/y"][:], dtype=np.float32))
    with torch.no_grad():
        err = ((build_from_file(repo / "results/model.pt").eval()(x) - y) ** 2).mean(dim=(1, 2, 3)).numpy()
    order = list(np.argsort(err, kind="stable"))
    assert [int(i) for _, _, i, _ in rows] == order[:3] + order[::-1][:3]
    for _, _, i, shown in rows:
        assert abs(float(shown) - float(err[int(i)])) <= 5.1e-5
    assert "![validation examples](examples.png)" in report
    with Image.open(repo / "results/report/examples.png") as png:
        assert png.size == (600, int(2.3 * 6 * 80)), png.size  # one row of 3 panels per sample, 6 rows


def test_report_only_rerun_changes_the_title_and_keeps_the_figures(run):
    repo = run
    before = {n: (repo / "results/report" / n).read_bytes() for n in ("loss.png", "examples.png")}
    old = (repo / "results/report/report.md").read_text()
    proc = dvc(repo, "exp", "run", "-s", "report", "-S", "report.title=Second look")
    assert stages_run(proc) == {"report"}, proc.stdout
    report = (repo / "results/report/report.md").read_text()
    assert report.startswith("# Second look\n")
    head = sh(["git", "rev-parse", "--short", "HEAD"], repo).stdout.strip()
    assert f"Code revision: `{head} + uncommitted changes (params.yaml)`." in report
    for name in ("predicting the training mean of y", "untrained model (initialisation of train.seed=0)"):
        assert reference_row(report, name) == reference_row(old, name)
    # same model, data and curves: the figures are byte for byte the same
    assert {n: (repo / "results/report" / n).read_bytes() for n in before} == before


def test_report_refuses_a_damaged_model(run, tmp_path):
    repo = run
    damaged = tmp_path / "model.pt"
    data = bytearray((repo / "results/model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    proc = sh(
        [
            str(BIN / "python"),
            "stages/report.py",
            "--params",
            "params.yaml",
            "--metrics",
            "results/metrics.json",
            "--epochs",
            "results/epochs.csv",
            "--model",
            str(damaged),
            "--data",
            "data/images.zarr",
            "--version-lock",
            "version.lock",
            "--out",
            str(tmp_path / "report"),
        ],
        repo,
        check=False,
    )
    assert proc.returncode != 0
    assert f"{damaged}: the model file is damaged" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "report").exists()


def test_report_of_a_queued_experiment_names_its_revision(run):
    """A queued experiment runs in DVC's temporary workspace (a git copy): the report still finds the commit."""
    repo = run
    old = (repo / "results/report/report.md").read_text()
    # a queued experiment starts from HEAD: commit the run (dvc.lock, metrics) so its outputs are there
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-q", "-m", "tiny run"], repo)
    dvc(repo, "exp", "run", "--queue", "-s", "report", "-S", "report.title=Queued look", "-n", "queued-look")
    ran = dvc(repo, "exp", "run", "--run-all")
    assert "Failed" not in dvc_queue_status(repo), dvc(repo, "queue", "logs", "queued-look").stdout
    assert "queued-look" in ran.stdout + ran.stderr, ran.stdout[-2000:]
    dvc(repo, "exp", "apply", "queued-look")
    report = (repo / "results/report/report.md").read_text()
    assert report.startswith("# Queued look\n")
    assert "Experiment: `queued-look`" in report
    head = sh(["git", "rev-parse", "--short", "HEAD"], repo).stdout.strip()
    assert f"Code revision: `{head} + uncommitted changes (params.yaml)`." in report, report[:400]
    for name in ("predicting the training mean of y", "untrained model (initialisation of train.seed=0)"):
        assert reference_row(report, name) == reference_row(old, name)
    assert (repo / "results/report/examples.png").is_file()
