"""The memory-mapped per-layer-embedding table's lookup cost (models/ple_table.py).

    python bench/bench_ple.py [--rows 16384]

Writes a bf16 table of real E2B width (35 layers x 256 = 8,960 columns; rows cut to
--rows, the lookup cost does not depend on them) and times a lookup of 1, 8, 128 and
512 token ids from the mapped table against the same lookup from the table held in
MLX memory (what `map_ple=False` does).  Best of 5 interleaved rounds of 100 calls.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS before mlx.core)

# isort: split

import mlx.core as mx
import numpy as np

from gemma4_mlx.models.ple_table import MappedTable

WIDTH = 35 * 256
WORK = Path(__file__).resolve().parent / "_work" / "ple"


def per_call(fn, ids, calls: int = 100) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        mx.eval(fn(ids))
    return (time.perf_counter() - t0) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "table.safetensors"
    mx.random.seed(0)
    mx.save_safetensors(str(path), {"t": mx.random.normal((args.rows, WIDTH)).astype(mx.bfloat16)})
    mapped, resident = MappedTable(path, "t"), mx.load(str(path))["t"]
    mx.eval(resident)
    print(f"bf16 table [{args.rows}, {WIDTH}]; microseconds per lookup, best of 5 interleaved rounds")
    print(f"{'ids':>5} {'mapped':>9} {'resident':>9} {'ratio':>6}")
    rng = np.random.default_rng(0)
    for n in (1, 8, 128, 512):
        ids = mx.array(rng.integers(0, args.rows, (1, n)))
        assert mx.array_equal(mapped(ids).view(mx.uint16), resident[ids].view(mx.uint16)).item()
        best = {"mapped": float("inf"), "resident": float("inf")}
        for _ in range(5):
            best["mapped"] = min(best["mapped"], per_call(mapped, ids))
            best["resident"] = min(best["resident"], per_call(lambda i: resident[i], ids))
        m, r = best["mapped"] * 1e6, best["resident"] * 1e6
        print(f"{n:>5} {m:>9.0f} {r:>9.0f} {m / r:>6.2f}")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
