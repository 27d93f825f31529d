"""Experiments after the fact: the team store, failures, resuming, verification."""
