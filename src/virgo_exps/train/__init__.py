"""The training loop, its snapshots, the distribution strategies, and what a run measures and records."""
