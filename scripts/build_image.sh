#!/usr/bin/env bash
# Build the project's container image from the pinned files alone (`make image`).
#
# Usage: scripts/build_image.sh [PATH_TO_VENV_PYTHON]
#
#   1. a Debian root file system from Debian's packages (mmdebstrap, minbase + python3, git);
#   2. /opt/venv with the Python packages of pyproject.toml at the versions of requirements.lock, installed
#      from wheels that the checkout's pip gathers first (no package index is reached from inside), and the
#      project's metadata (its entry points) without its code: the checkout's code runs in the image;
#   3. Horovod from the wheel cache of `make horovod`, when the venv has Horovod;
#   4. empty folders at the top of the tree that clusters keep their files under (IMAGE_MOUNTS), for the
#      runtime to bind the checkout and the shared folders onto;
#   5. /virgo-image.json: every file with its type, mode, size and SHA-256; the image's digest is that
#      list's SHA-256 (python -m virgo_exps.container);
#   6. a SquashFS file of the same tree, for a cluster (ch-run and apptainer run it as it is).
#
# The image is kept in VIRGO_IMAGE_CACHE (default ~/.cache/virgo-exps/images), in a folder named by the
# SHA-256 of everything that goes into it (this script, pyproject.toml, requirements.lock, the Debian
# suite, packages and sources, IMAGE_MOUNTS, the Horovod wheel): a second build of the same inputs takes a
# second. .virgo/image in the checkout points at the one of its inputs.
# Needs root (mmdebstrap --mode=root) or unprivileged user namespaces (--mode=unshare), and charliecloud.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
SUITE=${IMAGE_SUITE:-bookworm}
PACKAGES=python3,python3-venv,git,ca-certificates,procps
MOUNTS=${IMAGE_MOUNTS:-/work /scratch /p /gpfs /data /project /users /lustre}
CACHE=${VIRGO_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/virgo-exps/images}
SOURCES=${IMAGE_APT_SOURCES:-}
if [[ -z $SOURCES ]]; then  # the host's own Debian sources: the image comes from where the host's packages do
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        [[ -s $f ]] && { SOURCES=$f; break; }
    done
fi
# mtimes of the tree (mmdebstrap clamps to it; mksquashfs sets every time to it): not part of the digest,
# but of the SquashFS file's bytes
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}

log() { printf '[image] %s\n' "$*"; }
fail() { printf '[image] FAILED: %s\n' "$1" >&2; shift; for h in "$@"; do printf '  - %s\n' "$h" >&2; done; exit 1; }

for tool in mmdebstrap ch-run mksquashfs; do
    command -v "$tool" >/dev/null || fail "$tool is not installed" \
        "Debian: apt-get install mmdebstrap charliecloud squashfs-tools squashfuse"
done
[[ -x $PY ]] || fail "no Python at $PY" "run make venv first"
[[ -n $SOURCES ]] || fail "no Debian sources found" "set IMAGE_APT_SOURCES to a sources.list or .sources file"
export USER=${USER:-$(id -un)}

HOROVOD_WHEEL=
if "$PY" -c 'import horovod' 2>/dev/null; then
    bash "$ROOT/scripts/install_horovod.sh" "$PY" >/dev/null  # makes sure its wheel is in the cache
    HOROVOD_WHEEL=$(ls -t "${INSTALL_HOROVOD_CACHE-${XDG_CACHE_HOME:-$HOME/.cache}/virgo-exps/wheels}"/horovod-*/horovod-*.whl 2>/dev/null | head -n1 || true)
fi

KEY=$({ sha256sum "$ROOT/scripts/build_image.sh" "$ROOT/pyproject.toml" "$ROOT/requirements.lock" | cut -d' ' -f1
        printf '%s\n' "$SUITE" "$PACKAGES" "$MOUNTS" "$SOURCE_DATE_EPOCH"
        grep -v '^#' "$SOURCES" | sed '/^$/d'
        [[ -n $HOROVOD_WHEEL ]] && sha256sum "$HOROVOD_WHEEL" | cut -d' ' -f1 || echo no-horovod; } \
      | sha256sum | cut -c1-20)
DEST=$CACHE/virgo-$KEY
mkdir -p "$ROOT/.virgo"
if [[ -f $DEST/image.json ]]; then
    log "the image of these inputs is built already: $DEST"
