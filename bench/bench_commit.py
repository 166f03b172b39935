"""The ragged speculative commit (`LayerCaches.commit`): in-place row copies against
the gather it replaced.

After a verify round of K + 1 tokens per row, rows that accepted fewer drafts are
moved right so that every row ends at the same slot (docs/speculative.md §10.3).
This times that commit on caches shaped like bench_speculative.py's dense target
(10 sliding layers of 4 KV heads x 256, 2 full layers of 1 x 512, window 128,
rollback 32) holding a ragged batch, for a few acceptance patterns, against the
previous implementation (`take_along_axis` over every row's region, written back
into the buffer it reads), kept here as the baseline.  Both must leave the same
valid entries.

    make bench-commit   # or: python bench/bench_commit.py [--batch 4] [--context 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx

from gemma4_mlx.cache import KVCache, LayerCaches, SlidingKVCache
from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.cache.layer import _Cache

LAYERS = ["S"] * 5 + ["F"] + ["S"] * 5 + ["F"]
PATTERNS = {  # accepted drafts per row after a K = 3 round
    "even (no move)": [3, 3, 3, 3, 3, 3, 3, 3],
    "one row behind": [3, 3, 3, 2, 3, 3, 3, 3],
    "ragged": [3, 1, 0, 2, 3, 0, 1, 2],
}
K = 3


def gather_shift(self, shifts):
    """The previous `_Cache._shift_rows`: every row gathered, written back in place."""
    sh = mx.array(shifts, dtype=mx.int32)
    n = self.size
    idx = mx.maximum(mx.arange(n)[None, :] - sh[:, None], 0)[:, None, :, None]
    for buf in (self.keys, self.values):
        region = kvs.slots(buf, self._start, self._end)
        kvs.put(buf, self._start, kvs.tmap(lambda t: mx.take_along_axis(t, idx, axis=2), region))


def filled(B: int, context: int) -> LayerCaches:
    """Caches of the dense target's shapes after a prefill of `context` tokens and a
    verify block of K + 1."""
    caches = LayerCaches(SlidingKVCache(128, max_rollback=32) if t == "S" else KVCache() for t in LAYERS)
    for t, c in zip(LAYERS, caches):
        heads, d = (4, 256) if t == "S" else (1, 512)
        for T in (context, K + 1):
            c.update_and_fetch(mx.random.normal((B, heads, T, d)), mx.random.normal((B, heads, T, d)))
    mx.eval(caches.state)
    return caches


def valid(caches: LayerCaches, accepted) -> list:
    """Each row's valid retained entries (what attention may read)."""
    out = []
    for c in caches.writers():
        k, v = c.state
        oldest = c.offset - c.size
        first = mx.zeros((len(accepted),), mx.int32) if c.valid_from is None else mx.maximum(c.valid_from - oldest, 0)
        out += [(x[b, :, int(first[b].item()) :], b) for x in (k, v) for b in range(len(accepted))]
    return out


def commit_once(B: int, context: int, accepted, shift) -> tuple[float, list]:
    """Seconds of one commit (evaluated) on fresh caches with `shift` as
    `_Cache._shift_rows`, and the valid entries it leaves."""
    mx.random.seed(0)  # the same caches for both implementations
    caches = filled(B, context)
    original = _Cache._shift_rows
    _Cache._shift_rows = shift
    try:
        t0 = time.perf_counter()
        caches.commit(accepted, K)
        mx.eval(caches.state)
        seconds = time.perf_counter() - t0
    finally:
        _Cache._shift_rows = original
    return seconds, valid(caches, accepted)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    B, kept = args.batch, {}
    print(
        f"ragged commit, K = {K}, B = {B}, context {args.context}: mlx {mx.__version__}, "
        f"{mx.default_device()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"median of {args.rounds} fresh caches each, the two implementations interleaved"
    )
    for name, pattern in PATTERNS.items():
        accepted = pattern[:B]
        times = {"gather": [], "rows": []}
        for _ in range(args.rounds):
            for label, shift in (("gather", gather_shift), ("rows", _Cache._shift_rows)):
                seconds, kept[label] = commit_once(B, args.context, accepted, shift)
                times[label].append(seconds)
        old, new = (1e3 * statistics.median(times[k]) for k in ("gather", "rows"))
        same = all(mx.array_equal(a, b).item() for (a, _), (b, _) in zip(kept["gather"], kept["rows"]))
        print(
            f"  {name:<15} accepted {accepted}: gather {old:7.1f} ms | row copies {new:7.1f} ms | "
            f"{old / max(new, 1e-3):5.1f}x | same valid entries: {same}"
        )


if __name__ == "__main__":
    main()
