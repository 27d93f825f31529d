"""Every ``VIRGO_*`` environment variable the project reads, with what it does (``virgo-exps env``).

None of them changes a result: what does is a param (recorded in every output's provenance stamp) or a
key of the machine profile. They say where to run and where to keep things, how much to print, how
long to wait for a failure, and they carry values from the launcher to the processes it starts. The
``VIRGO_FAULT_*`` hooks are for the tests: they make a run fail, stop or stall on purpose, and a run
they touch records no result (it fails, or is interrupted and resumes bit-identically).

``tests/test_envvars.py`` holds this list equal to the names the code, the scripts and the machine
profiles use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    set_by: str  # "you", "the launcher" (set for the processes it starts), "the tests"
    meaning: str


VARIABLES = (
    EnvVar(
        "VIRGO_MACHINE", "you", "the machine profile to run on (machines/<name>/); else machines/active, else local"
    ),
    EnvVar(
        "VIRGO_HOME",
        "the launcher",
        "the main checkout, for a stage that runs in a queued experiment's or a sweep task's folder: its logs "
        "and unfinished snapshots stay in the main checkout",
    ),
    EnvVar("VIRGO_DRY_RUN", "you", "1: print the command or batch script a stage would start, start nothing"),
    EnvVar("VIRGO_FOLLOW_LOG", "you", "0: do not copy a Slurm job's log to the terminal while waiting for it"),
    EnvVar("VIRGO_CONSOLE", "you", "all: show every line of a job's log, also those that only repeat one shown"),
    EnvVar(
        "VIRGO_NODE_DATA",
        "you",
        "the folder for the node's copy of each data split (default: /dev/shm, else TMPDIR); a folder of "
        "yours is made in it, mode 0700",
    ),
    EnvVar("VIRGO_MLFLOW_EXPERIMENT", "you", "the MLflow experiment the runs are logged to (default: virgo-exps)"),
    EnvVar(
        "VIRGO_DIST_TIMEOUT_S",
        "you",
        "seconds a rank waits in a collective before failing (default 300): how soon a dead rank ends the run",
    ),
    EnvVar(
        "VIRGO_HVD_RENDEZVOUS_WAIT_S",
        "you",
        "seconds Horovod's tasks on Slurm wait for their rendezvous server (default 120)",
    ),
    EnvVar(
        "VIRGO_IN_ALLOCATION",
        "the launcher",
        "1: a stage already runs inside a Slurm allocation (a sweep task): its job step runs there, no sbatch",
    ),
    EnvVar("VIRGO_SWEEP_TRIAL", "the launcher", "the Optuna trial a sweep task's training reports to (JSON)"),
    EnvVar(
        "VIRGO_PYTHON",
        "the launcher",
        "in a batch script: the Python of the checkout's environment (of the image, with a container)",
    ),
    EnvVar(
        "VIRGO_IMAGE_RUN",
        "the launcher",
        "in a batch script of a profile with a container: the runtime's words that start each srun step in the image",
    ),
    EnvVar(
        "VIRGO_IMAGE_CACHE",
        "you",
        "make image: where images are kept, one folder per set of inputs (default ~/.cache/virgo-exps/images)",
    ),
    EnvVar("VIRGO_HOSTFILE", "the launcher", "in a batch script: the nodes of the job, for DeepSpeed's runner"),
    EnvVar("VIRGO_STATUS_FILE", "the launcher", "in a batch script: the training's status file (requeue or not)"),
    EnvVar("VIRGO_MAX_REQUEUES", "the launcher", "in a batch script: train.max_requeues"),
    EnvVar("VIRGO_EXIT_INTERRUPTED", "the launcher", "in a batch script: the exit code of an interrupted training"),
    EnvVar("VIRGO_TMUX_SOCKET", "the tests", "`make tmux` on a private tmux server (tmux -L NAME)"),
    EnvVar("VIRGO_SLURMSIM_TAG", "the tests", "a name that tells the test clusters of one machine apart"),
    EnvVar("VIRGO_SLURMSIM_VERBOSE", "the tests", "1: the simulated cluster prints what it does"),
    EnvVar("VIRGO_FAULT_CRASH", "the tests", "r:k: rank r raises at global step k (a crashed rank)"),
    EnvVar("VIRGO_FAULT_HANG", "the tests", "r:k: rank r stops making progress at global step k (a stalled rank)"),
    EnvVar(
        "VIRGO_FAULT_STOP_AT_STEP",
        "the tests",
        "k: rank 0 behaves as if signalled after global step k (an interrupted run)",
    ),
    EnvVar("VIRGO_FAULT_STEP_SLEEP", "the tests", "s: sleep s seconds before every step (time to interrupt a run)"),
)


def listing() -> str:
    """The table ``virgo-exps env`` prints."""
    width = max(len(v.name) for v in VARIABLES)
    lines = [f"{'variable':<{width}}  {'set by':<12}  meaning"]
    lines += [f"{v.name:<{width}}  {v.set_by:<12}  {v.meaning}" for v in VARIABLES]
    return "\n".join(lines)
