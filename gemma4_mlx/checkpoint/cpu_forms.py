"""Pick the CPU's few-row product form by timing it on the loaded weights.

`ops.linear` can multiply a weight by a few rows as x @ W^T ("rows") or as
W @ x^T ("columns"); both are the same product up to float32 summation order, and
which one the BLAS streams faster depends on the machine (ops.CPU_FORMS).  Decode
speed on the CPU is that streaming speed, so after a checkpoint loads we time the
forms on the checkpoint's own float32 layer weights, at one row (decode, expert
pairs) and at four (batched decode, verify blocks: `ops.FEW_ROW_FORMS`), and keep
the fastest of each for this process.  The two are chosen apart: on one VM the
columns form won at one row and lost 2x at four.

Only once per process, only on the CPU, and only for checkpoints whose float32
layer weights reach MIN_BYTES: below that they sit in cache and the choice costs
more than it can save (the test suite's tiny models, the embedded demo).  Ties go
to "rows", the form every other MLX program uses: another form must be MARGIN faster.  GEMMA4_MLX_CPU_FORM=rows|columns
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
FEW_ROWS = 4  # the row count a few-row form is timed at
ROUNDS = 2  # interleaved; the best pass of each form counts
MARGIN = 0.03  # another form must be this much faster to replace "rows"
_SKIPPED = ("embed", "vision", "audio")  # gathered tables and towers only prefill uses

_decided: dict | None = None


def choose_cpu_form(model: nn.Module) -> dict | None:
    """Time the forms on `model`'s weights and set the fastest (once per process).

    Returns {rows: {form: seconds per pass}} as measured (rows 1 and FEW_ROWS), or
    None when nothing was timed (not the CPU, form fixed by the environment, too few
    weights, decided before).
    """
    global _decided
    if _decided is not None or ops.FIXED_CPU_FORM or not ops.cpu_branches():
        return None
    sample = layer_weights(model)
    if sum(w.nbytes for w in sample) < MIN_BYTES:
        return None
    times = time_forms(sample[: _prefix_count(sample)])
    one, few = fastest(times[1]), fastest(times[FEW_ROWS])
    ops.set_cpu_form(one, few)
    _decided = times
    said = "; ".join(f"{n} row(s): " + ", ".join(f"{f} {1e3 * t:.1f}" for f, t in times[n].items()) for n in times)
    log.info("CPU product forms: %s for one row, %s for a few (ms per pass: %s)", one, few, said)
    return times


def fastest(times: dict[str, float]) -> str:
    """The fastest form, if MARGIN faster than "rows"; else "rows"."""
    best = min(times, key=times.get)
    return best if times[best] < (1 - MARGIN) * times["rows"] else "rows"


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


def time_forms(weights: list[mx.array]) -> dict[int, dict[str, float]]:
    """Best seconds per pass (every weight times one row, or FEW_ROWS rows) per form:
    {1: {form: s} over ops.CPU_FORMS, FEW_ROWS: {form: s} over ops.FEW_ROW_FORMS}."""
    cases = [(1, form) for form in ops.CPU_FORMS] + [(FEW_ROWS, form) for form in ops.FEW_ROW_FORMS]
    widths = _widths(weights)
    xs = {(rows, n): mx.random.normal((rows, n), key=mx.random.key(rows)) for rows in (1, FEW_ROWS) for n in widths}
    mx.eval(weights, xs)
    before = ops.cpu_form(1), ops.cpu_form(FEW_ROWS)
    best = {rows: {} for rows in (1, FEW_ROWS)}
    try:
        for round_ in range(ROUNDS + 1):
            for rows, form in cases:
                ops.set_cpu_form(form if rows == 1 else before[0], form if rows > 1 else before[1])
                start = time.perf_counter()
                mx.eval([ops.linear(xs[rows, w.shape[1]], w) for w in weights])
                if round_:  # round 0 warms every form (pages in the weights)
                    took = time.perf_counter() - start
                    best[rows][form] = min(best[rows].get(form, took), took)
    finally:
        ops.set_cpu_form(*before)
    return best


def _widths(weights: list[mx.array]) -> set[int]:
    return {w.shape[1] for w in weights}
