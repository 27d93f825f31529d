"""The same bytes on every x86-64 processor: MKL's compatible branch for the data stages.

torch's CPU build carries Intel MKL, which picks the kernels of its FFTs and BLAS calls from the processor's
instruction set and vendor at its first call. Two processors may then round differently, and a data stage
writes other bytes on another node (seen: an Xeon with AVX-512 FP16 and AMX wrote a store whose DVC hash
differed from the one of the machine that committed ``dvc.lock``, and its own AVX2 and AVX-512 branches
disagreed). MKL's *compatible* branch runs the same code on every x86-64 processor: with it the preprocess
stage writes the same bytes as an AVX-512, an AVX2 and an SSE4.2 machine (``tests/test_determinism.py``
runs all three on one machine), and it took as long as MKL's own choice (6.7 s for the committed params on
2 cores, both ways).

The branch must be chosen before MKL's first call in the process: :func:`pin_mkl_branch` does it and
checks that it holds, and refuses when it is too late rather than letting the stage write other bytes.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

MKL_CBWR_BRANCH = 1  # mkl_cbwr_get's question: the branch in force
MKL_CBWR_COMPATIBLE = 3
MKL_CBWR_SUCCESS = 0


def _mkl_service():
    """MKL's branch functions as torch's CPU library exports them, or None (a build without MKL, or one
    that hides them)."""
    import torch  # heavy: only the data stages' processes that run torch's FFTs need it

    if not torch.backends.mkl.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            lib = ctypes.CDLL(str(lib_dir / name))
            break
    else:
        return None
    get, put = getattr(lib, "mkl_serv_cbwr_get", None), getattr(lib, "mkl_serv_cbwr_set", None)
    if get is None or put is None:
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    put.argtypes, put.restype = [ctypes.c_int], ctypes.c_int
    return get, put


def pin_mkl_branch() -> str:
    """Put MKL in this process (and, through ``MKL_CBWR``, in the processes it starts) on its compatible
    branch. Returns what holds: ``"compatible"``, ``"no MKL"`` for a torch without it (its own FFTs
    choose no kernels by processor), or ``"MKL_CBWR=COMPATIBLE, unchecked"`` for an MKL that hides its
    branch functions. Raises RuntimeError when MKL already ran with another branch."""
    os.environ["MKL_CBWR"] = "COMPATIBLE"
    service = _mkl_service()
    if service is None:
        import torch  # loaded by _mkl_service already

        if torch.backends.mkl.is_available():  # MKL without its branch functions: only the variable acts
            return "MKL_CBWR=COMPATIBLE, unchecked"
        return "no MKL"
    get, put = service
    if get(MKL_CBWR_BRANCH) == MKL_CBWR_COMPATIBLE:
        return "compatible"
    code = put(MKL_CBWR_COMPATIBLE)
    if code != MKL_CBWR_SUCCESS or get(MKL_CBWR_BRANCH) != MKL_CBWR_COMPATIBLE:
        raise RuntimeError(
            f"MKL ran before its compatible branch could be set (mkl_cbwr_set gave {code}): this process "
            "would write other bytes on another processor; call virgo_exps.numerics.pin_mkl_branch() "
            "before any torch computation, or start it with MKL_CBWR=COMPATIBLE"
        )
    return "compatible"
