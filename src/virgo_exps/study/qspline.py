"""The Q-transform's regridding operators: interpolating cubic splines as matrices.

The winning plane's rows are resampled onto the common output grid with the
same interpolating cubic splines gwpy uses (one per row in time, then one
across rows in frequency). Those splines are linear maps, so they are
precomputed as matrices (:func:`_spline_matrix`): a sparse one per tile count
for time and a block-banded dense one per plane for frequency (the spline
weights decay geometrically away from each output point), whose column blocks
and the inputs each block needs are chosen by :func:`_band_blocks`.
:mod:`virgo_exps.study.qplan` builds them into its plan.
"""

from __future__ import annotations

import numpy as np
from scipy.interpolate import BSpline, make_interp_spline
from scipy.linalg import solve_banded


def _spline_matrix(knots: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Dense linear map: samples at ``knots`` -> interpolating cubic spline
    (not-a-knot, i.e. FITPACK's ``s=0`` spline) evaluated at ``points``,
    extrapolating with the end polynomials outside the knots.

    With ``A`` the B-spline collocation matrix at the knots and ``E`` the
    B-spline basis at ``points``, the map is ``E @ inv(A)``; it is obtained
    as ``solve(A.T, E.T).T`` with one banded solve, in O(n * len(points)).
    """
    n = knots.size
    if n < 8:  # tiny rows/planes: lower degree if needed, brute force
        if n == 1:
            return np.ones((points.size, 1))
        spline = make_interp_spline(knots, np.eye(n), k=min(3, n - 1))
        return spline(points, extrapolate=True)
    k = 3
    t = np.concatenate([np.repeat(knots[0], k + 1), knots[2:-2], np.repeat(knots[-1], k + 1)])
    colloc = BSpline.design_matrix(knots, t, k)
    basis = BSpline.design_matrix(points, t, k, extrapolate=True)
    # banded LAPACK solve of colloc.T @ M.T = basis.T
    coo = colloc.T.tocoo()
    offs = coo.col - coo.row
    upper, lower = int(max(offs.max(), 0)), int(max(-offs.min(), 0))
    banded = np.zeros((upper + lower + 1, n))
    banded[upper + coo.row - coo.col, coo.col] = coo.data
    return solve_banded((lower, upper), banded, basis.T.toarray()).T


def _band_blocks(
    mat: np.ndarray,
    per_block_cost: int = 700,
) -> list[tuple[int, int, int, int]]:
    """Split the columns of a banded ``(nout, nin)`` map into a few blocks,
    each with the range of inputs it needs: ``(c0, c1, r0, r1)``.

    Picks the block count that minimises multiply-adds plus a fixed
    per-GEMM overhead (expressed in multiply-adds per output time).
    """
    nout, nin = mat.shape
    best: tuple[float, list[tuple[int, int, int, int]]] | None = None
    for nblocks in (1, 2, 3, 4, 6, 8):
        if nblocks > nout:
            break
        edges = np.linspace(0, nout, nblocks + 1).round().astype(int)
        blocks = []
        work = 0
        for c0, c1 in zip(edges[:-1], edges[1:]):
            used = np.nonzero(np.any(mat[c0:c1] != 0, axis=0))[0]
            r0, r1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
            blocks.append((int(c0), int(c1), r0, r1))
            work += (c1 - c0) * (r1 - r0)
        cost = work + per_block_cost * nblocks
        if best is None or cost < best[0]:
            best = (cost, blocks)
    assert best is not None
    return best[1]
