#!/usr/bin/env bash
# Start the pipeline in a detached tmux session, so it survives a closed SSH
# connection on a login node.
#   scripts/tmux_run.sh [SESSION] [extra `dvc exp run` arguments...]
# Reattach with `tmux attach -t SESSION`; the session stays open after the run
# so its output can be read. Killing the session sends SIGHUP to `dvc exp run`,
# and the launcher then cancels any SLURM job it submitted.
# VIRGO_TMUX_SOCKET=NAME uses a private tmux server (tmux -L NAME), as the tests do.
set -euo pipefail
session="${1:-virgo}"
shift || true
cd "$(dirname "$0")/.."
if ! command -v tmux >/dev/null; then
    echo "tmux is not installed (Debian/Ubuntu: apt-get install tmux)" >&2
    exit 1
fi
tmux=(tmux)
if [ -n "${VIRGO_TMUX_SOCKET:-}" ]; then tmux=(tmux -L "$VIRGO_TMUX_SOCKET"); fi
if "${tmux[@]}" has-session -t "$session" 2>/dev/null; then
    echo "tmux session '$session' already exists: attach with 'tmux attach -t $session'," >&2
    echo "or choose another name: make tmux TMUX_SESSION=other" >&2
    exit 1
fi
cmd=".venv/bin/virgo-exps run"
for arg in "$@"; do cmd+=" $(printf '%q' "$arg")"; done
"${tmux[@]}" new-session -d -s "$session" -c "$PWD" \
    "$cmd; rc=\$?; echo; echo \"[virgo-exps: pipeline finished with exit code \$rc; this window stays open, exit to close]\"; exec \${SHELL:-bash}"
echo "started 'dvc exp run' in tmux session '$session'"
echo "  attach:   ${tmux[*]} attach -t $session     (detach again with Ctrl-b d)"
echo "  peek:     ${tmux[*]} capture-pane -p -t $session | tail"
