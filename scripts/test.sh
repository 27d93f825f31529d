#!/usr/bin/env bash
# The whole test suite in two parts (called by `make test`; arguments go to pytest):
#   1. every test not marked `serial`, on $JOBS workers (pytest-xdist): most of them wait on dvc, Slurm,
#      servers and subprocesses rather than the CPU; each module stays on one worker, the longest modules
#      first (tests/conftest.py), so that neither worker ends with a long module alone;
#   2. the `serial` tests (they measure time or host load) alone, on a machine the first part has left.
# JOBS=0 runs the first part in one process too. A caller's `-m EXPR` narrows both parts. Exit status:
# pytest's, 5 only when neither part selected a test; an interrupted first part (or one that failed
# under -x/--maxfail) ends the run there.
set -u
jobs=${JOBS:-2}
py=${PYTHON:-python}
marks=""
stop_early=0
args=()
while (($#)); do
    case $1 in
        -m) marks=${2:-}; shift 2 || shift ;;
        -m*) marks=${1#-m}; shift ;;
        -x | --exitfirst | --maxfail | --maxfail=*) stop_early=1; args+=("$1"); shift ;;
        *) args+=("$1"); shift ;;
    esac
done
first="not serial" second="serial"
if [ -n "$marks" ]; then
    first="not serial and ($marks)" second="serial and ($marks)"
fi

status1=0
"$py" -m pytest -n "$jobs" --dist loadscope --no-loadscope-reorder -m "$first" --durations=30 ${args[@]+"${args[@]}"} \
    || status1=$?
case $status1 in
    0 | 5) ;;
    1) [ "$stop_early" = 1 ] && exit 1 ;;
    *) exit "$status1" ;;  # interrupted, internal or usage error
esac
echo "== the serial tests (they measure time or host load), alone"
status2=0
"$py" -m pytest -m "$second" --durations=10 ${args[@]+"${args[@]}"} || status2=$?
if [ "$status1" = 5 ] && [ "$status2" = 5 ]; then
    exit 5
fi
for status in "$status1" "$status2"; do
    case $status in 0 | 5) ;; *) exit "$status" ;; esac
done
exit 0
