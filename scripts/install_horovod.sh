#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch frontend, Gloo controller, optional
# NCCL GPU operations) into an existing virtual environment.
#
# Usage: scripts/install_horovod.sh [PATH_TO_VENV_PYTHON] [HOROVOD_VAR=VALUE ...]
#   PATH_TO_VENV_PYTHON  default .venv/bin/python (the repository's, when run from elsewhere)
#   HOROVOD_VAR=VALUE    extra build settings, e.g. HOROVOD_BUILD_CUDA_CC_LIST=80,90
#                        (HOROVOD_* variables of the environment are passed on as well)
#
# Why a script: horovod 0.28.1 (the last release) asks CMake for C++14, but the
# headers of torch >= 2.1 need C++17. The sdist is patched to C++17 and built
# with `pip wheel --no-build-isolation` against the venv's torch.
#
# GPU (NCCL) build when HOROVOD_GPU_OPERATIONS is set, or when nvidia-smi is on
# PATH and torch is a CUDA build (needs nvcc; the venv's nvidia-nccl wheel is used
# unless HOROVOD_NCCL_* say otherwise). CPU/Gloo otherwise; force it with
# `HOROVOD_GPU_OPERATIONS= scripts/install_horovod.sh`.
#
# The wheel is kept in INSTALL_HOROVOD_CACHE (default ~/.cache/virgo-exps/wheels;
# empty: no cache), keyed by everything that goes into it (the sdist, the patches,
# Python, torch, the compiler, the machine, the build settings): a second install
# on the same machine takes minutes less.
# Other knobs: INSTALL_HOROVOD_FORCE=1 (reinstall even when a working horovod is
# there), INSTALL_HOROVOD_SDIST=FILE (no download), INSTALL_HOROVOD_LOG=FILE,
# MAKEFLAGS (default -j$(nproc)).
#
# Horovod is optional: the other strategies (single, ddp, deepspeed) work without it.
set -euo pipefail
VERSION=0.28.1
# The patches, as sed expressions per file; they are part of the cache key.
PATCHES=(
    'CMakeLists.txt|s/set\(CMAKE_CXX_STANDARD[[:space:]]+(11|14)\)/set(CMAKE_CXX_STANDARD 17)/'
    'horovod/torch/CMakeLists.txt|s/set\(CMAKE_CXX_STANDARD[[:space:]]+(11|14)\)/set(CMAKE_CXX_STANDARD 17)/'
    # The CUDA kernels: recent toolkits (CCCL) need C++17, which every nvcc since CUDA 11 has.
    'horovod/common/ops/cuda/CMakeLists.txt|s/set\(CMAKE_CUDA_STANDARD[[:space:]]+11\)/set(CMAKE_CUDA_STANDARD 17)/'
)

log() { printf '[install_horovod] %s\n' "$*"; }
fail() {  # fail WHAT [HINT...]: the log's tail and first errors, the hints, exit 1
    local what=$1; shift
    { if [[ -s ${LOG:-} ]]; then
          echo "----- last 40 lines of $LOG -----"; tail -n 40 "$LOG"
          echo "----- first error lines -----"
          grep -n -E '(error:|fatal error|CMake Error|Killed signal|make(\[[0-9]+\])?: \*\*\*)' "$LOG" \
              | grep -v subprocess-exited-with-error | head -n 8 | cut -c1-300 || true
      fi
      echo "[install_horovod] FAILED: $what${LOG:+ (full log: $LOG)}"
      for hint in "$@"; do echo "  - $hint"; done
      echo "  Horovod is optional: the other strategies (single, ddp, deepspeed) keep working without it."
    } >&2
    exit 1
}

PY=
for arg in "$@"; do
    case $arg in
        -h|--help) sed -n '2,/^set -e/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        HOROVOD_*=*) [[ ${arg%%=*} =~ ^HOROVOD_[A-Za-z0-9_]+$ ]] || fail "invalid variable name in '$arg'"
                     export "${arg?}" ;;
        *) [[ -z $PY ]] || fail "unexpected argument '$arg' (see --help)"; PY=$arg ;;
    esac
done
if [[ -z $PY ]]; then
    PY=.venv/bin/python
    [[ -x $PY ]] || PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
