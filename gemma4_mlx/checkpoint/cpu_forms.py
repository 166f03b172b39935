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

Per weight shape too: on that AMD VM one row streamed a wide weight ([512,
2048], [512, 4096]: the MLP's down projection) at 16-17 GB/s as columns and 11 as
rows, while tall ones ([4096, 512]) ran the same either way, so a choice for the
whole model was a near tie (rows one run, columns the next) that left the wide
products slow in either case.  Each shape with at least SHAPE_MIN_BYTES of
weights is timed on its own and keeps its faster form (a tie: the model's; the
tall [8192, 1024] and [16384, 1024] of the E2B shape timed within 1 % either way,
and decoded faster in the columns the model took); smaller groups (timed alone
they would sit in cache) and the experts take the model's form.  The tied head
is timed apart too, on its leading rows: at a 262K vocabulary it is a third of
a decode step's bytes, and there [262144, 1024] streamed at 11.1 GB/s as
columns, 8.9 as rows (at [32768, 512] 9.8 / 11.0).

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
SHAPE_MIN_BYTES = 32 << 20  # a shape's weights timed apart: past a 32 MB L3, as in decode
SHAPE_SAMPLE_BYTES = 64 << 20  # of them timed per pass
_TOWERS = ("vision", "audio")  # run by prefill only
_SKIPPED = ("embed", *_TOWERS)  # gathered tables too

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
    times = time_forms(sample[: _prefix_count(sample, SAMPLE_BYTES)])
    best = _faster(times)
    shapes = {}
    for shape, weights in _timed_apart(model, sample).items():
        form = _faster(time_forms(weights), best)
        if form != best:
            shapes[shape] = form
    ops.set_cpu_form(best, "rows", shapes)
    _decided = times
    ms = (1e3 * times[f] for f in ops.CPU_FORMS)
    log.info("CPU product form for one row: %s (rows %.1f ms, columns %.1f ms per pass)", best, *ms)
    for shape, form in shapes.items():
        log.info("CPU product form for one row of a %s weight: %s", list(shape), form)
    return times


def forget() -> None:
    """Let the next load time the forms again, as a fresh process would (a benchmark
    that loads several checkpoints in one process)."""
    global _decided
    _decided = None


def _faster(times: dict[str, float], tie: str = "rows") -> str:
    """The form MARGIN faster than the `tie` form, else that one."""
    other = "columns" if tie == "rows" else "rows"
    return other if times[other] < (1 - MARGIN) * times[tie] else tie


def _by_shape(weights: list[mx.array]) -> dict[tuple[int, ...], list[mx.array]]:
    groups: dict[tuple[int, ...], list[mx.array]] = {}
    for w in weights:
        groups.setdefault(tuple(w.shape), []).append(w)
    return groups


def _timed_apart(model: nn.Module, sample: list[mx.array]) -> dict[tuple[int, ...], list[mx.array]]:
    """What to time per shape: each layer shape with SHAPE_MIN_BYTES of weights (up
    to SHAPE_SAMPLE_BYTES of them), and the tied head's leading rows (one table, the
    largest single product of a decode step at a 262K vocabulary)."""
    groups = {
        shape: weights[: _prefix_count(weights, SHAPE_SAMPLE_BYTES)]
        for shape, weights in _by_shape(sample).items()
        if sum(w.nbytes for w in weights) >= SHAPE_MIN_BYTES
    }
    head = head_weight(model)
    if head is not None and head.nbytes >= SHAPE_MIN_BYTES and tuple(head.shape) not in groups:
        rows = max(1, SHAPE_SAMPLE_BYTES // (head.shape[1] * head.itemsize))
        groups[tuple(head.shape)] = [mx.contiguous(head[:rows])]
    return groups


def head_weight(model: nn.Module) -> mx.array | None:
    """The float32 token table the tied head multiplies by (None if quantized)."""
    for key, w in tree_flatten(model.parameters()):
        if key.endswith("embed_tokens.weight") and w.ndim == 2 and w.dtype == mx.float32:
            if not any(s in key for s in _TOWERS):
                return w
    return None


def layer_weights(model: nn.Module) -> list[mx.array]:
    """The float32 2-D weights decode multiplies, in model order (no tables, no towers)."""
    return [
        w
        for key, w in tree_flatten(model.parameters())
        if w.ndim == 2 and w.dtype == mx.float32 and key.endswith("weight") and not any(s in key for s in _SKIPPED)
    ]


def _prefix_count(weights: list[mx.array], budget: int) -> int:
    """How many leading weights make up `budget` bytes (at least one)."""
    total = 0
    for n, w in enumerate(weights, 1):
        total += w.nbytes
        if total >= budget:
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
