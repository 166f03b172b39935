"""Pick the CPU's few-row product form by timing it on the loaded weights.

`ops.linear` can multiply a weight by a few rows as x @ W^T ("rows") or as
W @ x^T ("columns"); both are the same product up to float32 summation order, and
which one the BLAS streams faster depends on the machine (ops.CPU_FORMS).  Decode
speed on the CPU is that streaming speed, so after a checkpoint loads we time both
forms on the checkpoint's own float32 layer weights at one row (decode, expert
pairs) and keep the faster for this process.

A few rows (batched decode, verify blocks) keep "rows" whatever one row chose
(docs/text-decoder.md §6.3): on an AMD VM the columns forms of 4-8 rows, 1.3-1.5x
faster than rows most of the time, fell 2.5-3x behind in spells that started at
random within a process and lasted (our server at 8 clients: 0.82-0.94x
mlx_lm.server's throughput in three runs, 1.14x with rows), and a timing at load
cannot see a spell to come.  GEMMA4_MLX_CPU_FORM=ONE,FEW sets both
(`ops.FEW_ROW_FORMS`).

Only once per process, only on the CPU, and only for checkpoints whose float32
layer weights reach MIN_BYTES: below that they sit in cache and the choice costs
more than it can save (the test suite's tiny models, the embedded demo).  Ties go
to "rows", the form every other MLX program uses.  GEMMA4_MLX_CPU_FORM=rows|columns
skips the timing.
"""

from __future__ import annotations

import logging
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx import ops

log = logging.getLogger(__name__)

MIN_BYTES = 64 << 20  # float32 layer weights below this: keep the default form
SAMPLE_BYTES = 256 << 20  # timed per pass: larger than most caches, ~0.1 s of streaming
ROUNDS = 2  # interleaved; the best pass of each form counts
MARGIN = 0.03  # "columns" must be this much faster to replace "rows"
_SKIPPED = ("embed", "vision", "audio")  # gathered tables and towers only prefill uses

_decided: dict | None = None


def choose_cpu_form(model: nn.Module) -> dict | None:
    """Time both one-row forms on `model`'s weights and set the faster (once per
    process); a few rows keep "rows" (module docstring).

    Returns {form: seconds per pass} as measured, or None when nothing was timed
    (not the CPU, form fixed by the environment, too few weights, decided before).
    """
    global _decided
    if _decided is not None or ops.FIXED_CPU_FORM or not ops.cpu_branches():
        return None
    sample = layer_weights(model)
    if sum(w.nbytes for w in sample) < MIN_BYTES:
        return None
    times = time_forms(sample[: _prefix_count(sample)])
    best = "columns" if times["columns"] < (1 - MARGIN) * times["rows"] else "rows"
    ops.set_cpu_form(best, "rows")
    _decided = times
    ms = (1e3 * times[f] for f in ops.CPU_FORMS)
    log.info("CPU product form for one row: %s (rows %.1f ms, columns %.1f ms per pass)", best, *ms)
    return times


def layer_weights(model: nn.Module) -> list[mx.array]:
    """The float32 2-D weights decode multiplies, in model order (no tables, no towers)."""
    return [
        w
        for key, w in tree_flatten(model.parameters())
        if w.ndim == 2 and w.dtype == mx.float32 and key.endswith("weight") and not any(s in key for s in _SKIPPED)
    ]


def _prefix_count(weights: list[mx.array]) -> int:
    """How many leading weights make up SAMPLE_BYTES (at least one)."""
    total = 0
    for n, w in enumerate(weights, 1):
        total += w.nbytes
        if total >= SAMPLE_BYTES:
            return n
    return len(weights)


def time_forms(weights: list[mx.array]) -> dict[str, float]:
    """Best seconds per pass (every weight times one row) per one-row form."""
    xs = {n: mx.random.normal((1, n), key=mx.random.key(n)) for n in _widths(weights)}
    mx.eval(weights, xs)
    before = ops.cpu_form(1), ops.cpu_form(2)
    best = dict.fromkeys(ops.CPU_FORMS, float("inf"))
    try:
        for round_ in range(ROUNDS + 1):
            for form in ops.CPU_FORMS:
                ops.set_cpu_form(form, before[1])
                start = time.perf_counter()
                mx.eval([ops.linear(xs[w.shape[1]], w) for w in weights])
                if round_:  # round 0 warms both forms (pages in the weights)
                    best[form] = min(best[form], time.perf_counter() - start)
    finally:
        ops.set_cpu_form(*before)
    return best


def _widths(weights: list[mx.array]) -> set[int]:
    return {w.shape[1] for w in weights}
