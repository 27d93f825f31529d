"""The ``virgo-exps`` command (``main``) and the wrappers every stage entry point runs in."""
