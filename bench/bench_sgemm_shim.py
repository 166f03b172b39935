"""One 1-32-row product `x @ W.T` through our `cblas_sgemm` against OpenBLAS's, and
against another build of our shim (docs/text-decoder.md §6.4).

Two settings, because they answer different questions:

- **hot**: one weight that fits the L2 caches, called over and over.  This is the
  kernel's arithmetic alone (GFMA/s: fused multiply-adds per second, R x N x K per
  product); run it with OPENBLAS_NUM_THREADS=1 to time one core (otherwise the
  shim splits even these weights between its threads).
- **cold**: `--cold-mb` of distinct weights cycled, so each product reads its weight
  from memory, as a decode step does (GB/s of weight).

Weights start `--offset` floats past a 64-byte boundary: 2 (8 bytes) is where MLX's
arrays start, 0 is aligned.  Each cell's first product is checked against float64,
on the copy timed last (out of cache by then).  The times include one ctypes call
(about 2 us here), which lowers the hot rates most at 1-2 rows.

    python bench/bench_sgemm_shim.py [--rows 1 4 8] [--shapes 4096x1024 ...] [--cold-mb 256]
        [--offset 0 2] [--against path/to/other_shim.c ...] [--rounds 3]

`--against` compiles another version of `_sgemm_shim.c` (e.g. from `git show
HEAD~1:gemma4_mlx/_sgemm_shim.c > /tmp/old.c`) with the same flags, so two kernels
are timed in one process, interleaved round by round, on the same memory.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import tempfile
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first, then our shim)

# isort: split
import numpy as np

from gemma4_mlx import _blas, _blas_shim

ROW, NO, T = 101, 111, 112
ARGS = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
ARGS += [ctypes.c_float, ctypes.c_void_p, ctypes.c_int]


def bind(path: str):
    """cblas_sgemm of a shim build at `path`, bound to the OpenBLAS in use."""
    lib = ctypes.CDLL(path)
    lib.sgemm_shim_bind.argtypes = [ctypes.c_void_p]
    if lib.sgemm_shim_bind(ctypes.CDLL(_blas.loaded_from)._handle) != 1:
        raise SystemExit(f"{path}: could not bind it to {_blas.loaded_from}")
    lib.cblas_sgemm.argtypes = ARGS
    return lib.cblas_sgemm


def compile_other(source: str, folder: str, index: int) -> str:
    out = os.path.join(folder, f"{index}-{os.path.basename(source)}.so")
    done = _blas_shim.compile_to(out, source=source)
    if done.returncode:
        raise SystemExit(f"{source}: could not compile it:\n{done.stderr[-2000:]}")
    return out


def weights(rng, n: int, shape: tuple[int, int], offset: int) -> list[np.ndarray]:
    """n copies of a random [N, K] float32 weight, each `offset` floats past 64 bytes."""
    out = []
    for _ in range(n):
        buf = np.empty(shape[0] * shape[1] + 32, np.float32)
        start = (-buf.ctypes.data % 64) // 4 + offset
        w = buf[start : start + shape[0] * shape[1]].reshape(shape)
        w[...] = rng.standard_normal(shape, dtype=np.float32)
        out.append(w)
    return out


def best_seconds(fn, x: np.ndarray, ws: list[np.ndarray], calls: int) -> float:
    """Best time of one product over `calls` products cycling through ws (checked on
    the last copy, which the cycle reaches last)."""
    R, K = x.shape
    N = ws[0].shape[0]
    c = np.empty((R, N), np.float32)
    xp, cp = x.ctypes.data, c.ctypes.data
    fn(ROW, NO, T, R, N, K, 1.0, xp, K, ws[-1].ctypes.data, K, 0.0, cp, N)
    if not np.allclose(c, x.astype(np.float64) @ ws[-1].T.astype(np.float64), rtol=1e-4, atol=1e-3):
        raise SystemExit(f"wrong product at R={R} W[{N},{K}]")
    pointers = [w.ctypes.data for w in ws]
    best = float("inf")
    for i in range(calls):
        wp = pointers[i % len(ws)]
        t = time.perf_counter()
        fn(ROW, NO, T, R, N, K, 1.0, xp, K, wp, K, 0.0, cp, N)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--shapes", nargs="*", default=["8192x1024", "1024x4096", "4096x512"])
    ap.add_argument("--hot", nargs="*", default=["256x512", "128x1024", "64x2048"], help="weights that fit L2")
    ap.add_argument("--cold-mb", type=int, default=256)
    ap.add_argument("--offset", type=int, nargs="*", default=[2])
    ap.add_argument("--against", nargs="*", default=[])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not _blas.shim:
        raise SystemExit(f"no shim in use: {_blas.shim_off}")
    print(f"# {_blas.describe()}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}")
    print(f"# 1-min load average at start: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as folder:
        fns = {"openblas": ctypes.CDLL(_blas.loaded_from).cblas_sgemm, "ours": bind(_blas.shim)}
        fns["openblas"].argtypes = ARGS
        for i, source in enumerate(args.against):
            fns[f"{i + 1}: {os.path.basename(source)}"] = bind(compile_other(source, folder, i))
        run(args, fns)


def run(args, fns: dict) -> None:
    rng = np.random.default_rng(0)
    cells = [("hot", s) for s in args.hot] + [("cold", s) for s in args.shapes]
    print("| setting | W [N, K] | offset | R | " + " | ".join(fns) + " | ours / openblas |")
    print("|---" * (5 + len(fns)) + "|")
    for setting, spec in cells:
        N, K = map(int, spec.split("x"))
        copies = 1 if setting == "hot" else max(2, (args.cold_mb << 20) // (N * K * 4))
        calls = 200 if setting == "hot" else copies
        for offset in args.offset:
            ws = weights(rng, copies, (N, K), offset)
            for R in args.rows:
                x = rng.standard_normal((R, K), dtype=np.float32)
                best = {name: float("inf") for name in fns}
                for _ in range(args.rounds):  # interleaved: a slow spell of the machine hits all alike
                    for name, fn in fns.items():
                        best[name] = min(best[name], best_seconds(fn, x, ws, calls))
                unit = (lambda s: f"{R * N * K / s / 1e9:.1f} GFMA/s") if setting == "hot" else None
                unit = unit or (lambda s: f"{N * K * 4 / s / 1e9:.1f} GB/s")
                cols = " | ".join(f"{best[n] * 1e6:.1f} µs, {unit(best[n])}" for n in fns)
                ratio = best["openblas"] / best["ours"]
                print(f"| {setting} | [{N}, {K}] | {offset} | {R} | {cols} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
