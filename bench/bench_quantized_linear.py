"""Quantized products on the CPU: MLX's `quantized_matmul` against the dequantized path.

For each quantization mode and row count, times x @ W.T for a pool of distinct
[out, in] weights (together larger than the last-level cache, as in a model) two
ways, interleaved, best of --rounds:

  kernel     mx.quantized_matmul (what a GPU runs, and the CPU below the crossover)
  dequant    ops_quantized._dequantized_linear: the weight dequantized to float32 in row blocks,
             multiplied by BLAS (what the CPU runs from ops_quantized.CPU_DEQUANT_ROWS[mode] rows)

and prints the ratio kernel / dequant (> 1: the dequantized path is faster) beside
the row count ops_quantized.quantized_linear picks.  These are the measurements behind
ops_quantized.CPU_DEQUANT_ROWS.

    python bench/bench_quantized_linear.py [--shape 4096 1024] [--rows 1 4 8 ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
from report import Report

from gemma4_mlx import ops_quantized

MODES = [("affine", 64, 4), ("affine", 64, 8), ("affine", 32, 4), ("mxfp8", 32, 8), ("mxfp4", 32, 4), ("nvfp4", 16, 4)]
POOL_BYTES = 256 << 20  # float32 bytes of distinct weights per product round


def timed(fn, reps: int = 2) -> float:
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return (time.perf_counter() - start) / reps


def measure(shape, mode, group, bits, rows, rounds):
    out_dims, in_dims = shape
    pool = max(2, POOL_BYTES // (4 * out_dims * in_dims))
    weights = []
    for _ in range(pool):
        w, scales, *b = mx.quantize(mx.random.normal(shape) * 0.02, group_size=group, bits=bits, mode=mode)
        weights.append((w, scales, b[0] if b else None))
    mx.eval(weights)
    x = mx.random.normal((rows, in_dims))

    def kernel():
        return [
            mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group, bits=bits, mode=mode)
            for w, s, b in weights
        ]

    def dequant():
        return [ops_quantized._dequantized_linear(x, w, s, b, group, bits, mode) for w, s, b in weights]

    best = {"kernel": float("inf"), "dequant": float("inf")}
    for _ in range(rounds):
        for name, fn in (("kernel", kernel), ("dequant", dequant)):
            best[name] = min(best[name], timed(fn) / pool)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[4096, 1024], metavar=("OUT", "IN"))
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 2, 3, 4, 6, 8, 16, 24, 32, 64, 256])
    ap.add_argument("--modes", nargs="*", help="e.g. affine:64:4 mxfp4:32:4 (default: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    modes = [(m, int(g), int(b)) for m, g, b in (s.split(":") for s in args.modes)] if args.modes else MODES
    report = Report(args.out)
    report(
        f"quantized x @ W.T on {mx.default_device()}, W {args.shape[0]} x {args.shape[1]}, float32 x; "
        f"mlx {mx.__version__}; load average {os.getloadavg()[0]:.2f}; best of {args.rounds} interleaved rounds"
    )
    report("| mode | group | bits | rows | kernel ms | dequant ms | kernel / dequant | ops picks |")
    report("|---|---|---|---|---|---|---|---|")
    for mode, group, bits in modes:
        for rows in args.rows:
            t = measure(tuple(args.shape), mode, group, bits, rows, args.rounds)
            picks = "dequant" if rows >= ops_quantized.CPU_DEQUANT_ROWS.get(mode, float("inf")) else "kernel"
            report(
                f"| {mode} | {group} | {bits} | {rows} | {t['kernel'] * 1e3:.2f} | {t['dequant'] * 1e3:.2f} "
                f"| {t['kernel'] / t['dequant']:.2f} | {picks} |"
            )


if __name__ == "__main__":
    main()
