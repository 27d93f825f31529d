#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch frontend, Gloo controller, optional
# NCCL GPU operations) into an existing virtual environment.
#
# Usage:
#   scripts/install_horovod.sh [PATH_TO_VENV_PYTHON] [HOROVOD_VAR=VALUE ...]
#
#   PATH_TO_VENV_PYTHON   python of the target venv (default: .venv/bin/python, i.e. the
#                         repository's .venv when not run from the repository root)
#   HOROVOD_VAR=VALUE     extra Horovod build settings, e.g. HOROVOD_BUILD_CUDA_CC_LIST=80,90
#                         (HOROVOD_* variables already exported in the environment
#                         are passed through to the build as well)
#
# Why a script: horovod 0.28.1 (the last release) asks CMake for C++14, but the
# headers of torch >= 2.1 need C++17, so the published sdist does not compile.
# This script downloads the sdist, patches CMAKE_CXX_STANDARD to 17 and builds
# it with `pip install --no-build-isolation` against the torch already in the venv.
#
# Build mode:
#   * GPU (NCCL): if HOROVOD_GPU_OPERATIONS is set (e.g. NCCL), or if nvidia-smi
#     is on PATH and the venv's torch is a CUDA build. Needs the CUDA toolkit
#     (nvcc) and NCCL; if no HOROVOD_NCCL_* is set, the NCCL from the venv's
#     nvidia-nccl-* wheel (the one torch uses) is picked up when present.
#   * CPU only (Gloo) otherwise. Force it with `HOROVOD_GPU_OPERATIONS= scripts/install_horovod.sh`.
#
# Knobs of this script (not passed to Horovod):
#   INSTALL_HOROVOD_FORCE=1        rebuild even if a working horovod 0.28.1 is installed
#   INSTALL_HOROVOD_SDIST=FILE     use this horovod-0.28.1.tar.gz instead of downloading it
#                                  (for nodes without internet access)
#   INSTALL_HOROVOD_LOG=FILE       where to write the full build log
#                                  (default: ${TMPDIR:-/tmp}/horovod-install-<date>-<pid>.log)
#   MAKEFLAGS                      default -j$(nproc); set e.g. MAKEFLAGS=-j4 if memory is short
#   INSTALL_HOROVOD_CACHE=DIR      where built wheels are kept, keyed by their inputs
#                                  (default ~/.cache/virgo-exps/wheels; empty: no cache)
#
# Horovod is optional: the other strategies (single, ddp, deepspeed) work without it.
set -euo pipefail

HVD_VERSION=0.28.1
PROG=$(basename "$0")

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

PY=.venv/bin/python
PY_SET=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) usage; exit 0 ;;
        HOROVOD_*=*)
            name=${arg%%=*}
            if [[ ! $name =~ ^HOROVOD_[A-Za-z0-9_]+$ ]]; then
                echo "$PROG: invalid variable name in '$arg'" >&2; exit 2
            fi
            # shellcheck disable=SC2163  # exports NAME=VALUE as given
            export "$arg" ;;
        *)
            if [[ $PY_SET == 1 ]]; then
                echo "$PROG: unexpected argument '$arg' (see --help)" >&2; exit 2
            fi
            PY=$arg; PY_SET=1 ;;
    esac
done

log()  { printf '[install_horovod] %s\n' "$*"; }
die()  { printf '[install_horovod] ERROR: %s\n' "$*" >&2; note_optional; exit 1; }
note_optional() {
    echo "  Horovod is optional: the other strategies (single, ddp, deepspeed) keep working without it." >&2
}

# ---------------------------------------------------------------------------
# 0. Target interpreter
# ---------------------------------------------------------------------------
if [[ $PY_SET == 0 && ! -x $PY ]]; then
    # Not run from the repository root: use the repository's .venv.
    PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
fi
[[ -x $PY ]] || die "python interpreter '$PY' not found or not executable (pass the venv's python as first argument, e.g. .venv/bin/python)"
# Absolute path without resolving the venv's python symlink.
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
VENV_BIN=$(dirname "$PY")

