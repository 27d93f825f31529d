#!/usr/bin/env bash
# The whole test suite in two parts (called by `make test`; arguments go to pytest):
#   1. every test not marked `serial`, on $JOBS workers (pytest-xdist): most of them wait on dvc, Slurm,
#      servers and subprocesses rather than the CPU; each module stays on one worker, the longest modules
#      first (tests/conftest.py), so that neither worker ends with a long module alone;
#   2. the `serial` tests (they measure time or host load) alone, on a machine the first part has left.
# JOBS=0 runs the first part in one process too. Exit status: 1 if either part failed.
set -u
jobs=${JOBS:-2}
status=0
python -m pytest -n "$jobs" --dist loadscope --no-loadscope-reorder -m "not serial" --durations=30 "$@" || status=$?
[ "$status" = 5 ] && status=0  # nothing selected (a -k of the caller matched only serial tests)
echo "== the serial tests (they measure time or host load), alone"
second=0
python -m pytest -m serial --durations=10 "$@" || second=$?
[ "$second" = 5 ] && second=0
[ "$status" = 0 ] && [ "$second" = 0 ] || exit 1
