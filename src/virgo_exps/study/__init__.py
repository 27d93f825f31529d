"""The Virgo study: what is computed. A port to another study replaces this folder.

Synthetic main and auxiliary channels (``channels``, ``samples``, written by
``generate``), the Q tiling and Q-transform (``qtiling``, ``qplan``, ``qspline``,
``qwhiten``, ``qbackend``, ``qtransform``), images and splits (``patches``,
``normalise``, ``imagestore``, ``preprocess``), the networks (``models``) and
the per-experiment report (``report``). Submodules are imported on demand.
"""