# ---------------------------------------------------------------------------
# 1. Fast path: already installed and importable?
# ---------------------------------------------------------------------------
# check_installed quick|full
#   quick: no torch import (importing torch alone takes seconds): the horovod
#          version, the torch extension file, and the torch version it was built
#          against (horovod's metadata.json, the same check horovod makes at import)
#   full:  additionally `import horovod.torch` and report what was built
# Prints one line (status, or why it is not usable); exit 0 only if usable.
check_installed() {
    "$PY" - "$HVD_VERSION" "$1" <<'EOF'
import glob, importlib.util, json, os, sys
from importlib import metadata
want, mode = sys.argv[1], sys.argv[2]
try:
    have = metadata.version("horovod")
except metadata.PackageNotFoundError:
    print("horovod is not installed"); sys.exit(3)
if have.split("+")[0] != want:
    print("horovod %s is installed, want %s" % (have, want)); sys.exit(4)
spec = importlib.util.find_spec("horovod")
pkg = list(spec.submodule_search_locations or [""])[0] if spec else ""
if not glob.glob(os.path.join(pkg, "torch", "mpi_lib_v2*.so")):
    print("horovod %s is installed without its torch extension" % have); sys.exit(5)
try:
    with open(os.path.join(pkg, "metadata.json")) as f:
        built = json.load(f).get("pytorch")
except (OSError, ValueError):
    built = None
torch_now = metadata.version("torch")
if built != torch_now:
    print("horovod %s was built for torch %s, the venv has torch %s" % (have, built, torch_now)); sys.exit(6)
if mode == "quick":
    print("horovod %s (torch extension built for torch %s)" % (have, built)); sys.exit(0)
try:
    import horovod.torch as hvd
except Exception as e:
    print("import horovod.torch fails: %s: %s" % (type(e).__name__, e)); sys.exit(7)
print("horovod %s, import horovod.torch OK (torch %s; gloo=%s nccl=%s mpi=%s)"
      % (have, torch_now, hvd.gloo_built(), bool(hvd.nccl_built()), hvd.mpi_built()))
EOF
}

if [[ ${INSTALL_HOROVOD_FORCE:-0} != 1 ]]; then
    if status_line=$(check_installed quick 2>&1); then
        log "already installed in $(dirname "$VENV_BIN"): $status_line; nothing to do (INSTALL_HOROVOD_FORCE=1 rebuilds)"
        exit 0
    fi
    log "${status_line##*$'\n'}: building"
fi

# ---------------------------------------------------------------------------
# 2. Temp dir, log file, cleanup
# ---------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-horovod.XXXXXX")
LOG=${INSTALL_HOROVOD_LOG:-${TMPDIR:-/tmp}/horovod-install-$(date +%Y%m%d-%H%M%S)-$$.log}
mkdir -p "$(dirname "$LOG")"
: >"$LOG"
BUILD_PID=

