#!/usr/bin/env bash
# Regenerate docs/scalability-example/: the node scaling sweep of the README,
# run on the simulated 2-node cluster (root: Slurm's daemons in network
# namespaces), in a throw-away clone of this checkout, then reported with
# `virgo-exps scalability`. Every run is on the same machine profile
# (simcluster), so every group has its own 1-process baseline.
#
#   bash scripts/example_report.sh [SEEDS] [EPOCHS]     (default: 0,1 and 6)
#
# Takes about 15 minutes on a 2-core machine; nothing else should run then,
# or the epochs it times are marked as shared and left out.
set -euo pipefail

seeds=${1:-0,1}
epochs=${2:-6}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/.venv/bin
out=$root/docs/scalability-example
strategies=ddp,deepspeed
if "$bin/python" -c "import horovod.torch" 2>/dev/null; then strategies=$strategies,horovod; fi

work=$(mktemp -d)
cluster=$work/cluster
cleanup() {
    "$bin/python" -m slurmsim down --dir "$cluster" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

git clone -q "$root" "$work/repo"
cd "$work/repo"
ln -s "$root/.venv" .venv
export PATH=$bin:$PATH VIRGO_MACHINE=simcluster
"$bin/python" -m slurmsim up --dir "$cluster" --nodes 2 --min-job-age 30 >/dev/null
ln -s "$cluster" .slurmsim

echo "example: data and baseline on the cluster" >&2
dvc exp run -S "train.epochs=$epochs" >/dev/null
git add -A >/dev/null && git commit -q -m "example baseline"

echo "example: queueing single x seeds $seeds, and $strategies x nodes 1,2 x seeds $seeds" >&2
dvc exp run --queue -S train.strategy=single -S train.nodes=1 -S "train.seed=$seeds" >/dev/null
dvc exp run --queue -S "train.strategy=$strategies" -S train.nodes=1,2 -S "train.seed=$seeds" >/dev/null
dvc queue start -j 1 >/dev/null
while true; do  # `dvc queue status` may fail while a worker writes its state: ask again
    st=$(dvc queue status 2>/dev/null) || { sleep 5; continue; }
    grep -qE "Queued|Running" <<<"$st" || break
    sleep 10
done
dvc queue status >&2

mkdir -p "$out.new"
"$bin/virgo-exps" scalability --out "$out.new" --stamp "simulated 2-node cluster (network namespaces, 1 core a node)" \
    | tee "$out.new/console.txt"
rm -rf "$out" && mv "$out.new" "$out"
echo "example: written to docs/scalability-example/" >&2