fi
[[ -x $PY ]] || fail "python '$PY' not found (pass the venv's python, e.g. .venv/bin/python)"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute, the venv's link kept
BIN=$(dirname "$PY")
export PATH="$BIN:$PATH"  # a pip-installed cmake is found, and horovodrun later

# check quick|full: one line saying whether horovod $VERSION is usable; quick does not import torch
# (seconds), but compares the torch version horovod's extension was built for, as horovod does.
check() {
    "$PY" - "$VERSION" "$1" <<'EOF'
import glob, json, os, sys
from importlib import metadata, util
want, mode = sys.argv[1:]
try:
    have = metadata.version("horovod")
except metadata.PackageNotFoundError:
    sys.exit(print("horovod is not installed") or 3)
pkg = list(util.find_spec("horovod").submodule_search_locations)[0]
try:
    built = json.load(open(os.path.join(pkg, "metadata.json"))).get("pytorch")
except (OSError, ValueError):
    built = None
torch = metadata.version("torch")
if have.split("+")[0] != want:
    sys.exit(print(f"horovod {have} is installed, want {want}") or 4)
if not glob.glob(os.path.join(pkg, "torch", "mpi_lib_v2*.so")):
    sys.exit(print(f"horovod {have} is installed without its torch extension") or 5)
if built != torch:
    sys.exit(print(f"horovod {have} was built for torch {built}, the venv has torch {torch}") or 6)
if mode == "full":
    try:
        import horovod.torch as hvd
    except Exception as e:
        sys.exit(print(f"import horovod.torch fails: {type(e).__name__}: {e}") or 7)
    have += f", import horovod.torch OK (gloo={hvd.gloo_built()} nccl={bool(hvd.nccl_built())} mpi={hvd.mpi_built()})"
print(f"horovod {have} (built for torch {built})")
EOF
}
if [[ ${INSTALL_HOROVOD_FORCE:-0} != 1 ]]; then
    if line=$(check quick 2>&1); then log "already installed: $line; nothing to do (INSTALL_HOROVOD_FORCE=1 reinstalls)"; exit 0; fi
    log "${line##*$'\n'}: installing"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/install-horovod.XXXXXX")
