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

Per weight shape too.  On that AMD VM one row streamed a wide weight ([512, 2048],
[512, 4096]: the MLP's down projections) at 16-17 GB/s as columns and 11 as rows,
while tall ones ([4096, 512]) ran alike either way, so one choice for the whole
model was a near tie that could leave the wide products in their slow form.  Each
shape with at least SHAPE_MIN_BYTES of weights (or the L3's size: a smaller group
would be timed in cache) is also timed on its own, and keeps its own form where
that is SHAPE_MARGIN faster than the model's: wide shapes led by 30-60 % in every
load, while tall ones moved from load to load (by 3-6 % either way on e2b-small,
which changed nothing in decode).  Smaller groups, the gathered experts and the
tied head take the model's form (the head timed whole was a tie at [262144, 1024];
at [32768, 512] its 12 % lead alone moved e2b-small's decode by under 1 %).  A
sharded model takes rank 0's forms on every rank.

With our BLAS shim (`_blas_shim`, docs/text-decoder.md §6.4) both forms of one row
times a big weight reach the same kernel (a tie, which goes to rows); the forms still
differ for weights below its threshold, which OpenBLAS keeps.

Only once per process, only on the CPU, and only for checkpoints whose float32
layer weights reach MIN_BYTES: below that they sit in cache and the choice costs
more than it can save (the test suite's tiny models, the embedded demo).  Ties go
to "rows", the form every other MLX program uses.  GEMMA4_MLX_CPU_FORM=rows|columns
skips the timing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx import ops
from gemma4_mlx.models import parallel

log = logging.getLogger(__name__)

MIN_BYTES = 64 << 20  # float32 layer weights below this: keep the default form
SAMPLE_BYTES = 256 << 20  # timed per pass: larger than most caches, ~0.1 s of streaming
ROUNDS = 2  # interleaved; the best pass of each form counts
MARGIN = 0.03  # "columns" must be this much faster to replace "rows"
SHAPE_MIN_BYTES = 32 << 20  # a shape with this many bytes of weights (or the L3's size) is timed apart,
SHAPE_SAMPLE_BYTES = 64 << 20  # on this many of them per pass (or twice the L3): out of cache, as in decode
SHAPE_MARGIN = 0.10  # a shape's own form must be this much faster than the model's
LEADER_SHAPES = 30  # sharded: rank 0's forms for this many shapes fit one int32
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
    times = time_forms(sample[: _prefix_count(sample, SAMPLE_BYTES)])
    best = _faster(times)
    own = {shape: _faster(time_forms(ws), best, SHAPE_MARGIN) for shape, ws in _timed_apart(sample).items()}
    best, own = _rank0s(best, own, getattr(model, "tp", None))
    shapes = {shape: form for shape, form in own.items() if form != best}
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
    ops.set_cpu_form(*(ops.FIXED_CPU_FORM or ("rows", "rows")))  # a load that times nothing keeps the default


def _faster(times: dict[str, float], tie: str = "rows", margin: float = MARGIN) -> str:
    """The form `margin` faster than the `tie` form, else that one."""
    other = "columns" if tie == "rows" else "rows"
    return other if times[other] < (1 - margin) * times[tie] else tie


def _by_shape(weights: list[mx.array]) -> dict[tuple[int, ...], list[mx.array]]:
    groups: dict[tuple[int, ...], list[mx.array]] = {}
    for w in weights:
        groups.setdefault(tuple(w.shape), []).append(w)
    return groups


def _rank0s(best: str, own: dict, tp) -> tuple[str, dict]:
    """Rank 0's choices on every rank of a sharded model: replicated products (the
    router, the drafter) must round alike on every rank (docs/distributed.md §2),
    and a timing can fall either way of a near tie.  One int32, a bit a choice."""
    if tp is None:
        return best, own
    keys = sorted(own)[:LEADER_SHAPES]
    bits = [best] + [own[k] for k in keys]
    word = parallel.from_leader(sum(1 << i for i, form in enumerate(bits) if form == "columns"), tp)
    forms = ["columns" if word >> i & 1 else "rows" for i in range(len(bits))]
    return forms[0], dict(zip(keys, forms[1:]))


def _timed_apart(sample: list[mx.array]) -> dict[tuple[int, ...], list[mx.array]]:
    """What to time per shape: each layer shape with at least SHAPE_MIN_BYTES (or
    the L3's size) of weights, up to SHAPE_SAMPLE_BYTES (or twice the L3) of them."""
    l3 = _l3_bytes()
    least, budget = max(SHAPE_MIN_BYTES, l3), max(SHAPE_SAMPLE_BYTES, 2 * l3)
    return {
        shape: weights[: _prefix_count(weights, budget)]
        for shape, weights in _by_shape(sample).items()
        if sum(w.nbytes for w in weights) >= least
    }


def _l3_bytes() -> int:
    """The last-level cache's size where Linux says (0 elsewhere)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except (OSError, ValueError):
        return 0


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
    before = ops.cpu_form(1), ops.cpu_form(2), ops.cpu_shape_forms()
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
