"""Sweeps: many trials of the train stage as one SLURM job array, each a DVC experiment (grid or Optuna search)."""
