# Sourced by every batch job of this machine, in the workspace, before the
# training step starts (bash; SLURM_* variables are set). Load modules and
# activate the software environment here. Set already: VIRGO_PYTHON (the
# interpreter that ran the launcher), MASTER_ADDR/MASTER_PORT (rendezvous of
# torchrun and Horovod: first node of the job, port from the job id),
# OMP_NUM_THREADS (cpus_per_task unless set before).
#
# Examples:
#   module purge && module load Python/3.11 CUDA/12.4 NCCL
#   export NCCL_SOCKET_IFNAME=ib0        # network interface for NCCL/gloo
#   export GLOO_SOCKET_IFNAME=ib0
#   export HOROVOD_GLOO_IFACE=ib0        # default: the interface towards MASTER_ADDR
#   MASTER_ADDR="${MASTER_ADDR}-ib"      # sites naming the fast network's host names differently
true
