"""Load Debian's OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links the reference BLAS (~1.5 GFLOP/s for float32 GEMM).
Putting OpenBLAS' `libblas.so.3` into the global symbol scope *before* `mlx.core`
is loaded makes MLX resolve `cblas_sgemm` & co. to it: ~60x faster, same results.
Set GEMMA4_MLX_NO_OPENBLAS=1 to turn this off. macOS (Accelerate) is untouched.
Ahead of OpenBLAS goes a small `cblas_sgemm` of ours (`_blas_shim`): products of
1-32 rows, a decode step's or a verify block's, run 1.0-4.8x faster than through
OpenBLAS's GEMM.

OpenBLAS picks its kernels from the CPU's family and model. On a CPU its build does
not know (a VM that hides the model, a chip newer than the build) Debian's 0.3.21
falls back to "Prescott" (SSE3): on a 2-core AVX-512 VM float32 GEMM ran 32 GFLOP/s
instead of 284 (SkylakeX kernels) and GEMV 4.9 GB/s instead of 14.5. So unless OPENBLAS_CORETYPE is
set already, it is set from the CPU's own flags before the library loads (the
same products up to float32 summation order).
"""

import ctypes
import os
import platform
import sys

from gemma4_mlx import _blas_shim
from gemma4_mlx._blas_shim import cpu_flags

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/openblas-pthread/libblas.so.3",
)

loaded_from = None  # path of the library we loaded, for diagnostics
coretype_set = None  # the OPENBLAS_CORETYPE we chose, if we chose one
shim = None  # our cblas_sgemm loaded before it (`_blas_shim`), if any
shim_off = None  # why not, when OpenBLAS was loaded without it

AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
AVX2 = frozenset({"avx2", "fma"})


def coretype_for(flags: set[str]) -> str | None:
    """The OpenBLAS kernels an x86-64 CPU with these /proc/cpuinfo flags can run."""
    if AVX512 <= flags:
        return "SkylakeX"
    if AVX2 <= flags:
        return "Haswell"
    return None  # older CPUs: OpenBLAS' own detection


def _choose_coretype() -> None:
    global coretype_set
    if "OPENBLAS_CORETYPE" in os.environ or platform.machine() not in ("x86_64", "AMD64"):
        return
    coretype_set = coretype_for(cpu_flags())
    if coretype_set:
        os.environ["OPENBLAS_CORETYPE"] = coretype_set


def describe() -> str:
    """The BLAS MLX's float32 products run on, in one line (benchmark headers)."""
    if not loaded_from:
        return "MLX default (reference BLAS)"
    if shim:
        return f"{loaded_from}, 1-32 row products through our shim ({os.path.basename(shim)})"
    return f"{loaded_from}, its sgemm for every product (no shim: {shim_off})"


# The shim's idle workers spin 3 ms before sleeping (docs/text-decoder.md §6.4).  Where
# processes share the cores (ranks launched on one machine), a spinning worker takes a
# core another rank needs: its distributed tests ran 16-20 % slower than at 100 us.
SHARED_CORES_SPIN_NS = 100_000


def short_spin() -> None:
    """The shim's idle workers spin SHARED_CORES_SPIN_NS (a distributed rank's setting)."""
    if shim:
        lib = ctypes.CDLL(shim)
        lib.sgemm_shim_set_spin_ns.argtypes = [ctypes.c_longlong]
        lib.sgemm_shim_set_spin_ns(SHARED_CORES_SPIN_NS)


def preload_openblas() -> str | None:
    global loaded_from, shim, shim_off
    if loaded_from or not sys.platform.startswith("linux"):
        return loaded_from
    if os.environ.get("GEMMA4_MLX_NO_OPENBLAS", "") not in ("", "0"):
        return None
    if "mlx.core" in sys.modules:
        # Too late to interpose: MLX already bound its BLAS symbols.
        return None
    _choose_coretype()
    for path in CANDIDATES:
        if os.path.exists(path):
            ours, why = _blas_shim.load(path)  # global first: its cblas_sgemm wins
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_from, shim, shim_off = path, ours, why
            return path
    return None
