"""virgo-exps: reproducible distributed-training experiments for HPC clusters."""

__version__ = "0.1.0"
