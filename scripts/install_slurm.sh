#!/usr/bin/env bash
# Install what the Slurm tests need to start a real cluster on this machine
# (slurmsim): slurmctld, slurmd, the client commands and munge,
# plus ip/nsenter/unshare for the multi-node cluster. Debian/Ubuntu, as root.
#   scripts/install_slurm.sh            # no-op when everything is there
#   scripts/install_slurm.sh --strict   # exit non-zero when Slurm cannot be installed
# Without --strict a failure only warns (exit 0), so `make test` goes on and
# the Slurm tests skip with their reason. With --strict: 1 apt-get failed,
# 2 not root or no apt-get.
set -uo pipefail
strict=0
[ "${1:-}" = "--strict" ] && strict=1
fail() {  # fail CODE MESSAGE...
    local code=$1; shift
    echo "install_slurm: $*" >&2
    if [ "$strict" = 1 ]; then exit "$code"; fi
    echo "install_slurm: the Slurm tests will be skipped" >&2
    exit 0
}

commands=(slurmctld slurmd sbatch srun squeue sinfo scontrol scancel munged munge unmunge ip nsenter unshare)
missing=()
for c in "${commands[@]}"; do
    command -v "$c" >/dev/null 2>&1 || missing+=("$c")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "install_slurm: missing ${missing[*]}" >&2
if [ "$(id -u)" != 0 ]; then
    fail 2 "not root: cannot install slurmctld slurmd slurm-client munge (run 'make test' as root, or install them yourself)"
fi
if ! command -v apt-get >/dev/null 2>&1; then
    fail 2 "no apt-get here; install Slurm (slurmctld, slurmd, client) and munge with the system's package manager"
fi
packages=(slurmctld slurmd slurm-client munge iproute2 util-linux)
echo "install_slurm: apt-get install ${packages[*]} (a minute or two)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq >/dev/null; then
    fail 1 "'apt-get update' failed (no network or no package mirror?)"
fi
if ! apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; then
    fail 1 "'apt-get install ${packages[*]}' failed"
fi
still=()
for c in "${commands[@]}"; do
    command -v "$c" >/dev/null 2>&1 || still+=("$c")
done
if [ ${#still[@]} -ne 0 ]; then
    fail 1 "still missing after apt-get: ${still[*]}"
fi
echo "install_slurm: Slurm $(sbatch --version 2>/dev/null | awk '{print $2}') and munge installed" >&2
