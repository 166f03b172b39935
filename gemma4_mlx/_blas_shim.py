"""One-row float32 products through OpenBLAS's GEMV (Linux CPU; docs/text-decoder.md §6.4).

MLX's CPU backend multiplies float32 matrices with `cblas_sgemm` only, the one-row
products of a decode step included.  OpenBLAS streams a weight through sgemm with
one row at 10-16 GB/s and through `cblas_sgemv` at 28-31 GB/s (2-core Zen 4,
OpenBLAS 0.3.21 and 0.3.31 alike).  `_gemv_shim.c` defines a `cblas_sgemm` that sends
products with one row or one column to sgemv and all others to OpenBLAS's sgemm;
`_blas` puts it ahead of OpenBLAS in the global symbol scope, as it puts OpenBLAS
ahead of MLX's reference BLAS.

The shim is compiled once with the system C compiler ($CC, else cc) into the user's
cache, named by a hash of its source; it is written under a temporary name and
renamed, so processes starting together do not collide.  Without a compiler or a
writable cache, or with GEMMA4_MLX_NO_GEMV_SHIM=1, products go to OpenBLAS's sgemm
as before, and `load` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("_gemv_shim.c")
OFF_SWITCH = "GEMMA4_MLX_NO_GEMV_SHIM"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gemma4-mlx"


def build(cc: str | None = None, folder: Path | None = None) -> tuple[Path | None, str | None]:
    """The compiled shim, compiled now if this source has not been: (path, None), or
    (None, why not)."""
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        return None, f"its source is missing ({e.strerror})"
    cc = cc or os.environ.get("CC") or "cc"
    folder = folder or cache_dir()
    target = folder / f"gemv_shim-{hashlib.sha256(source + platform.machine().encode()).hexdigest()[:16]}.so"
    if target.exists():
        return target, None
    tmp = folder / f".{target.name}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-ldl"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            return None, f"{cc} could not compile {SOURCE.name}: {why}"
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not compile {SOURCE.name} with {cc} into {folder} ({getattr(e, 'strerror', None) or e})"
    finally:
        _remove(tmp)
    return target, None


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # its folder could not be made
        pass


def load(blas_path: str) -> tuple[str | None, str | None]:
    """Bind the shim to the OpenBLAS at `blas_path` and make it global, before that
    OpenBLAS is (the caller's next step): (shim path, None), or (None, why not).  An
    unbound shim is never made global: its cblas_sgemm would have nothing to call."""
    if os.environ.get(OFF_SWITCH, "") not in ("", "0"):
        return None, f"{OFF_SWITCH} is set"
    path, why = build()
    if path is None:
        return None, why
    try:
        blas = ctypes.CDLL(blas_path, mode=ctypes.RTLD_LOCAL)
        shim = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
        shim.gemv_shim_bind.argtypes = [ctypes.c_void_p]
        if not shim.gemv_shim_bind(blas._handle):
            return None, f"{blas_path} lacks cblas_sgemm or cblas_sgemv"
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # promoted: ahead of OpenBLAS, promoted next
    except (OSError, AttributeError) as e:
        return None, f"could not load {path} ({e})"
    return str(path), None
