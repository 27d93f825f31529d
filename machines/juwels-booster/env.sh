# Sourced by every JUWELS Booster job before the training step (see ../slurm/env.sh).
# Module names follow the JSC software stages; check `module spider PyTorch`
# and adapt the stage and versions when a new stage is installed.
module --force purge
module load Stages/2025
module load GCC OpenMPI Python CUDA NCCL

# srun does not inherit --cpus-per-task from sbatch on recent Slurm versions;
# the launcher passes it explicitly, this covers any other srun in the job.
export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"

# Rendezvous over InfiniBand: JSC's node names with an "i" suffix resolve to
# the IPoIB address (jwb0001 -> jwb0001i).
MASTER_ADDR="${MASTER_ADDR}i"
export MASTER_ADDR

# The venv of the repository (created on a login node with `make venv` after
# loading the same modules); the launcher already runs its interpreter.
if [ -f "$VIRGO_HOME/.venv/bin/activate" ]; then
    source "$VIRGO_HOME/.venv/bin/activate"
fi
