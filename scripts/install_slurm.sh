#!/usr/bin/env bash
# Install what the Slurm tests need to start a real cluster on this machine
# (slurmsim): slurmctld, slurmd, the client commands and munge, plus
# ip/nsenter/unshare for the multi-node cluster. Debian/Ubuntu, as root.
#   scripts/install_slurm.sh            # no-op when everything is there
#   scripts/install_slurm.sh --strict   # exit non-zero when Slurm cannot be installed
# Without --strict a failure only warns (exit 0), so `make test` goes on and
# the Slurm tests skip with their reason. With --strict: 1 apt-get failed,
# 2 not root or no apt-get.
# The installer is slurmsim's own (`python -m slurmsim install`, the one the
# test fixtures call); slurmsim needs only the standard library, so any
# Python >= 3.10 runs it: the repository's venv when there is one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[[ -x $python ]] || python=python3
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" exec "$python" -m slurmsim install "$@"
