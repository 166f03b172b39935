"""Our `cblas_sgemm` ahead of OpenBLAS's, for the products of a decode step (Linux
CPU; docs/text-decoder.md §6.4).

MLX's CPU backend multiplies float32 matrices with `cblas_sgemm` only.  OpenBLAS's
GEMM streams a weight at 7-16 GB/s when the other operand has 1-8 rows (a decode
step of 1-8 sequences, a verify block); the machine streams 28-31 GB/s.
`_sgemm_shim.c` sends 1-8 rows times a big weight (transposed, as a linear layer
has it, or as stored, as attention's V is; and a big weight times one column), and
9-32 rows times a transposed one (in blocks of up to 8 over weight blocks in L2), to
kernels of ours that read the weight once for all rows, on a pool of worker threads
of ours as large as OpenBLAS's, and everything else to OpenBLAS's sgemm.  `_blas` puts it
ahead of OpenBLAS in the global symbol scope, as it puts OpenBLAS ahead of MLX's
reference BLAS.

It is compiled once, with the system C compiler ($CC, else cc) for this CPU
(-march=native), into the user's cache, named by a hash of the source, the flags
and the CPU's flags; it is written under a temporary name and renamed, so processes
starting together do not collide.  Without a compiler or a writable cache, or with
GEMMA4_MLX_NO_BLAS_SHIM=1, products go to OpenBLAS's sgemm as before, and `load`
says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("_sgemm_shim.c")
OFF_SWITCH = "GEMMA4_MLX_NO_BLAS_SHIM"
FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]  # no -ffast-math: NaN and Inf propagate as in BLAS
LIBS = ["-ldl", "-lpthread"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gemma4-mlx"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open(cpuinfo) as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def build(cc: str | None = None, folder: Path | None = None) -> tuple[Path | None, str | None]:
    """The compiled shim, compiled now if this source has not been for this CPU:
    (path, None), or (None, why not).  A cached file that another user could have
    written is refused."""
    try:
        source = SOURCE.read_bytes()
    except OSError as e:
        return None, f"its source is missing ({e.strerror})"
    cc = cc or os.environ.get("CC") or "cc"
    folder = folder or cache_dir()
    built_for = " ".join(FLAGS + LIBS + sorted(cpu_flags())).encode()
    key = hashlib.sha256(source + built_for).hexdigest()[:16]
    target = folder / f"sgemm_shim-{key}.so"
    if target.exists():
        return (target, None) if _ours(target) else (None, f"{target} is not the user's own file; not loaded")
    tmp = None
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=folder)
        os.close(fd)
        done = compile_to(tmp, cc=cc)
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            why = next((ln for ln in lines if "error" in ln), lines[-1] if lines else f"exit {done.returncode}")
            return None, f"{cc} could not compile {SOURCE.name}: {why.strip()}"
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not compile {SOURCE.name} with {cc} into {folder} ({getattr(e, 'strerror', None) or e})"
    finally:
        if tmp:
            _remove(Path(tmp))
    return target, None


def compile_to(target, *extra: str, cc: str | None = None, source=SOURCE) -> subprocess.CompletedProcess:
    """Compile `source` (the shim's, or a variant of it) with our flags plus `extra`
    (e.g. "-DSPIN_NS=0", "-mno-avx512f") into `target`; the caller reads the result.
    One command for `build`, the tests' variant builds and the benchmark's."""
    cc = cc or os.environ.get("CC") or "cc"
    cmd = [cc, *FLAGS, *extra, "-o", str(target), str(source), *LIBS]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _ours(path: Path) -> bool:
    """The file and its folder belong to this user and nobody else may write them."""
    try:
        stats = [p.stat() for p in (path, path.parent)]
    except OSError:
        return False
    return all(st.st_uid == os.getuid() and not st.st_mode & 0o022 for st in stats)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:  # its folder could not be made
        pass


def load(blas_path: str) -> tuple[str | None, str | None]:
    """Bind the shim to the OpenBLAS at `blas_path` and make it global, before that
    OpenBLAS is (the caller's next step): (shim path, None), or (None, why not).  An
    unbound shim is never made global: its cblas_sgemm would have nothing to call.
    A cached shim that does not load (broken, another glibc) is built again, once."""
    if os.environ.get(OFF_SWITCH, "") not in ("", "0"):
        return None, f"{OFF_SWITCH} is set"
    for _ in range(2):
        path, why = build()
        if path is None:
            return None, why
        try:
            shim = ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL)
            break
        except OSError as e:
            _remove(path)
            why = f"could not load {path} ({e})"
    else:
        return None, why
    try:
        if not shim.sgemm_shim_kernels():
            return None, "this CPU lacks AVX2 and FMA, which its kernels need"
        blas = ctypes.CDLL(blas_path, mode=ctypes.RTLD_LOCAL)
        shim.sgemm_shim_bind.argtypes = [ctypes.c_void_p]
        bound = shim.sgemm_shim_bind(blas._handle)
        if bound == -1:
            return None, "pthread_atfork failed: its thread pool would not survive a fork"
        if bound != 1:
            return None, f"{blas_path} lacks cblas_sgemm"
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)  # promoted: ahead of OpenBLAS, promoted next
    except (OSError, AttributeError) as e:
        return None, f"could not load {path} ({e})"
    return str(path), None
