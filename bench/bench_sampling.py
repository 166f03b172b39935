"""One sampled row's cost on Gemma 4's 262,144-token vocabulary: our keyed sampler
(`runtime.sampling.PositionedSampler`, what every sampled row of `generate`, the
batches and the server goes through) against mlx-lm's `make_sampler` with the same
settings, on the same logits.  Times are to the evaluated token, best of --rounds
interleaved rounds of --steps draws each.

    python bench/bench_sampling.py [--rows 1] [--rounds 5] [--steps 20]

Gemma's checkpoints recommend temperature 1, top-k 64, top-p 0.95, and the server
applies them to every request that does not set its own (docs/serving.md §5.4).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import make_sampler

from gemma4_mlx.runtime.sampling import PositionedSampler

V = 262144
SETTINGS = [  # (name, temperature, top_p, top_k, min_p, spread of the logits)
    ("Gemma's defaults: T 1, top-k 64, top-p 0.95", 1.0, 0.95, 64, 0.0, 3.0),
    ("top-k 40, min-p 0.05", 0.8, 0.0, 40, 0.05, 3.0),
    ("T 1, no filter", 1.0, 0.0, 0, 0.0, 3.0),
    ("top-p 0.9 alone", 0.7, 0.9, 0, 0.0, 3.0),
    ("top-p 0.9 alone, a peaked row", 0.7, 0.9, 0, 0.0, 5.0),
]


def timed(draw, logits, steps: int) -> float:
    mx.eval(draw(logits, 0))
    t0 = time.perf_counter()
    for i in range(steps):
        mx.eval(draw(logits, i))
    return (time.perf_counter() - t0) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"mlx {mx.__version__}, {mx.default_device()}, {os.cpu_count()} CPU cores ({platform.machine()})")
    print(f"load average {os.getloadavg()[0]:.2f}; V = {V:,}, {args.rows} row(s) a draw, float32 logits")
    normal = np.random.default_rng(0).normal(size=(args.rows, V)).astype(np.float32)
    print("logits: standard normal times a spread. At 3 a top-p 0.9 nucleus is ~11,300 tokens (the whole vocabulary")
    print("is sorted); at 5 (peaked, as a trained model's rows mostly are) it is 99 tokens, the top one at p = 0.50.")
    rows = list(range(args.rows))
    print(f"\n{'settings':46s} | {'ours':>9s} | {'mlx-lm':>9s} | mlx-lm / ours")
    for name, t, p, k, m, spread in SETTINGS:
        logits = mx.array(normal * spread)
        ours = PositionedSampler(t, p, k, m, seed=0)
        theirs = make_sampler(temp=t, top_p=p, min_p=m, top_k=k)
        draws = {
            "ours": lambda x, i: ours(x, rows, [i] * len(rows)),
            "mlx-lm": lambda x, i: theirs(x - mx.logsumexp(x, axis=-1, keepdims=True)),
        }
        best = {n: float("inf") for n in draws}
        for _ in range(args.rounds):
            for n, draw in draws.items():
                best[n] = min(best[n], timed(draw, logits, args.steps))
        print(
            f"{name:46s} | {best['ours'] * 1e3:6.2f} ms | {best['mlx-lm'] * 1e3:6.2f} ms"
            f" | {best['mlx-lm'] / best['ours']:5.2f}x"
        )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
