#!/usr/bin/env bash
# Start the pipeline in a detached tmux session, so it survives a closed SSH
# connection on a login node.
#   scripts/tmux_run.sh [SESSION] [extra `dvc exp run` arguments...]
# Reattach with `tmux attach -t SESSION`. The run gets this shell's
# environment (VIRGO_MACHINE, MLFLOW_*, SLURM_CONF, ...), also when a tmux
# server is already running with another environment: it is handed over in a
# file only the user can read, removed as soon as the session has read it.
# The window stays open after the run, also after Ctrl-C, so its output can be
# read; `exit` closes it. Killing the session sends SIGHUP to `dvc exp run`:
# the stage then stops its processes and the launcher cancels any SLURM job it
# submitted.
# VIRGO_TMUX_SOCKET=NAME uses a private tmux server (tmux -L NAME), as the tests do.
set -euo pipefail

if [ "${1:-}" = "--in-session" ]; then
    # Inside the tmux window: take the caller's environment, run, keep the window.
    envfile="$2"
    shift 2
    set +eu
    # shellcheck disable=SC1090
    . "$envfile"
    rm -f "$envfile"
    # A handler (not "ignore", which the run would inherit): Ctrl-C stops the run,
    # and this shell goes on to say so instead of closing the window.
    trap 'echo "[virgo-exps: interrupted]"' INT
    .venv/bin/virgo-exps run "$@"
    rc=$?
    trap - INT
    echo
    echo "[virgo-exps: pipeline finished with exit code $rc; this window stays open, type exit to close it]"
    exec "${SHELL:-/bin/bash}"
fi

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

# A running tmux server starts new windows with its own environment, not the
# caller's: write the caller's exported variables to a private file (mode 600,
# never on a command line where `ps` would show a password).
envfile=$(umask 077 && mktemp "${TMPDIR:-/tmp}/virgo-tmux-env.XXXXXX")
while IFS= read -r name; do
    case "$name" in
        TMUX | TMUX_PANE | PWD | OLDPWD | SHLVL | _ | BASH_* | SHELLOPTS | BASHOPTS) continue ;;
        MAKEFLAGS | MFLAGS | MAKELEVEL | MAKEOVERRIDES) continue ;;  # from `make tmux`, not the user's
    esac
    printf 'export %s=%q\n' "$name" "${!name}" >> "$envfile"
done < <(compgen -e)

cmd="exec bash $(printf '%q' "$PWD/scripts/tmux_run.sh") --in-session $(printf '%q' "$envfile")"
for arg in "$@"; do cmd+=" $(printf '%q' "$arg")"; done
if ! "${tmux[@]}" new-session -d -s "$session" -c "$PWD" "$cmd"; then
    rm -f "$envfile"
    exit 1
fi
# Even if the window's shell ends, keep the pane and its output until the session is killed.
"${tmux[@]}" set-option -w -t "$session" remain-on-exit on >/dev/null
echo "started 'dvc exp run' in tmux session '$session' (machine ${VIRGO_MACHINE:-from machines/active, else local})"
echo "  attach:   ${tmux[*]} attach -t $session     (detach again with Ctrl-b d)"
echo "  peek:     ${tmux[*]} capture-pane -p -t $session | tail"
