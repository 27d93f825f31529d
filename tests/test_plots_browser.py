"""The page of `dvc plots show` draws its plots in a real browser with no network (Chromium, headless).

A pipeline result made by the real pipeline, the offline template of scripts/plots_offline.py, the page
written by real dvc, opened by Debian's Chromium through a proxy that does not exist: anything the page
would fetch from the network fails, as on an air-gapped cluster. DVC's default page, opened the same way,
is the control: it loads vega from a CDN and stays blank.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import BIN, ROOT, make_repo, sh

pytestmark = pytest.mark.slow

PLOTS = {"Loss", "Epoch_time__s_", "Throughput__samples_s_"}  # the div ids dvc gives the 3 plots of dvc.yaml
# Port 9 (discard) on loopback: nothing listens, so every http(s) request of the page fails at once.
OFFLINE = ["--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>"]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, and npm for the offline template; installed by the test setup script as root."""
    if not (shutil.which("chromium") and shutil.which("npm")):
        if os.geteuid() != 0:
            pytest.skip(
                "Chromium or npm is missing and this is not root, so they cannot be installed: "
                "run `make test` as root or install the Debian packages chromium, chromium-driver and npm"
            )
        sh(["bash", str(ROOT / "scripts" / "install_test_system.sh"), "--strict"], ROOT, timeout=900)
    path = shutil.which("chromium")
    assert path, "chromium still missing after scripts/install_test_system.sh"
    return path


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project copy with the results of a real pipeline run (3 epochs: lines, not points)."""
    repo = make_repo(tmp_path_factory.mktemp("plots") / "repo", {"train": {"epochs": 3}})
    sh([str(BIN / "dvc"), "exp", "run"], repo)
    assert len((repo / "results" / "epochs.csv").read_text().strip().splitlines()) == 4
    return repo


class _Plots(HTMLParser):
    """Per plot div (by id): the canvas and svg elements inside it, with their attributes."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []  # (tag, id of the enclosing plot div)
        self.found: dict[str, list[tuple[str, dict]]] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        plot = self.stack[-1][1] if self.stack else None
        if tag == "div" and attrs.get("id") in PLOTS:
            plot = attrs["id"]
            self.found.setdefault(plot, [])
        if plot and tag in ("canvas", "svg"):
            self.found[plot].append((tag, attrs))
        if tag not in ("br", "img", "input", "meta", "link", "hr", "source", "wbr"):
            self.stack.append((tag, plot))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break


def drawn(dom: str) -> dict[str, int]:
    """Per plot: how many marks canvases (or vega svg roots) vega sized, i.e. rendered into."""
    parser = _Plots()
    parser.feed(dom)
    out = {}
    for plot, elements in parser.found.items():
        out[plot] = sum(
            1
            for tag, attrs in elements
            if "marks" in (attrs.get("class") or "").split() and int(float(attrs.get("width") or 0)) > 0
        )
    return out


def open_page(chromium: str, page: Path, work: Path, *action: str) -> subprocess.CompletedProcess:
    """Chromium headless on a file:// page, offline, with its own profile; ``action`` = --dump-dom or --screenshot."""
    profile = work / f"profile-{len(list(work.glob('profile-*')))}"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *OFFLINE,
        "--virtual-time-budget=15000",  # vega-embed renders asynchronously: let its promises settle
        *action,
        page.as_uri(),
    ]
    return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120, check=True)


def coloured_pixels(png: Path) -> int:
    """Pixels that are clearly coloured (lines, legend marks), as opposed to white, grey and black text."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb.max(axis=-1) - rgb.min(axis=-1)) > 60).sum())


def test_plots_page_renders_offline_in_chromium(chromium, project, tmp_path):
    # The setup step of `make run`/`make test`, pointed at the copy (node_modules of this checkout).
    setup = sh([sys.executable, str(ROOT / "scripts" / "plots_offline.py"), "--repo", str(project), "--strict"], ROOT)
    assert "works offline" in setup.stdout, setup.stdout
    local = sh([str(BIN / "dvc"), "config", "--local", "plots.html_template"], project).stdout.strip()
    assert local == "plots_offline.html"
    # The committed config is not touched; the template is git-ignored.
    assert sh(["git", "status", "--porcelain", "--", ".dvc"], project).stdout == ""

    shown = sh([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "offline")], project)
    page = tmp_path / "offline" / "index.html"
    assert page.as_uri() in shown.stdout, shown.stdout
    html = page.read_text()
    remote = re.findall(r"""<script[^>]*\bsrc\s*=\s*["']?(?:https?:)?//[^"'\s>]*""", html, flags=re.I)
    assert remote == [], remote
    assert html.count("<script") >= 3 + len(PLOTS)  # the 3 inlined libraries, one embedding script per plot

    dom = open_page(chromium, page, tmp_path, "--dump-dom").stdout
    assert drawn(dom) == {plot: 1 for plot in PLOTS}, drawn(dom)

    shot = tmp_path / "offline.png"
    open_page(chromium, page, tmp_path, "--window-size=1400,1000", f"--screenshot={shot}")
    assert coloured_pixels(shot) > 1000, "the screenshot of the plots page has no coloured lines"

    # Control: DVC's default page of the same plots, opened offline, draws nothing (vega is on a CDN).
    default = tmp_path / "default_template.html"
    from dvc_render.html import PAGE_HTML

    default.write_text(PAGE_HTML)
    sh([str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "cdn"), "--html-template", str(default)], project)
    cdn_page = tmp_path / "cdn" / "index.html"
    assert re.search(r"<script src=\"https://", cdn_page.read_text())
    cdn_dom = open_page(chromium, cdn_page, tmp_path, "--dump-dom").stdout
    assert drawn(cdn_dom) == {plot: 0 for plot in PLOTS}, drawn(cdn_dom)
    shot = tmp_path / "cdn.png"
    open_page(chromium, cdn_page, tmp_path, "--window-size=1400,1000", f"--screenshot={shot}")
    assert coloured_pixels(shot) == 0
