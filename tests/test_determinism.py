"""The data stages write the same bytes on every x86-64 CPU.

numpy, torch and MKL choose their SIMD kernels at run time from the CPU's
features, and different kernels may round differently. Each library can be
told to behave as on an older CPU (NPY_DISABLE_CPU_FEATURES,
ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS), so one machine with AVX-512 can
run the data stages as an AVX-512, an AVX2 and an SSE-only machine would, and
compare the stores byte for byte. MKL's FFT kernels differ between these (and
between processors of one level: an AVX-512 FP16 Xeon's), so the preprocess
stage pins MKL's compatible branch (virgo_exps.numerics); the runs here start
without MKL_CBWR, as a user's shell would.
"""

from __future__ import annotations

import decimal
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from virgo_exps.study import patches

try:
    from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
except ImportError:  # numpy < 2
    from numpy.core._multiarray_umath import __cpu_dispatch__, __cpu_features__

# numpy's dispatch targets at AVX-512 level and above that this CPU has
AVX512_TARGETS = [f for f in __cpu_dispatch__ if (f == "X86_V4" or f.startswith("AVX512")) and __cpu_features__.get(f)]

# The CPUs simulated on this machine, as environment variables.
WITHOUT_AVX512 = {  # an AVX2 machine (x86-64-v3)
    "NPY_DISABLE_CPU_FEATURES": " ".join(AVX512_TARGETS),
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
WITHOUT_AVX2 = {  # an older machine: numpy's baseline kernels, torch's scalar ones, MKL's SSE4.2 code
    "NPY_DISABLE_CPU_FEATURES": " ".join(
        ["X86_V3", *AVX512_TARGETS] if "X86_V3" in __cpu_dispatch__ else AVX512_TARGETS
    ),
    "ATEN_CPU_CAPABILITY": "default",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
}

needs_avx512 = pytest.mark.skipif(
    not __cpu_features__.get("AVX512F") or not AVX512_TARGETS,
    reason="this CPU has no AVX-512: the kernels it would switch off are not used here, so the comparison "
    "would show nothing (run on an AVX-512 machine)",
)

# Run in a fresh interpreter so that the variables take effect before numpy and torch load.
SCRIPT = r"""
import sys
from pathlib import Path
import numpy as np
from virgo_exps.study.params import GenerateConfig, PreprocessConfig
from virgo_exps.study.generate import generate
from virgo_exps.study.preprocess import preprocess
what, out = sys.argv[1], Path(sys.argv[2])
if what == "generate":
    generate(GenerateConfig(seed=3, n_samples=24, n_aux=3, duration=4.0, sample_rate=256, chunk_size=8, workers=1),
             out, workers=1, progress=False)
else:
    preprocess(Path(sys.argv[3]), PreprocessConfig(fmax=80.0, patch_size=16, batch_size=8), out,
               progress=False, workers=1)
# numpy's own float32 log1p on fixed values: differs between the kernels, which shows the switch worked
x = np.random.default_rng(0).exponential(5.0, 4096).astype(np.float32)
np.save(out.with_suffix(".probe.npy"), np.log1p(x))
"""


def _run(what: str, out: Path, extra: dict, source: Path | None = None) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "NPY_DISABLE_CPU_FEATURES",
            "NPY_ENABLE_CPU_FEATURES",
            "ATEN_CPU_CAPABILITY",
            "MKL_ENABLE_INSTRUCTIONS",
            "MKL_CBWR",
        )
    }
    env.update(extra)
    args = [sys.executable, "-c", SCRIPT, what, str(out)] + ([str(source)] if source else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_bytes(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [k for k in fa if fa[k] != fb[k]]
    assert not differ, f"{len(differ)} of {len(fa)} files differ, e.g. {differ[:3]}"


@needs_avx512
@pytest.mark.slow
def test_data_stages_are_byte_identical_with_and_without_avx512(tmp_path):
    raw = {name: tmp_path / f"raw-{name}.zarr" for name in ("avx512", "avx2")}
    _run("generate", raw["avx512"], {})
    _run("generate", raw["avx2"], WITHOUT_AVX512)
    _assert_same_bytes(raw["avx512"], raw["avx2"])

    images = {name: tmp_path / f"images-{name}.zarr" for name in ("avx512", "avx2", "sse")}
    _run("preprocess", images["avx512"], {}, raw["avx512"])
    _run("preprocess", images["avx2"], WITHOUT_AVX512, raw["avx512"])
    _run("preprocess", images["sse"], WITHOUT_AVX2, raw["avx512"])
    # the variables did switch numpy's kernels: its plain float32 log1p differs between the runs
    probes = {k: np.load(v.with_suffix(".probe.npy")) for k, v in images.items()}
    assert not np.array_equal(probes["avx512"], probes["avx2"])
    # ... and the stores do not
    _assert_same_bytes(images["avx512"], images["avx2"])
    _assert_same_bytes(images["avx512"], images["sse"])


def test_mkl_branch_pinned_before_torch_computes_and_refused_after():
    """The data stages pin MKL's compatible branch before torch's first computation; a process where MKL ran
    already is refused, not left to write other bytes."""
    fresh = (
        "import os, torch\n"
        "from virgo_exps.numerics import pin_mkl_branch\n"
        "print(pin_mkl_branch(), os.environ['MKL_CBWR'])\n"
        "print(pin_mkl_branch())  # again: it holds\n"
    )
    late = (
        "import torch\n"
        "torch.fft.rfft(torch.ones(64))\n"
        "from virgo_exps.numerics import pin_mkl_branch\n"
        "pin_mkl_branch()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    ok = subprocess.run([sys.executable, "-c", fresh], env=env, capture_output=True, text=True, timeout=120)
    refused = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, timeout=120)
    import torch

    if not torch.backends.mkl.is_available():
        assert ok.stdout.split() == ["no", "MKL", "COMPATIBLE", "no", "MKL"], ok.stderr
        return
    assert ok.returncode == 0 and ok.stdout.split() == ["compatible", "COMPATIBLE", "compatible"], ok.stderr
    assert refused.returncode != 0
    assert "MKL ran before its compatible branch could be set" in refused.stderr, refused.stderr[-2000:]


def test_log1p_float32_is_correctly_rounded(monkeypatch):
    rng = np.random.default_rng(7)
    x = np.concatenate([rng.exponential(1.0, 3000), rng.exponential(500.0, 1000), [0.0, 1e-40, 1e-8, 3e38]])
    x = x.astype(np.float32)
    y = patches.log1p_float32(x)
    assert y.dtype == np.float32
    ctx = decimal.Context(prec=50)
    for xi, yi in zip(x[::7], y[::7]):
        exact = ctx.ln(ctx.add(1, decimal.Decimal(float(xi))))
        err = abs(decimal.Decimal(float(yi)) - exact)
        for n in (np.nextafter(yi, np.float32(np.inf)), np.nextafter(yi, np.float32(-np.inf))):
            assert err <= abs(decimal.Decimal(float(n)) - exact), (xi, yi)
    # the exact fallback, taken for every element, agrees with the fast path
    monkeypatch.setattr(patches, "_MIDPOINT_ULPS", 2.0**40)
    assert np.array_equal(patches.log1p_float32(x[:500]), y[:500])
    assert np.isnan(patches.log1p_float32(np.array([np.nan], dtype=np.float32))[0])


def _pins() -> dict[str, str]:
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return {m.group(1).lower(): m.group(2) for m in re.finditer(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^"]+)"', text)}


def test_version_lock_lists_what_make_run_installs(tmp_path):
    """version.lock records the packages `make run` installs (Horovod only for the
    horovod strategy, the one case where `make run` builds it), at their pinned
    versions, and the stage rewrites nothing when the environment is unchanged."""
    import yaml

    from conftest import ROOT, make_repo, sh
    from virgo_exps.environment import collect, render

    repo = make_repo(tmp_path / "repo")
    (repo / "version.lock").unlink()  # the committed one: written by this environment already
    cmd = [sys.executable, "stages/environment.py", "--params", "params.yaml", "--out", "version.lock"]
    first = sh(cmd, repo)
    text = (repo / "version.lock").read_text()
    assert "wrote version.lock" in first.stdout
    # the committed version.lock is what this environment writes: a clone + `make run` leaves it unchanged
    assert text == (ROOT / "version.lock").read_text()
    second = sh(cmd, repo)
    assert "version.lock unchanged" in second.stdout and (repo / "version.lock").read_text() == text
    packages = yaml.safe_load(text)["packages"]
    assert "horovod" not in packages  # train.strategy is single: make run does not install it
    pins = _pins()
    for name, version in packages.items():
        if name in pins:  # installed by make run at the pinned version (a local build tag aside)
            assert version.split("+")[0] == pins[name], (name, version)
    assert {"torch", "deepspeed", "numpy", "zarr"} <= set(packages) <= set(pins) | {"virgo-exps"}
    # with the horovod strategy, make run builds Horovod, and the lock names it
    assert "horovod" in collect(strategy="horovod")["packages"]
    assert render(collect(strategy="single")) == render(collect(strategy="ddp")) == text


def test_torch_build_recorded_as_torch_reports_it_and_a_cpu_build_is_not_imported():
    """The environment stage runs on every `dvc exp run`: it reads a CPU build's CUDA version from torch's
    version.py instead of importing torch, and records what torch itself reports."""
    import json
    import subprocess

    ours = (
        "import json, sys\n"
        "from virgo_exps.environment import _torch_build\n"
        "print(json.dumps([_torch_build(), 'torch' in sys.modules]))"
    )
    theirs = (
        "import json, torch\n"
        "build = {'cuda': torch.version.cuda or 'none', 'nccl': 'none',\n"
        "         'cudnn': str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else 'none'}\n"
        "if torch.version.cuda:\n"
        "    try: build['nccl'] = '.'.join(str(v) for v in torch.cuda.nccl.version())\n"
        "    except Exception: pass\n"
        "print(json.dumps(build))"
    )

    def run(code: str):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(proc.stdout)

    (recorded, imported), reported = run(ours), run(theirs)
    assert recorded == reported
    import torch

    assert imported == bool(torch.version.cuda or getattr(torch.version, "hip", None))
