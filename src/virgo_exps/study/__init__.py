"""The Virgo study: what is computed. A port to another study replaces this folder.

Synthetic main and auxiliary channels (``generate``), the Q tiling and
Q-transform (``qtiling``, ``qtransform``), images and splits (``preprocess``),
reading them for training (``dataset``), the networks (``models``) and the
per-experiment report (``report``). Submodules are imported on demand.
"""
