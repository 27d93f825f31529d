"""Data stages: synthetic generation, Q-transform preprocessing, zarr helpers.

Submodules are imported on demand (``from virgo_exps.data import generate``)
so that importing this package stays cheap.
"""
