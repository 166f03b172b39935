"""Tensor and expert parallelism over MLX's own distributed engine (docs/distributed.md).

The pieces the modules need, and nothing about any one module:
- `Shard`: this process's place in an `mx.distributed` group;
- `Slice`: which piece of a tensor axis a rank holds (`part` of `parts` equal pieces);
- `Plan`: module path -> `Slice`, applied to every array the module holds (a float
  weight, or a quantized weight with its scales and biases: all three are cut along the
  same logical axis, which stays on group boundaries when the piece is a multiple of the
  group size);
- the two collectives a forward pass uses: `all_sum` (row-sharded products, expert
  partial sums, the vocabulary-sharded embedding) and `gather_vocab` (the logits).

Each rank keeps the residual stream whole and identical: every sharded block ends in an
`all_sum`, so norms, RoPE, routers, samplers and the KV-cache bookkeeping run the same
code on every rank, and the caches hold only the rank's KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from gemma4_mlx import ranks
from gemma4_mlx.models.quantized import PER_TENSOR


class ShardError(ValueError):
    """A model that cannot be split this way; the message names the module and sizes."""


@dataclass(frozen=True)
class Shard:
    """This rank's place in a group of `size` processes (`group` is an `mx.distributed.Group`)."""

    group: object
    rank: int
    size: int

    @classmethod
    def of(cls, group) -> Shard | None:
        """None for a one-process group: nothing to split."""
        if group is None or group.size() == 1:
            return None
        return cls(group, group.rank(), group.size())

    def split(self, n: int, what: str) -> int:
        """n / size, or a one-line ShardError naming `what`."""
        if n % self.size:
            raise ShardError(f"{what}: {n} is not divisible by {self.size} ranks")
        return n // self.size


@dataclass(frozen=True)
class Slice:
    """Piece `part` of `parts` equal pieces along `axis` (-1: the last)."""

    axis: int
    part: int
    parts: int

    def take(self, a, what: str = "tensor"):
        """The piece of `a` (an mx or numpy array); ShardError if the axis does not divide."""
        axis = self.axis % a.ndim
        n = a.shape[axis]
        if n % self.parts:
            raise ShardError(f"{what}: axis {axis} of size {n} is not divisible into {self.parts} pieces")
        step = n // self.parts
        index = [slice(None)] * a.ndim
        index[axis] = slice(self.part * step, (self.part + 1) * step)
        return a[tuple(index)]

    @property
    def whole(self) -> bool:
        return self.parts == 1


Plan = dict[str, Slice]


def columns(tp: Shard) -> Slice:
    """Output rows of a [out, in] weight (an all-to-sharded linear)."""
    return Slice(0, tp.rank, tp.size)


def rows(tp: Shard) -> Slice:
    """Input columns of a [out, in] weight (a sharded-to-all linear, followed by `all_sum`)."""
    return Slice(-1, tp.rank, tp.size)


def head_slices(n_heads: int, n_kv: int, tp: Shard, what: str) -> tuple[Slice, Slice, int, int]:
    """(query-head slice, KV-head slice, local query heads, local KV heads).

    Query heads split evenly.  KV heads split evenly when there are at least as many as
    ranks; with fewer (E2B's single KV head) each rank keeps the KV heads its query
    heads read, so a KV head is computed on several ranks (docs/distributed.md §2)."""
    nh = tp.split(n_heads, f"{what}: query heads")
    if n_kv >= tp.size:
        return Slice(0, tp.rank, tp.size), Slice(0, tp.rank, tp.size), nh, tp.split(n_kv, f"{what}: KV heads")
    if tp.size % n_kv:
        raise ShardError(f"{what}: {n_kv} KV heads cannot be shared evenly by {tp.size} ranks")
    return Slice(0, tp.rank, tp.size), Slice(0, tp.rank * n_kv // tp.size, n_kv), nh, 1


def apply(module: nn.Module, plan: Plan, prefix: str = "") -> Plan:
    """Cut every array of each planned submodule in place; returns the plan with
    `prefix` on its paths (so a parent can merge its children's plans)."""
    out = {}
    for path, sl in plan.items():
        if sl.whole:
            continue
        m = module
        for part in path.split("."):
            m = m[int(part)] if isinstance(m, list) else m[part]
        for name, value in list(m.items()):
            if isinstance(value, mx.array) and name not in PER_TENSOR:  # replicated, never cut
                setattr(m, name, sl.take(value, f"{prefix}{path}.{name}"))
        out[prefix + path] = sl
    return out


def all_sum(x: mx.array, tp: Shard | None) -> mx.array:
    return x if tp is None else mx.distributed.all_sum(x, group=tp.group)


def from_leader(value: int, tp: Shard | None) -> int:
    """Rank 0's integer on every rank: host-side choices made from timings (the
    speculative draft length) must not differ between ranks, whose collectives
    would then stop matching."""
    return value if tp is None else ranks.from_rank0(value, tp.group)


def gather_vocab(logits: mx.array, tp: Shard | None) -> mx.array:
    """[..., V/N] per rank -> [..., V] on every rank (rank order is vocabulary order)."""
    if tp is None:
        return logits
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1]).T  # all_gather concatenates along axis 0
    full = mx.distributed.all_gather(flat, group=tp.group)
    return full.T.reshape(*lead, -1)
