"""One batched decode step, ours vs mlx-lm, on the server benchmark's checkpoints.

What sets a server's throughput at concurrency C is mostly the cost of one decode
step over C rows.  This times that step alone — B rows of equal length (no padding,
so both runtimes run their plain batched caches), greedy, same weights, same BLAS —
and prints it beside the arithmetic it has to do: 2 x (weights read per token) x B
floating-point operations, as a rate against the best float32 GEMM rate measured
in the same run.  A step near that rate is compute-bound: both runtimes call the
same BLAS products, so neither can be much faster than the other.

    python bench/bench_batch_decode.py [--shapes e2b-shaped moe-shaped] [--batch 1 4 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
from bench_text import SHAPES, build_checkpoint, load_both, weight_bytes_per_token
from mlx_lm.models.cache import make_prompt_cache


def gemm_rate() -> float:
    """Best float32 FLOP/s of large products (the compute roofline of a batched step)."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (512, 4096, 4096)):
        a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
        mx.eval(a, b)
        for _ in range(5):
            t = time.perf_counter()
            mx.eval(a @ b)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t))
    return best


def step_time(model, cache, tok: mx.array, steps: int) -> float:
    """Median seconds of one greedy [B, 1] step after a warm-up step."""
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        tok = mx.argmax(model(tok, cache=cache)[:, -1], axis=-1)[:, None]
        mx.eval(tok)
        times.append(time.perf_counter() - t)
    times = sorted(times[1:])
    return times[len(times) // 2]


def measure(name: str, folder: Path, batches: list[int], rounds: int, prompt: int, steps: int) -> list:
    V = SHAPES[name]["vocab_size"]
    mine, theirs = load_both(folder, quantized=False)
    flops_tok = 2 * weight_bytes_per_token(mine) / 4  # float32: 4 bytes per weight
    rows = []
    for B in batches:
        ids = mx.array([[2] + [(7 * i + 13 * b) % (V - 3) + 3 for i in range(prompt - 1)] for b in range(B)])
        best = {"ours": float("inf"), "mlx-lm": float("inf")}
        for _ in range(rounds):  # interleaved: the same machine state for both
            for who, model, cache in (
                ("ours", mine, mine.make_cache()),
                ("mlx-lm", theirs, make_prompt_cache(theirs)),
            ):
                tok = mx.argmax(model(ids, cache=cache)[:, -1], axis=-1)[:, None]
                mx.eval(tok)
                best[who] = min(best[who], step_time(model, cache, tok, steps))
        rows.append((name, B, best["ours"], best["mlx-lm"], flops_tok * B))
    del mine, theirs
    gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["e2b-shaped", "moe-shaped"])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    rate = gemm_rate()
    print(f"# batched decode step, float32, {mx.default_device()}; 1-min load {os.getloadavg()[0]:.2f} at start")
    print(f"# best float32 GEMM rate in this run: {rate / 1e9:.1f} GFLOP/s\n")
    print("| shape | B | ours ms/step | mlx-lm ms/step | mlx-lm / ours | ours GFLOP/s | % of GEMM rate |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        folder = build_checkpoint(name, SHAPES[name])  # bench_text's cached random checkpoint
        for shape, B, ours, theirs, flops in measure(name, folder, args.batch, args.rounds, args.prompt, args.steps):
            print(
                f"| {shape} | {B} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {theirs / ours:.2f} | "
                f"{flops / ours / 1e9:.1f} | {100 * flops / ours / rate:.0f} % |",
                flush=True,
            )


if __name__ == "__main__":
    main()
