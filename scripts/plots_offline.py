"""Make `dvc plots show` write a page that loads nothing from the network.

DVC's default plots page loads vega, vega-lite and vega-embed from a CDN: on a
login node or an air-gapped cluster it stays blank. This script installs those
three libraries, at the versions of DVC's default page (package.json,
package-lock.json), with `npm ci` into node_modules/, writes a page template
with them inlined (DVC's `plots.html_template`, git-ignored) and points the
project's `.dvc/config.local` at it (the committed .dvc/config is untouched).

    python scripts/plots_offline.py                 # this checkout (run by `make run` and `make test`)
    python scripts/plots_offline.py --repo DIR      # another DVC project, with this checkout's node_modules
    python scripts/plots_offline.py --strict        # exit 1 instead of leaving DVC's CDN page

Without npm, or when `npm ci` cannot reach a registry, it says so in one line
and leaves DVC's default page (exit 0, or 1 with --strict).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Written inside the project's .dvc/ folder; DVC resolves a relative
# plots.html_template against that folder, so the setting survives a move.
TEMPLATE_NAME = "plots_offline.html"
LIBRARIES = ("vega", "vega-lite", "vega-embed")  # in the order they must load
STAMP_NAME = ".virgo-lock.sha256"  # node_modules/<this>: digest of the lockfile that was installed
NPM_CI = ["npm", "ci", "--legacy-peer-deps", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
# vega-lite 5.2.0 declares a peer range (vega ^5.21) that excludes the vega 5.20.2 DVC's page pairs it
# with; --legacy-peer-deps installs exactly the pinned pair DVC uses.

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- {versions}: inlined from node_modules by scripts/plots_offline.py, so the page needs no network -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


class Failed(Exception):
    """One line saying why the offline page could not be made."""


def lock_digest(root: Path) -> str:
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        h.update((root / name).read_bytes())
    return h.hexdigest()


def install(root: Path) -> None:
    """`npm ci` from the lockfile, unless node_modules already holds exactly that lockfile's packages."""
    stamp = root / "node_modules" / STAMP_NAME
    digest = lock_digest(root)
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return
    print("plots: npm ci (vega, vega-lite, vega-embed from package-lock.json)", flush=True)
    proc = subprocess.run(NPM_CI, cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise Failed(f"'npm ci' failed ({last.strip()}; no network or no npm registry?)")
    stamp.write_text(digest + "\n")


def dvc_pins() -> dict[str, str]:
    """The versions DVC's default page loads from the CDN (dvc-render's vega renderer)."""
    from dvc_render.vega import VegaRenderer

    return dict(re.findall(r"/npm/(vega(?:-lite|-embed)?)@([0-9][0-9.]*)", VegaRenderer.SCRIPTS))


def library_script(root: Path, name: str) -> tuple[str, str]:
    """(version, JavaScript) of the browser build the CDN serves for ``name``."""
    folder = root / "node_modules" / name
    meta = json.loads((folder / "package.json").read_text())
    code = (folder / meta.get("jsdelivr", meta.get("unpkg"))).read_text(encoding="utf-8")
    # The source map is not shipped in the page: drop the comment that points at it.
    code = re.sub(r"\n?//# sourceMappingURL=\S*\s*$", "", code)
    # Inside <script> these would end the element early or break DVC's placeholder filling.
    for bad in ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad in code.lower():
            raise Failed(f"{name} {meta['version']} contains {bad!r}; it cannot be inlined as is")
    return meta["version"], code


def build_page(root: Path) -> tuple[str, str]:
    """(versions, page template) with the three libraries inlined."""
    pins = dvc_pins()
    parts, versions = [], []
    for name in LIBRARIES:
        version, code = library_script(root, name)
        if pins.get(name) and pins[name] != version:
            raise Failed(
                f"node_modules has {name} {version} but DVC's page uses {pins[name]}; "
                "update package.json and package-lock.json to DVC's versions"
            )
        versions.append(f"{name} {version}")
        parts.append(f'    <script type="text/javascript">\n{code}\n    </script>')
    return ", ".join(versions), PAGE.format(versions=", ".join(versions), scripts="\n".join(parts))


def point_dvc_at(repo: Path, template: Path) -> None:
    """Set plots.html_template in the project's .dvc/config.local (relative to .dvc/)."""
    value = os.path.relpath(template, repo / ".dvc")
    cmd = [sys.executable, "-m", "dvc", "config", "--local", "plots.html_template"]
    current = subprocess.run(cmd, cwd=repo, capture_output=True, text=True)
    if current.returncode == 0 and current.stdout.strip() == value:
        return
    proc = subprocess.run([*cmd, value], cwd=repo, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Failed(f"'dvc config --local plots.html_template {value}' failed: {proc.stderr.strip()}")


def make_offline(repo: Path, root: Path = ROOT) -> Path:
    if shutil.which("npm") is None:
        raise Failed("npm not found")
    if not (repo / ".dvc").is_dir():
        raise Failed(f"{repo} is not a DVC project (no .dvc/)")
    install(root)
    versions, page = build_page(root)
    template = repo / ".dvc" / TEMPLATE_NAME
    tmp = template.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, template)
    point_dvc_at(repo, template)
    print(f"plots: `dvc plots show` works offline ({versions} inlined in .dvc/{TEMPLATE_NAME})")
    return template


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="the DVC project to set up (default: this checkout)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when the offline page cannot be made")
    args = parser.parse_args(argv)
    try:
        make_offline(args.repo.resolve())
    except Failed as exc:
        print(f"plots: {exc}; `dvc plots show` keeps DVC's default page, which loads vega from a CDN")
        return 1 if args.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