else
    mkdir -p "$CACHE"
    WORK=$(mktemp -d "$CACHE/.build-$KEY-XXXX")
    trap 'rm -rf "$WORK"' EXIT
    START=$(date +%s)
    log "Debian $SUITE base ($PACKAGES) from $SOURCES"
    mode=root; [[ $(id -u) == 0 ]] || mode=unshare
    mmdebstrap --quiet --variant=minbase --mode="$mode" --include="$PACKAGES" "$SUITE" "$WORK/root" "$SOURCES" \
        >"$WORK/mmdebstrap.log" 2>&1 || { tail -n 20 "$WORK/mmdebstrap.log" >&2; fail "mmdebstrap"; }
    log "$(( $(date +%s) - START ))s: gathering the pinned wheels"
    "$PY" -c 'import tomllib, sys; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
        "$ROOT/pyproject.toml" >"$WORK/requirements.txt"
    mkdir -p "$WORK/wheels"
    cp "$WORK/requirements.txt" "$ROOT/requirements.lock" "$WORK/wheels/"
    "$PY" -m pip wheel --quiet -w "$WORK/wheels" -c "$ROOT/requirements.lock" -r "$WORK/requirements.txt" \
        >"$WORK/pip-wheel.log" 2>&1 || { grep -v '^WARNING: Location' "$WORK/pip-wheel.log" | tail -n 20 >&2; fail "pip wheel"; }
    [[ -n $HOROVOD_WHEEL ]] && cp "$HOROVOD_WHEEL" "$WORK/wheels/"
    # The project's metadata without its code: its entry points (the study the machinery finds, the
    # virgo-exps command) come from the image, the code from the checkout bound in at run time.
    mkdir -p "$WORK/stub/src" && cp "$ROOT/pyproject.toml" "$WORK/stub/"
    echo "virgo-exps: the metadata and entry points; the code is the checkout's" >"$WORK/stub/README.md"
    "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$WORK/wheels" "$WORK/stub/" \
        >>"$WORK/pip-wheel.log" 2>&1 || fail "the project's metadata wheel"
    log "$(( $(date +%s) - START ))s: installing them into /opt/venv"
    run_in() { ch-run -w --unset-env='PIP_*' --set-env=PATH=/usr/bin:/bin -b "$WORK/wheels:/mnt" "$WORK/root" -- "$@"; }
    run_in /usr/bin/python3 -m venv /opt/venv
    run_in /opt/venv/bin/pip install --quiet --no-index --no-compile --find-links /mnt \
        -r /mnt/requirements.txt -c /mnt/requirements.lock || fail "pip install inside the image"
    run_in /opt/venv/bin/pip install --quiet --no-index --no-deps --no-compile \
        "/mnt/$(cd "$WORK/wheels" && ls virgo_exps-*.whl)" \
        || fail "installing the project's metadata inside the image"
    if [[ -n $HOROVOD_WHEEL ]]; then
        run_in /opt/venv/bin/pip install --quiet --no-index --no-deps --no-compile "/mnt/$(basename "$HOROVOD_WHEEL")" \
            || fail "installing Horovod inside the image"
    fi
    # Byte code whose validity rests on the source's hash, not its mtime: the same bytes on every build.
    # A few files of the packages are written for a newer Python (torch's tests): they stay source only.
    run_in /opt/venv/bin/python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib \
        >"$WORK/compileall.log" 2>&1 || log "$(grep -c '^\*\*\* Error' "$WORK/compileall.log") file(s) kept as source only"
    # What differs between two builds and serves nothing at run time.
    rm -rf "$WORK/root"/var/log/* "$WORK/root"/var/cache/ldconfig/aux-cache "$WORK/root"/var/lib/apt/lists/* \
        "$WORK/root"/var/cache/apt/*.bin "$WORK/root"/etc/.pwd.lock \
        "$WORK/root"/opt/venv/lib/python3*/site-packages/*.dist-info/direct_url.json
    for m in $MOUNTS; do mkdir -p "$WORK/root/${m#/}"; done
    # The files a runtime binds the host's own onto (charliecloud binds only onto files the image has): empty,
    # so that the image holds nothing of the machine that built it (mmdebstrap copies its hostname and DNS).
    for f in etc/hosts etc/resolv.conf etc/hostname etc/machine-id; do
        rm -f "$WORK/root/$f" && : >"$WORK/root/$f" && chmod 644 "$WORK/root/$f"
    done
    log "$(( $(date +%s) - START ))s: manifest"
    PYTHONPATH="$ROOT/src" "$PY" -m virgo_exps.container manifest "$WORK/root" \
        "suite=$SUITE" "packages=$PACKAGES" "key=$KEY" "horovod=$( [[ -n $HOROVOD_WHEEL ]] && basename "$HOROVOD_WHEEL" || echo none)" \
        "requirements.lock=$(sha256sum "$ROOT/requirements.lock" | cut -c1-64)" >"$WORK/manifest.out"
    log "$(( $(date +%s) - START ))s: SquashFS"
    mksquashfs "$WORK/root" "$WORK/virgo.sqfs" -quiet -no-progress -noappend -all-root -no-xattrs >/dev/null || fail "mksquashfs"
    rm -rf "$WORK/wheels" "$WORK/stub"
    "$PY" - "$WORK" "$KEY" "$(( $(date +%s) - START ))" <<'EOF'
import json, os, sys
work, key, secs = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = json.loads(open(os.path.join(work, "manifest.out")).read())
size = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(os.path.join(work, "root")) for f in fs)
info = {"digest": out["digest"], "files": out["files"], "key": key, "build_seconds": secs,
        "tree_bytes": size, "squashfs_bytes": os.path.getsize(os.path.join(work, "virgo.sqfs"))}
json.dump(info, open(os.path.join(work, "image.json"), "w"), indent=1)
EOF
    chmod 755 "$WORK"
    rm -f "$WORK/manifest.out"
    mv -T "$WORK" "$DEST" 2>/dev/null || [[ -f $DEST/image.json ]] || fail "cannot move the image to $DEST"
    trap - EXIT
    rm -rf "$WORK"
fi
# Charliecloud binds only onto folders the image has: the top folders of this checkout, its main checkout,
# home and TMPDIR that the image lacks (a checkout under /check, say) are added in a second image whose
# files are hard links to the first's (a few seconds; the digest names the added folders).
EXTRA=()
COMMON=$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
for p in "$ROOT" "${COMMON:+$(dirname "$COMMON")}" "$HOME" "${TMPDIR:-}"; do
    [[ -n $p ]] || continue
    p=$(realpath -m "$p")
    top=/$(cut -d/ -f2 <<<"$p")
    [[ $top != / && ! -e $DEST/root$top && ! -L $DEST/root$top ]] || continue
    [[ " ${EXTRA[*]} " == *" $top "* ]] || EXTRA+=("$top")
done
LINK=$DEST
if ((${#EXTRA[@]})); then
    LINK=$DEST-$(printf '%s\n' "${EXTRA[@]}" | sort | sha256sum | cut -c1-8)
    if [[ ! -f $LINK/image.json ]]; then
        log "adding the top folder(s) ${EXTRA[*]} (of the checkout, home or TMPDIR) for charliecloud to bind onto"
        PYTHONPATH="$ROOT/src" "$PY" -m virgo_exps.container derive "$DEST" "$LINK" "${EXTRA[@]}" >/dev/null \
            || fail "adding the top folders ${EXTRA[*]}"
    fi
fi
ln -sfn "$LINK" "$ROOT/.virgo/image.tmp" && mv -T "$ROOT/.virgo/image.tmp" "$ROOT/.virgo/image"
"$PY" - "$LINK" "$DEST" <<'EOF'
import json, sys
d, base = sys.argv[1], sys.argv[2]
i = json.load(open(d + "/image.json"))
b = json.load(open(base + "/image.json"))
print(f"[image] {i['digest']} ({i['files']} files, {i['tree_bytes'] / 1e9:.2f} GB; built in {i['build_seconds']} s)")
print(f"[image] folder:   .virgo/image/root  ({d}/root)")
if i.get("added_top_folders"):
    print(f"[image]           with the top folder(s) {' '.join(i['added_top_folders'])} added to {b['digest']}")
print(f"[image] SquashFS: {base}/virgo.sqfs  ({b['squashfs_bytes'] / 1e9:.2f} GB, {b['digest']}; for a cluster: "
      "apptainer build virgo.sif virgo.sqfs, or run it as it is)")
EOF
