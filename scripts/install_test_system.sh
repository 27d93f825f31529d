#!/usr/bin/env bash
# Install the Debian packages the browser test of the plots page needs:
# Chromium and its driver (tests/test_plots_browser.py opens the page of
# `dvc plots show` headless), and node/npm for the offline plots template
# (scripts/plots_offline.py); and those of the container image and its tests
# (mmdebstrap, charliecloud, squashfs-tools, squashfuse). Debian/Ubuntu, as root.
#   scripts/install_test_system.sh            # no-op when everything is there
#   scripts/install_test_system.sh --strict   # exit non-zero when it cannot install
# Without --strict a failure only warns (exit 0), so `make test` goes on and
# the browser test skips with its reason. With --strict: 1 apt-get failed,
# 2 not root or no apt-get.
set -uo pipefail
strict=0
[ "${1:-}" = "--strict" ] && strict=1
fail() {  # fail CODE MESSAGE...
    local code=$1; shift
    echo "install_test_system: $*" >&2
    if [ "$strict" = 1 ]; then exit "$code"; fi
    echo "install_test_system: the browser test of the plots page and the container tests will be skipped" >&2
    exit 0
}

# command -> Debian package
declare -A package_of=([chromium]=chromium [chromedriver]=chromium-driver [node]=nodejs [npm]=npm
                       [ch-run]=charliecloud [mmdebstrap]=mmdebstrap [mksquashfs]=squashfs-tools
                       [squashfuse]=squashfuse)
missing=()
for c in chromium chromedriver node npm ch-run mmdebstrap mksquashfs squashfuse; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

packages=()
for c in "${missing[@]}"; do packages+=("${package_of[$c]}"); done
echo "install_test_system: missing ${missing[*]}" >&2
if [ "$(id -u)" != 0 ]; then
    fail 2 "not root: cannot install ${packages[*]} (run 'make test' as root, or install them yourself)"
fi
if ! command -v apt-get >/dev/null 2>&1; then
    fail 2 "no apt-get here; install ${packages[*]} with the system's package manager"
fi
echo "install_test_system: apt-get install ${packages[*]} (a minute or two)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/dev/null; then
    fail 1 "'apt-get update' failed (no network or no package mirror?)"
fi
if ! apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; then
    fail 1 "'apt-get install ${packages[*]}' failed"
fi
still=()
for c in "${missing[@]}"; do
    command -v "$c" >/dev/null 2>&1 || still+=("$c")
done
if [ ${#still[@]} -ne 0 ]; then
    fail 1 "still missing after apt-get: ${still[*]}"
fi
echo "install_test_system: installed ${packages[*]}" >&2
