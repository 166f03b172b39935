"""The batch's KV-cache memory, projected before a job is admitted (docs/serving.md §2.2).

Every row of a batch holds the batch's longest context in its full-attention layers
(rows share one slot axis), so one long request makes every row's cache as long as
its own.  Before prompts start prefilling, `KVBudget.admits` projects the joined
batch's KV bytes at its largest: all rows (running and new) over the slots the
longest of them will reach — today's slots, or the longest new prompt, plus the
most tokens any row may still emit — in full-attention layers, capped at the
retained slots in sliding ones.  Rows leaving before then only make it smaller, so
the projection is an upper bound (without a drafter: a speculative round holds K
more slots for a moment).  The bytes per slot of each layer (the model's geometry
and the KV dtype or bits) are read once from a cache holding one token, so the
check costs a few multiplications per admission.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx

from gemma4_mlx.batching.job import Job
from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.contracts import DecodingModel


class KVBudgetExceeded(ValueError):
    """A request that does not fit the KV budget even in an empty batch (the server
    answers 400 with this message)."""


class KVBudget:
    """budget_bytes: the most KV-cache bytes the running batch may hold (None: no limit)."""

    def __init__(self, budget_bytes: int | None):
        self.budget = budget_bytes
        self._layers: list[tuple[float, int | None]] | None = None  # (bytes per row-slot, retained cap)

    def learn(self, model: DecodingModel, fresh: Callable[[], LayerCaches]) -> None:
        """Read the bytes per row and slot of every layer, once: from a cache of one token."""
        if self._layers is not None or self.budget is None:
            return
        cache = fresh()
        model.fill_cache(mx.array([[0]]), cache)
        mx.eval(cache.state)
        layers = []
        for c in cache.writers():
            k, v = c.state
            rows_slots = kvs.batch(k) * kvs.length(k)
            cap = None if c.window is None else c.keep  # a sliding cache retains at most keep slots
            layers.append(((kvs.nbytes(k) + kvs.nbytes(v)) / rows_slots, cap))
        self._layers = layers

    def projected(self, rows: Sequence[Job], slots: int, new: Sequence[Job]) -> int:
        """Bytes the batch of `rows` (holding `slots` slots in full-attention layers)
        plus the `new` jobs holds at most; 0 before any cache was seen."""
        if not self._layers:
            return 0
        jobs = list(rows) + list(new)
        peak = max([slots] + [len(j.ids) for j in new]) + max(j.remaining for j in jobs)
        return int(sum(per * len(jobs) * (peak if cap is None else min(cap, peak)) for per, cap in self._layers))

    def admits(self, rows: Sequence[Job], slots: int, new: Sequence[Job]) -> bool:
        return self.budget is None or self.projected(rows, slots, new) <= self.budget

    def refusal(self, job: Job) -> KVBudgetExceeded:
        """The error of a job that does not fit even alone."""
        need = self.projected([], 0, [job])
        return KVBudgetExceeded(
            f"request needs {need / 2**30:.2f} GiB of KV cache for its {len(job.ids)} prompt tokens "
            f"and max_tokens {job.max_tokens}; the server's KV budget is {self.budget / 2**30:.2f} GiB "
            f"(--kv-cache-gb)"
        )
