"""What one small op costs on this backend, and how a decode step splits into building
its graph and evaluating it (docs/text-decoder.md §6.2, §6.4).

Thin models (hidden 512) are bound by per-op cost, not bandwidth: this prints the cost
per op of 1000 small ops (chained, or independent) of a few kinds on a [1, 1, 512]
float32 array, building included, best of --reps; then, for each shape, one decode
step of one row (bench_decode_breakdown's random model, context 512) split into the
Python time to build its graph and the time to evaluate it (medians of --steps).

    python bench/bench_op_cost.py [--shapes moe-small e2b-small] [--reps 10] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import gemma4_mlx

# isort: split
import mlx.core as mx
from bench_decode_breakdown import build, count_ops  # bench/ is on sys.path when run as a script

N = 1000


def chain(start: mx.array, step):
    """N ops, each on the last one's output."""

    def run():
        y = start
        for i in range(N):
            y = step(y, i)
        return [y]

    return run


def kinds(x: mx.array, w: mx.array) -> dict:
    """name -> a function building N ops of that kind (one output list)."""
    return {
        "add, chained": chain(x, lambda y, i: y + 1.0),
        "add, independent": lambda: [x + float(i) for i in range(N)],
        "reshape, chained": chain(x, lambda y, i: y.reshape(1, 512, 1) if i % 2 == 0 else y.reshape(1, 1, 512)),
        "transpose, chained": chain(x, lambda y, i: y.transpose(0, 2, 1)),
        "square, independent": lambda: [mx.square(x) for _ in range(N)],
        "sum of squares (2 ops), independent": lambda: [(x * x).sum(-1) for _ in range(N)],
        "linear [512, 512], 3-D input, chained": chain(x, lambda y, i: y @ w.T),
        "linear [512, 512], 2-D input, chained": chain(x.reshape(1, -1), lambda y, i: y @ w.T),
    }


def best_us(fn, reps: int) -> float:
    mx.eval(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t0)
    return best / N * 1e6


def step_split(shape: str, steps: int) -> str:
    model = build(shape, 32768, mx.float32, False)
    caches = model.make_cache()
    model.fill_cache(mx.random.randint(3, 32768, (1, 512)), caches)
    mx.eval([c.state for c in caches if c is not None])
    ids = mx.random.randint(3, 32768, (1, 1))
    ops = count_ops(model(ids, caches))
    caches.trim(1)
    built, evaluated = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(ids, caches)
        t1 = time.perf_counter()
        mx.eval(out)
        built.append(t1 - t0)
        evaluated.append(time.perf_counter() - t1)
        caches.trim(1)
    b, e = statistics.median(built) * 1e3, statistics.median(evaluated) * 1e3
    return f"{shape}: one decode step (B = 1, context 512), {ops} ops: graph built in {b:.2f} ms, evaluated {e:.2f} ms"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["moe-small", "e2b-small"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    print(
        f"# {mx.default_device()}, {gemma4_mlx._blas.describe()}; 1-min load average at start: {os.getloadavg()[0]:.2f}"
    )
    mx.random.seed(0)
    x, w = mx.random.normal((1, 1, 512)), 0.02 * mx.random.normal((512, 512))
    mx.eval(x, w)
    print(f"# per op, {N} ops on [1, 1, 512] float32, building included, best of {args.reps}:")
    for name, fn in kinds(x, w).items():
        print(f"{name:<40} {best_us(fn, args.reps):7.2f} us")
    for shape in args.shapes:
        print(step_split(shape, args.steps))


if __name__ == "__main__":
    main()