LOG=${INSTALL_HOROVOD_LOG:-${TMPDIR:-/tmp}/horovod-install-$(date +%Y%m%d-%H%M%S)-$$.log}
mkdir -p "$(dirname "$LOG")" && : >"$LOG"
BUILD_PID=
cleanup() {  # the build runs in its own process group: stop pip, cmake, make and the compilers with it
    local rc=$?
    [[ -n $BUILD_PID ]] && { kill -TERM -- "-$BUILD_PID" 2>/dev/null || kill "$BUILD_PID" 2>/dev/null; wait "$BUILD_PID"; } 2>/dev/null
    rm -rf "$WORK"; exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM
trap 'exit 129' HUP
trap 'exit 141' PIPE  # output piped into e.g. head: still clean up
log "target python $PY; log $LOG"

# Toolchain: fail early with the fix rather than deep in CMake's output.
IFS='|' read -r TORCH TORCH_CUDA < <("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda or "", sep="|")' 2>>"$LOG") \
    || fail "torch cannot be imported in the venv" "install the project first: $BIN/pip install -e '.[test]'"
CMAKE_VERSION=$("${HOROVOD_CMAKE:-cmake}" --version 2>/dev/null | grep -Eo '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -n1) \
    || fail "cmake not found" "apt-get install cmake (or $PY -m pip install cmake)"
printf '3.13\n%s\n' "$CMAKE_VERSION" | sort -V -C || fail "cmake $CMAKE_VERSION is older than 3.13" "apt-get install cmake"
printf 'int main() { if constexpr (true) { return 0; } }\n' >"$WORK/c17.cc"
"${CXX:-g++}" -std=c++17 "$WORK/c17.cc" -o "$WORK/c17" >>"$LOG" 2>&1 \
    || fail "'${CXX:-g++}' cannot compile C++17 (torch >= 2.1 headers need it)" "use gcc >= 9: apt-get install g++, or export CXX=..."
command -v "${CC:-gcc}" >/dev/null || fail "C compiler '${CC:-gcc}' not found" "apt-get install gcc"
[[ -n ${CMAKE_GENERATOR:-} ]] || command -v make >/dev/null || fail "make not found" "apt-get install make"
[[ -f $("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h ]] \
    || fail "Python headers (Python.h) not found" "apt-get install python3-dev"
log "torch $TORCH${TORCH_CUDA:+ (CUDA $TORCH_CUDA)}, cmake $CMAKE_VERSION, $("${CXX:-g++}" --version | head -n1)"

# Build settings: values given by the user win.
export HOROVOD_WITH_PYTORCH=${HOROVOD_WITH_PYTORCH:-1} HOROVOD_WITH_GLOO=${HOROVOD_WITH_GLOO:-1}
export HOROVOD_WITHOUT_TENSORFLOW=${HOROVOD_WITHOUT_TENSORFLOW:-1} HOROVOD_WITHOUT_MXNET=${HOROVOD_WITHOUT_MXNET:-1}
[[ -n ${HOROVOD_WITH_MPI:-} ]] || export HOROVOD_WITHOUT_MPI=${HOROVOD_WITHOUT_MPI:-1}  # Gloo and horovodrun suffice
if [[ -z ${HOROVOD_GPU_OPERATIONS+set} ]] && command -v nvidia-smi >/dev/null && [[ -n $TORCH_CUDA ]]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
fi
if [[ -n ${HOROVOD_GPU_OPERATIONS:-} ]]; then
    log "GPU build, HOROVOD_GPU_OPERATIONS=$HOROVOD_GPU_OPERATIONS"
    command -v nvcc >/dev/null || [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] \
        || log "warning: no nvcc on PATH nor in \${CUDA_HOME:-/usr/local/cuda}/bin; CMake may not find CUDA"
    if [[ -z ${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-} ]]; then
        # The NCCL torch loads (the nvidia-nccl wheel) ships only libnccl.so.2; CMake looks for libnccl.so.
        NCCL=$("$PY" -c 'import nvidia.nccl as n; print(list(n.__path__)[0])' 2>/dev/null || true)
        if [[ -n $NCCL ]] && so=$(ls "$NCCL"/lib/libnccl.so* 2>/dev/null | head -n1) && [[ -n $so ]]; then
            mkdir -p "$WORK/nccl" && ln -s "$so" "$WORK/nccl/libnccl.so"
            export HOROVOD_NCCL_INCLUDE=$NCCL/include HOROVOD_NCCL_LIB=$WORK/nccl HOROVOD_NCCL_LINK=SHARED
            log "NCCL from the venv: $so"
        fi
    fi
else
    unset HOROVOD_GPU_OPERATIONS
    log "CPU build (Gloo)"
fi
export MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}
env | grep -E '^(HOROVOD_|MAKEFLAGS=|CC=|CXX=|CUDA_HOME=|CMAKE_)' | sort | sed 's/^/# /' >>"$LOG"

# Build and runtime dependencies that are missing (pinned ones already in the venv are left alone).
missing=$("$PY" -c '
from importlib import metadata
def has(n):
    try: return metadata.version(n)
    except metadata.PackageNotFoundError: return None
need = ["setuptools", "cloudpickle", "psutil", "pyyaml", "packaging", "cffi"]
st = tuple(int(x) for x in (has("setuptools") or "0.0").split(".")[:2] if x.isdigit())
print(" ".join([n for n in need if not has(n)] + (["wheel"] if st < (70, 1) and not has("wheel") else [])))')
if [[ -n $missing ]]; then
    log "installing $missing"
    "$PY" -m pip install $missing >>"$LOG" 2>&1 || fail "pip install $missing" "check the network and PIP_INDEX_URL"
fi

SDIST=${INSTALL_HOROVOD_SDIST:-}
if [[ -z $SDIST ]]; then
    log "downloading the horovod==$VERSION sdist"
    "$PY" -m pip download --no-deps --no-binary :all: "horovod==$VERSION" -d "$WORK/dl" >>"$LOG" 2>&1 \
        || fail "downloading the horovod $VERSION sdist" "offline: fetch horovod-$VERSION.tar.gz elsewhere, set INSTALL_HOROVOD_SDIST=FILE"
    SDIST=$WORK/dl/horovod-$VERSION.tar.gz
fi
[[ -f $SDIST ]] || fail "no sdist at $SDIST"

CACHE=${INSTALL_HOROVOD_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/virgo-exps/wheels}
KEY=$({ sha256sum "$SDIST" | cut -d' ' -f1; printf '%s\n' "${PATCHES[@]}"
        "$PY" -c 'import sys, platform; from importlib import metadata; print(sys.version, platform.machine(), metadata.version("torch"))'
        "${CXX:-g++}" --version | head -n1; env | grep -E '^(HOROVOD_|CUDA_HOME=|CC=|CXX=)' | sort; } | sha256sum | cut -c1-20)
WHEEL=$(ls "$CACHE/horovod-$KEY"/horovod-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
[[ -n $CACHE ]] || WHEEL=
if [[ -n $WHEEL ]]; then
    log "using the cached wheel $WHEEL"
else
    tar -xzf "$SDIST" -C "$WORK" || fail "cannot unpack $SDIST"
    SRC=$WORK/horovod-$VERSION
    for patch in "${PATCHES[@]}"; do
        file=$SRC/${patch%%|*} expr=${patch#*|}
        [[ -f $file || $file == */cuda/* ]] || fail "patching: ${patch%%|*} is not in the sdist"
        [[ -f $file ]] && sed -E -i "$expr" "$file"
    done
    for file in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
        grep -q 'set(CMAKE_CXX_STANDARD 17)' "$file" && ! grep -Eq 'CMAKE_CXX_STANDARD[[:space:]]+1[14]\)' "$file" \
            || fail "patching: $file does not ask for C++17 after the patch"
    done
    log "patched to C++17; building with MAKEFLAGS=$MAKEFLAGS (the CPU build takes about 6 min on 2 cores; progress every 30 s)"
    START=$(date +%s)
    setsid "$PY" -m pip wheel -v --no-build-isolation --no-deps --no-cache-dir -w "$WORK/wheel" "$SRC" >>"$LOG" 2>&1 </dev/null &
    BUILD_PID=$!
    while kill -0 "$BUILD_PID" 2>/dev/null; do
        sleep 2
        (( ($(date +%s) - START) % 30 < 2 )) && log "$(( $(date +%s) - START ))s $(grep -Eo '\[ *[0-9]+%\].*' "$LOG" | tail -n1 | cut -c1-100)"
    done
    wait "$BUILD_PID" && rc=0 || rc=$?
    BUILD_PID=
    (( rc == 0 )) || fail "building horovod $VERSION (pip exit code $rc after $(( $(date +%s) - START ))s)" \
        "out of memory (g++ killed)? MAKEFLAGS=-j1 $0 $PY" \
        "GPU build: check nvcc/CUDA_HOME and NCCL (HOROVOD_NCCL_HOME), or build for the CPU: HOROVOD_GPU_OPERATIONS= $0 $PY"
    WHEEL=$(ls "$WORK"/wheel/horovod-*.whl 2>/dev/null) || fail "pip wheel left no horovod wheel in $WORK/wheel"
fi
# --no-deps: pip must not touch torch or other pins; --force-reinstall: replace a broken horovod of this version.
"$PY" -m pip install --no-deps --force-reinstall --no-cache-dir "$WHEEL" >>"$LOG" 2>&1 || fail "installing $WHEEL"
line=$(check full 2>>"$LOG") || fail "horovod was installed but is not usable: $line" \
    "a torch upgrade after building breaks the extension: rerun with INSTALL_HOROVOD_FORCE=1"
log "OK: $line"
if [[ -n $CACHE && $WHEEL == "$WORK"/* ]]; then  # only a verified wheel, copied then renamed (no half files)
    dest=$CACHE/horovod-$KEY/$(basename "$WHEEL")
    mkdir -p "${dest%/*}" && cp "$WHEEL" "$dest.tmp-$$" && mv "$dest.tmp-$$" "$dest" \
        && log "wheel cached in ${dest%/*}" || log "warning: could not cache the wheel in $CACHE"
fi
"$BIN/horovodrun" --check-build 2>&1 | sed 's/^/    /' || log "warning: horovodrun --check-build failed"
