"""Submitting a stage to SLURM: one generated batch script, ``sbatch -W``, and a watcher.

The package by role: :mod:`.script` (the batch script, quoting, options),
:mod:`.query` (``scontrol``/``squeue`` parsing), :mod:`.watch` (log follower,
watcher, cancel), :mod:`.submit` (submit, dry run, ``python -m
virgo_exps.launch.slurm STAGE``). The names below are re-exported for callers.

:func:`submit` is what :func:`virgo_exps.launch.launcher.run` calls on ``kind: slurm``
machines. It

1. builds the batch script from the machine profile and the training
   resources (:func:`batch_script`): job name ``virgo-<stage>-<experiment>``,
   log ``logs/<stage>/<experiment>-<jobid>.out`` in the *main* checkout, a
   ``cd`` into the workspace where DVC runs the stage, one ``srun`` step that
   starts the training processes (torchrun per node for DDP/DeepSpeed, one
   task per process through :mod:`virgo_exps.launch.hvd_slurm` for Horovod);
2. attaches to a job of the same stage (name ``virgo-<stage>-*``), user and
   working directory that is still pending or running, submitted with the same
   script and params (fingerprint in ``--comment``), instead of submitting a
   second one: a re-run after the login node died waits for it. DVC names each
   run afresh, so the experiment name is not compared; a job with other
   params makes the stage fail with a clear message;
3. otherwise runs ``sbatch -W --parsable`` as a child process *and* polls
   ``scontrol show job`` every :data:`POLL_S` seconds. ``sbatch -W`` alone can
   return up to 32 s after the job ended and returns 0 for NODE_FAIL; the poll
   learns the final state within a poll interval and any final state other
   than COMPLETED gives a non-zero exit. A requeued job (PENDING again) is not
   final. When Slurm no longer knows the job, ``sbatch -W``'s code decides;
4. streams the job log to stderr, so DVC (and a tmux pane) shows progress, and
   on failure prints job id, final state, exit code and the log's last lines;
5. on SIGINT, SIGTERM or SIGHUP cancels the job with ``scancel`` and waits
   until ``squeue`` no longer lists it before exiting non-zero.

Time limits and preemption: the job asks for ``--signal=B:USR1@<signal_seconds>``
and ``--requeue``. The batch script forwards SIGUSR1 to ``srun``, which passes it
to every process of the step (torchrun dies of it, its workers handle it; a
SIGTERM to ``srun`` would instead kill the step at once). The trainer writes its
snapshot and exits 85; the batch script then requeues the job with ``scontrol
requeue`` until ``train.max_requeues`` is used up, and the requeued run resumes
from the snapshot. SIGTERM (``scancel``, the time limit itself) never requeues.

Job arrays: a data stage (the Virgo study: generate) on a profile with ``data_tasks: N`` is one
array of N single-task jobs (``--array=0-<N-1>``, logs
``logs/generate/<experiment>-<jobid>_<task>.out``); the stage fails unless every
task completed. The same watcher follows the whole array.

``VIRGO_DRY_RUN=1`` prints the batch script and the ``sbatch`` command and
submits nothing.
"""

from virgo_exps.launch.job import dry_run_requested
from virgo_exps.launch.slurm.query import FINAL_STATES, JobInfo, parse_show_job
from virgo_exps.launch.slurm.script import JobContext, batch_script, fingerprint, srun_command
from virgo_exps.launch.slurm.submit import dry_run_stage, main, submit, use_slurm_conf

__all__ = [
    "FINAL_STATES",
    "JobContext",
    "JobInfo",
    "batch_script",
    "dry_run_requested",
    "dry_run_stage",
    "fingerprint",
    "main",
    "parse_show_job",
    "srun_command",
    "submit",
    "use_slurm_conf",
]