cleanup() {
    local rc=$?
    if [[ -n $BUILD_PID ]] && kill -0 "$BUILD_PID" 2>/dev/null; then
        # The build runs in its own process group (setsid): stop pip, cmake, make and the compilers.
        kill -TERM -- "-$BUILD_PID" 2>/dev/null || kill -TERM "$BUILD_PID" 2>/dev/null || true
        wait "$BUILD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE  # output piped into e.g. `head`: still clean up

fail() {  # fail "what failed" "hint..."
    local what=$1; shift
    {
        echo
        if [[ -s $LOG ]]; then
            echo "----- last 40 lines of $LOG -----"
            tail -n 40 "$LOG"
            echo "----------------------------------"
            # The tail is mostly pip's traceback: also show the first compiler/CMake errors.
            local first_errors
            first_errors=$(grep -n -E '(^|[[:space:]])(error:|fatal error|CMake Error|Killed signal|g?make(\[[0-9]+\])?: \*\*\*)' "$LOG" \
                | grep -v 'subprocess-exited-with-error' | head -n 8 | cut -c1-300 || true)
            if [[ -n $first_errors ]]; then
                echo "----- first error lines (line numbers in the log) -----"
                echo "$first_errors"
                echo "----------------------------------"
            fi
        fi
        echo "[install_horovod] FAILED: $what"
        echo "  Full log: $LOG"
        for hint in "$@"; do echo "  - $hint"; done
        note_optional
    } >&2
    exit 1
}

log "target python: $PY"
log "log file:      $LOG"
{
    echo "# install_horovod.sh: horovod $HVD_VERSION into $PY"
    echo "# started $(date)"
    echo "# host $(uname -a)"
} >>"$LOG"

# ---------------------------------------------------------------------------
# 3. Preflight: toolchain and venv
# ---------------------------------------------------------------------------
"$PY" -m pip --version >/dev/null 2>&1 \
    || fail "pip is not available in the venv ($PY -m pip)" "recreate the venv with pip (python -m venv .venv)"

TORCH_INFO=$("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "", getattr(torch.version, "hip", None) or "", sep="|")' 2>>"$LOG") \
    || fail "torch cannot be imported in the venv" "install the project first: $VENV_BIN/pip install -e '.[test]'"
IFS='|' read -r TORCH_VERSION TORCH_CUDA TORCH_HIP <<<"$TORCH_INFO"
log "torch $TORCH_VERSION${TORCH_CUDA:+ (CUDA $TORCH_CUDA)}${TORCH_HIP:+ (HIP $TORCH_HIP)}"

# The venv's bin first: a pip-installed cmake there is found, and so is horovodrun later.
export PATH="$VENV_BIN:$PATH"

CMAKE_BIN=${HOROVOD_CMAKE:-cmake}
command -v "$CMAKE_BIN" >/dev/null 2>&1 \
    || fail "cmake not found" "install CMake >= 3.13: apt-get install cmake (or $PY -m pip install cmake)"
cmake_version=$("$CMAKE_BIN" --version | head -n1 | grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1)
if ! printf '%s\n%s\n' 3.13 "$cmake_version" | sort -V -C; then
    fail "cmake $cmake_version is too old (Horovod needs >= 3.13)" "apt-get install cmake, or $PY -m pip install cmake"
fi

CXX_BIN=${CXX:-g++}
CC_BIN=${CC:-gcc}
command -v "$CXX_BIN" >/dev/null 2>&1 || fail "C++ compiler '$CXX_BIN' not found" "apt-get install g++ (or load a gcc module on the cluster)"
command -v "$CC_BIN" >/dev/null 2>&1 || fail "C compiler '$CC_BIN' not found" "apt-get install gcc (or load a gcc module on the cluster)"
printf 'int main() { if constexpr (true) { return 0; } }\n' >"$WORK/cxx17.cc"
"$CXX_BIN" -std=c++17 "$WORK/cxx17.cc" -o "$WORK/cxx17" >>"$LOG" 2>&1 \
    || fail "'$CXX_BIN' cannot compile C++17 (torch >= 2.1 headers need it)" "use gcc >= 9: apt-get install g++, or export CXX=/path/to/newer/g++"
if [[ -z ${CMAKE_GENERATOR:-} ]]; then
    command -v make >/dev/null 2>&1 || fail "make not found" "apt-get install make (or build-essential)"
fi

PY_INCLUDE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[[ -f $PY_INCLUDE/Python.h ]] \
    || fail "Python headers not found ($PY_INCLUDE/Python.h)" "install the python dev package, e.g. apt-get install python3-dev"

log "toolchain: cmake $cmake_version, $("$CXX_BIN" --version | head -n1), Python.h OK"

# ---------------------------------------------------------------------------
# 4. Build settings (user-provided HOROVOD_* values win over the defaults)
# ---------------------------------------------------------------------------
export HOROVOD_WITH_PYTORCH=${HOROVOD_WITH_PYTORCH:-1}
export HOROVOD_WITH_GLOO=${HOROVOD_WITH_GLOO:-1}
export HOROVOD_WITHOUT_TENSORFLOW=${HOROVOD_WITHOUT_TENSORFLOW:-1}
export HOROVOD_WITHOUT_MXNET=${HOROVOD_WITHOUT_MXNET:-1}
# No MPI by default (gloo + horovodrun is enough); HOROVOD_WITH_MPI=1 enables it.
if [[ -z ${HOROVOD_WITH_MPI:-} ]]; then
    export HOROVOD_WITHOUT_MPI=${HOROVOD_WITHOUT_MPI:-1}
fi

if [[ -n ${HOROVOD_GPU_OPERATIONS+set} ]]; then
    mode_reason="HOROVOD_GPU_OPERATIONS set in the environment"
elif command -v nvidia-smi >/dev/null 2>&1; then
    if [[ -n $TORCH_CUDA ]]; then
        export HOROVOD_GPU_OPERATIONS=NCCL
        mode_reason="nvidia-smi found and torch is a CUDA build"
    else
        mode_reason="nvidia-smi found, but torch in this venv is CPU-only"
        log "warning: $mode_reason; building CPU/Gloo only"
    fi
else
    mode_reason="no nvidia-smi"
fi

if [[ -n ${HOROVOD_GPU_OPERATIONS:-} ]]; then
    log "build mode: GPU, HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS ($mode_reason)"
    if [[ -z $TORCH_CUDA && -z $TORCH_HIP ]]; then
        log "warning: torch $TORCH_VERSION has no CUDA/ROCm support; a GPU build of Horovod is unlikely to be useful"
    fi
    if [[ -n $TORCH_CUDA ]] && ! command -v nvcc >/dev/null 2>&1 \
        && [[ ! -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]]; then
        log "warning: nvcc not on PATH nor in \${CUDA_HOME:-/usr/local/cuda}/bin; CMake may not find the CUDA toolkit (module load cuda / export CUDA_HOME)"
    fi
    # NCCL: unless the user points at one, use the NCCL wheel that torch itself loads.
    if [[ ${HOROVOD_GPU_OPERATIONS} == NCCL || ${HOROVOD_GPU_ALLREDUCE:-} == NCCL ]] \
        && [[ -z ${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-} ]]; then
        nccl_dir=$("$PY" -c '
import importlib.util, os
spec = importlib.util.find_spec("nvidia.nccl")
for d in (spec.submodule_search_locations or []) if spec else []:
    if os.path.isfile(os.path.join(d, "include", "nccl.h")):
        print(d); break
' 2>/dev/null || true)
        nccl_so=
        if [[ -n $nccl_dir ]]; then
            for f in "$nccl_dir"/lib/libnccl.so*; do [[ -f $f ]] && { nccl_so=$f; break; }; done
        fi
        if [[ -n $nccl_so ]]; then
            # The wheel ships only libnccl.so.2; CMake looks for libnccl.so.
            mkdir -p "$WORK/nccl-lib"
            ln -s "$nccl_so" "$WORK/nccl-lib/libnccl.so"
            export HOROVOD_NCCL_INCLUDE="$nccl_dir/include" HOROVOD_NCCL_LIB="$WORK/nccl-lib" HOROVOD_NCCL_LINK=SHARED
            log "NCCL: using the venv's NCCL wheel ($nccl_so)"
        else
            log "NCCL: no HOROVOD_NCCL_HOME/INCLUDE/LIB set and no nvidia-nccl wheel in the venv; relying on CMake's search (CUDA toolkit dirs)"
        fi
    fi
else
    unset HOROVOD_GPU_OPERATIONS
    log "build mode: CPU only, Gloo ($mode_reason)"
fi

JOBS=$(nproc 2>/dev/null || echo 2)
export MAKEFLAGS=${MAKEFLAGS:--j$JOBS}
# Horovod's own default is -mf16c -mavx -mfma (x86-64); override with HOROVOD_BUILD_ARCH_FLAGS
# (e.g. HOROVOD_BUILD_ARCH_FLAGS="-march=native" or "" for old CPUs) if compute nodes differ.
log "MAKEFLAGS=$MAKEFLAGS${HOROVOD_BUILD_ARCH_FLAGS+, HOROVOD_BUILD_ARCH_FLAGS=\"$HOROVOD_BUILD_ARCH_FLAGS\"}"
{
    echo "# build environment:"
    env | grep -E '^(HOROVOD_|MAKEFLAGS=|CC=|CXX=|CUDA_HOME=|CMAKE_)' | sort | sed 's/^/#   /'
} >>"$LOG"

# ---------------------------------------------------------------------------
# 5. Python build/runtime dependencies (installed only if missing: pinned
#    versions already in the venv are left alone)
# ---------------------------------------------------------------------------
missing=$("$PY" - <<'EOF'
from importlib import metadata
import re
need = ["setuptools", "cloudpickle", "psutil", "pyyaml", "packaging", "cffi"]
out = []
for n in need:
    try:
        metadata.version(n)
    except metadata.PackageNotFoundError:
        out.append(n)
# setuptools < 70.1 needs the separate 'wheel' package to build wheels.
try:
    st = tuple(int(x) for x in re.findall(r"\d+", metadata.version("setuptools"))[:2])
except metadata.PackageNotFoundError:
    st = (0, 0)
if st < (70, 1):
    try:
        metadata.version("wheel")
    except metadata.PackageNotFoundError:
        out.append("wheel")
print(" ".join(out))
EOF
)
if [[ -n $missing ]]; then
    log "installing missing build/runtime dependencies: $missing"
    # shellcheck disable=SC2086
    "$PY" -m pip install $missing >>"$LOG" 2>&1 \
        || fail "pip could not install: $missing" "check network/proxy settings (PIP_INDEX_URL) and the log"
fi

# ---------------------------------------------------------------------------
# 6. Get the sdist and patch it to C++17
# ---------------------------------------------------------------------------
if [[ -n ${INSTALL_HOROVOD_SDIST:-} ]]; then
    [[ -f $INSTALL_HOROVOD_SDIST ]] || fail "INSTALL_HOROVOD_SDIST=$INSTALL_HOROVOD_SDIST does not exist"
    SDIST=$INSTALL_HOROVOD_SDIST
    log "using sdist $SDIST"
else
    log "downloading horovod==$HVD_VERSION sdist"
    "$PY" -m pip download --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$WORK/dl" >>"$LOG" 2>&1 \
        || fail "download of the horovod==$HVD_VERSION sdist" \
                "check network/proxy settings (PIP_INDEX_URL), or download horovod-$HVD_VERSION.tar.gz elsewhere and set INSTALL_HOROVOD_SDIST=/path/to/it"
    SDIST="$WORK/dl/horovod-$HVD_VERSION.tar.gz"
    [[ -f $SDIST ]] || fail "pip download did not produce horovod-$HVD_VERSION.tar.gz"
fi
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src" || fail "cannot unpack $SDIST"
SRC="$WORK/src/horovod-$HVD_VERSION"
[[ -f $SRC/setup.py && -f $SRC/CMakeLists.txt ]] || fail "unexpected sdist layout: $SRC/setup.py or CMakeLists.txt missing"

patch_cxx17() {  # patch_cxx17 FILE: every set(CMAKE_CXX_STANDARD 11|14) -> 17, verified
    local f="$SRC/$1"
    [[ -f $f ]] || fail "patching: $1 not found in the sdist" "is this really horovod $HVD_VERSION?"
    if ! grep -Eq 'set\(CMAKE_CXX_STANDARD[[:space:]]+(11|14|17)\)' "$f"; then
        fail "patching: no 'set(CMAKE_CXX_STANDARD ...)' line in $1" "the sdist differs from horovod $HVD_VERSION as expected by this script"
    fi
    sed -E -i 's/set\(CMAKE_CXX_STANDARD[[:space:]]+(11|14)\)/set(CMAKE_CXX_STANDARD 17)/' "$f"
    if grep -Eq 'set\(CMAKE_CXX_STANDARD[[:space:]]+(11|14)\)' "$f" \
        || ! grep -Eq 'set\(CMAKE_CXX_STANDARD 17\)' "$f"; then
        fail "patching: $1 still does not request C++17 after sed"
    fi
    echo "# patched $1: $(grep -En 'set\(CMAKE_CXX_STANDARD 17\)' "$f" | tr '\n' ' ')" >>"$LOG"
}
patch_cxx17 CMakeLists.txt
patch_cxx17 horovod/torch/CMakeLists.txt
# The CUDA kernels (GPU builds only) are pinned to C++11; recent CUDA toolkits
# (CCCL) need C++17, which every nvcc since CUDA 11 supports.
if grep -Eq 'set\(CMAKE_CUDA_STANDARD[[:space:]]+11\)' "$SRC/horovod/common/ops/cuda/CMakeLists.txt" 2>/dev/null; then
    sed -E -i 's/set\(CMAKE_CUDA_STANDARD[[:space:]]+11\)/set(CMAKE_CUDA_STANDARD 17)/' "$SRC/horovod/common/ops/cuda/CMakeLists.txt"
    grep -q 'set(CMAKE_CUDA_STANDARD 17)' "$SRC/horovod/common/ops/cuda/CMakeLists.txt" \
        || fail "patching: CMAKE_CUDA_STANDARD in horovod/common/ops/cuda/CMakeLists.txt"
fi
log "patched CMake files to C++17"

# ---------------------------------------------------------------------------
# 7. Build a wheel (or take it from the cache), then install it
# ---------------------------------------------------------------------------
# The wheel is kept outside the checkout, keyed by everything that goes into
# it: the sdist, this script (the patches), Python, torch, the compiler, the
# machine and the build settings. A second install on the same machine (a new
# clone, CI) then takes seconds instead of minutes.
# INSTALL_HOROVOD_CACHE=DIR chooses the folder; INSTALL_HOROVOD_CACHE= (empty) disables it.
CACHE_ROOT=${INSTALL_HOROVOD_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/virgo-exps/wheels}
KEY=$(
    {
        sha256sum "$SDIST" "$0" | cut -d' ' -f1
        "$PY" -c 'import sys, platform; from importlib import metadata; print(sys.version, platform.machine(), metadata.version("torch"))'
        "${CXX:-g++}" --version 2>/dev/null | head -n1
        env | grep -E '^(HOROVOD_|CUDA_HOME=|CC=|CXX=)' | sort
    } | sha256sum | cut -c1-20
)
CACHED=
if [[ -n $CACHE_ROOT ]]; then
    CACHED=$(ls "$CACHE_ROOT/horovod-$KEY"/horovod-"$HVD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
fi
if [[ -n $CACHED ]]; then
    log "using the cached wheel $CACHED (key $KEY)"
    "$PY" -m pip install --no-deps --force-reinstall --no-cache-dir "$CACHED" >>"$LOG" 2>&1 \
        || fail "installing the cached wheel $CACHED" "remove $CACHE_ROOT/horovod-$KEY and rerun to build it again"
else
    log "building with $JOBS cores (takes minutes: the CPU build takes about 6 min on 2 cores; GPU builds longer; progress every 30 s)"
    START=$(date +%s)
    # The build gets its own process group so that cleanup() can stop all of it.
    SETSID=
    command -v setsid >/dev/null 2>&1 && SETSID=setsid
    # --no-deps: the dependencies were checked above; pip must not touch torch or other pins.
    $SETSID "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-cache-dir -w "$WORK/wheel" "$SRC" \
        >>"$LOG" 2>&1 </dev/null &
    BUILD_PID=$!

    last_report=$START
    while kill -0 "$BUILD_PID" 2>/dev/null; do
        sleep 2
        now=$(date +%s)
        if (( now - last_report >= 30 )); then
            last_report=$now
            progress=$(grep -Eo '\[ *[0-9]+%\] [A-Za-z]+.*' "$LOG" | tail -n1 | cut -c1-110 || true)
            [[ -n $progress ]] || progress=$(tail -n1 "$LOG" | cut -c1-110)
            log "$(printf '%4ds' $((now - START))) $progress"
        fi
    done
    if wait "$BUILD_PID"; then rc=0; else rc=$?; fi
    BUILD_PID=
    ELAPSED=$(( $(date +%s) - START ))
    echo "# build finished with rc=$rc after ${ELAPSED}s" >>"$LOG"

    if (( rc != 0 )); then
        fail "building horovod $HVD_VERSION (pip exit code $rc, after ${ELAPSED}s)" \
            "check the compiler and CMake: cmake >= 3.13 and g++ >= 9 (apt-get install cmake g++), and Python headers (apt-get install python3-dev)" \
            "look for the first 'error:' in the log: grep -n 'error:' $LOG | head" \
            "out of memory (g++ killed)? retry with fewer jobs: MAKEFLAGS=-j$(( JOBS > 1 ? JOBS / 2 : 1 )) $0 $PY" \
            "GPU build: check nvcc/CUDA_HOME and NCCL (HOROVOD_NCCL_HOME), or build CPU-only: HOROVOD_GPU_OPERATIONS= $0 $PY"
    fi
    WHEEL=$(ls "$WORK/wheel"/horovod-*.whl 2>/dev/null | head -n1 || true)
    [[ -n $WHEEL ]] || fail "pip wheel finished but left no horovod wheel in $WORK/wheel"
    # --force-reinstall: replace a broken or mismatched horovod of the same version.
    "$PY" -m pip install --no-deps --force-reinstall --no-cache-dir "$WHEEL" >>"$LOG" 2>&1 \
        || fail "installing the built wheel $WHEEL"
    log "build + install finished in ${ELAPSED}s"
fi

# ---------------------------------------------------------------------------
# 8. Verify
# ---------------------------------------------------------------------------
if ! status_line=$(check_installed full 2>>"$LOG"); then
    "$PY" -c 'import horovod.torch' >>"$LOG" 2>&1 || true
    fail "horovod $HVD_VERSION was installed but is not usable: $status_line" \
        "the torch extension may not have been built: grep -n 'torch' $LOG | tail" \
        "a torch upgrade after building breaks the extension: rerun with INSTALL_HOROVOD_FORCE=1"
fi
log "OK: $status_line"
if [[ -z $CACHED && -n $CACHE_ROOT ]]; then
    # Only a verified wheel goes into the cache; copy then rename, so a reader never sees half a file.
    if mkdir -p "$CACHE_ROOT/horovod-$KEY" 2>/dev/null \
        && cp "$WHEEL" "$CACHE_ROOT/horovod-$KEY/.$(basename "$WHEEL").tmp-$$" \
        && mv "$CACHE_ROOT/horovod-$KEY/.$(basename "$WHEEL").tmp-$$" "$CACHE_ROOT/horovod-$KEY/$(basename "$WHEEL")"; then
        log "wheel cached in $CACHE_ROOT/horovod-$KEY (the next install with the same inputs skips the build)"
    else
        log "warning: could not cache the wheel in $CACHE_ROOT (the install itself is fine)"
    fi
fi
if [[ -x $VENV_BIN/horovodrun ]]; then
    log "launcher: $VENV_BIN/horovodrun (e.g. $VENV_BIN/horovodrun --gloo -np 2 -H localhost:2 $PY train.py)"
    "$VENV_BIN/horovodrun" --check-build 2>&1 | sed 's/^/    /' || true
else
    log "warning: horovodrun not found in $VENV_BIN"
fi
log "full build log: $LOG"
