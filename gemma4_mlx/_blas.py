"""Load Debian's OpenBLAS before MLX on Linux.

MLX's Linux CPU wheel links the reference BLAS (~1.5 GFLOP/s for float32 GEMM).
Putting OpenBLAS' `libblas.so.3` into the global symbol scope *before* `mlx.core`
is loaded makes MLX resolve `cblas_sgemm` & co. to it: ~60x faster, same results.
Set GEMMA4_MLX_NO_OPENBLAS=1 to turn this off. macOS (Accelerate) is untouched.
"""

import ctypes
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/openblas-pthread/libblas.so.3",
)

loaded_from = None  # path of the library we loaded, for diagnostics


def preload_openblas() -> str | None:
    global loaded_from
    if loaded_from or not sys.platform.startswith("linux"):
        return loaded_from
    if os.environ.get("GEMMA4_MLX_NO_OPENBLAS", "") not in ("", "0"):
        return None
    if "mlx.core" in sys.modules:
        # Too late to interpose: MLX already bound its BLAS symbols.
        return None
    for path in CANDIDATES:
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            loaded_from = path
            return path
    return None
