"""Starting work: local processes or a SLURM job, and what a worker and its launcher agree on."""
