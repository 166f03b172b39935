"""The 26B-A4B mixture-of-experts branch: router and stacked experts.

Router (docs/text-decoder.md §4.10): on the *un-normed* residual, scale-free norm,
times `scale` and H^-1/2, softmax in float32 over all experts, top-k, renormalise,
times `per_expert_scale`.  Experts run through `gather_mm` (or `gather_qmm` once
quantized), reading each expert's weights once per sorted group.
On the CPU, prefill runs one GEMM per expert (`segment`), float or quantized.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from gemma4_mlx import ops, ops_quantized
from gemma4_mlx.formats import registry
from gemma4_mlx.models import fuse, parallel
from gemma4_mlx.models.layers import Linear
from gemma4_mlx.models.quantized import affine_biases, entry, row_biases, scaled


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.proj = Linear(hidden, num_experts)
        self.scale = mx.ones((hidden,))
        self.per_expert_scale = mx.ones((num_experts,))
        self.top_k = top_k
        self.eps = eps
        self._root = hidden**-0.5

    def __call__(self, r: mx.array):
        # scale * H^-1/2 is the norm's weight: one float32 multiply, rounded once.
        hi = ops.wide(r.dtype)
        z = ops.rms_norm(r, self.scale.astype(hi) * ops.const(self._root, r.dtype), self.eps)
        probs = ops.softmax(self.proj(z).astype(hi))
        k = self.top_k
        idx = mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k]
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        w = w * self.per_expert_scale.astype(hi)[idx]
        return w, idx  # w stays in float32 until the expert outputs are combined


class ExpertLinear(nn.Module):
    """E stacked [out, in] matrices, applied to each row's selected expert."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        scale = in_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out_dims, in_dims))

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        return ops.gather_mm(x, self.weight.swapaxes(-1, -2), idx, sorted_indices)

    def segment(self, x: mx.array, expert: int) -> mx.array:
        return ops.linear(x, entry(self.weight, expert))

    def to_quantized(
        self, group_size: int | None = None, bits: int | None = None, mode: str = "affine"
    ) -> QuantizedExpertLinear:
        """Quantize the stacked weights in memory (what `nn.quantize` calls)."""
        E, out_dims, in_dims = self.weight.shape
        q = QuantizedExpertLinear(E, in_dims, out_dims, group_size, bits, mode)
        q.weight, q.scales, *b = mx.quantize(self.weight, q.group_size, q.bits, mode=mode)
        if b:
            q.biases = b[0]
        return q


class QuantizedExpertLinear(nn.Module):
    """Quantized E x [out, in] experts, run with `gather_qmm` (or `quantized_matmul`
    per expert in `segment`).  Packed like mlx-lm's `QuantizedSwitchLinear`:
    weight [E, out, in*bits/32] uint32, scales (and affine biases) [E, out, in/group].
    tensor_scale: optional fp32 SFP8 per-tensor scale, applied after the product.
    """

    def __init__(
        self,
        num_experts: int,
        in_dims: int,
        out_dims: int,
        group_size: int | None = None,
        bits: int | None = None,
        mode: str = "affine",
        tensor_scale: bool = False,
        derive_biases: bool = False,
    ):
        super().__init__()
        native = registry.for_mode(mode)  # the mode's default group size and bits
        self.group_size, self.bits, self.mode = group_size or native.group_size, bits or native.bits, mode
        if in_dims % self.group_size or (in_dims * self.bits) % 32:
            raise ValueError(f"experts: input size {in_dims} not divisible by group size {self.group_size}")
        # Placeholders with the packed shapes; the loader replaces them (never evaluated).
        self.weight = mx.zeros((num_experts, out_dims, in_dims * self.bits // 32), mx.uint32)
        groups = (num_experts, out_dims, in_dims // self.group_size)
        self.derive_biases = derive_biases  # Q4_0: -8 * scales, computed per product
        if mode == "affine":
            self.scales = mx.zeros(groups, mx.float32)
            if not derive_biases:
                self.biases = mx.zeros(groups, mx.float32)
        else:
            self.scales = mx.zeros(groups, mx.uint8)
        if tensor_scale:
            self.tensor_scale = mx.ones((1,), mx.float32)
        self.freeze()

    def __call__(self, x: mx.array, idx: mx.array, sorted_indices: bool) -> mx.array:
        y = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            affine_biases(self),
            rhs_indices=idx,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        return scaled(y, self, x.dtype)

    def segment(self, x: mx.array, expert: int) -> mx.array:
        scales = entry(self["scales"], expert)
        biases = row_biases(self, expert, scales)
        y = ops_quantized.quantized_linear(
            x, entry(self["weight"], expert), scales, biases, self.group_size, self.bits, self.mode
        )
        return scaled(y, self, x.dtype)


class Experts(nn.Module):
    """GeGLU experts. Checkpoint `gate_up_proj` [E, 2Im, H] is split by `sanitize`."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.num_experts = num_experts  # held by this rank
        self.hidden = hidden
        self.first: int | None = None  # expert-parallel: the global id of this rank's first expert
        self.gate_proj = ExpertLinear(num_experts, hidden, inner)
        self.up_proj = ExpertLinear(num_experts, hidden, inner)
        self.down_proj = ExpertLinear(num_experts, inner, hidden)

    def shard(self, tp: parallel.Shard) -> parallel.Plan:
        """Expert parallel (docs/distributed.md §3): this rank holds E/N whole experts."""
        n = tp.split(self.num_experts, "experts")
        self.first, self.num_experts = tp.rank * n, n
        by_expert = parallel.Slice(0, tp.rank, tp.size)
        return parallel.apply(self, {name: by_expert for name in ("gate_proj", "up_proj", "down_proj")})

    def _local(self, idx: mx.array, w: mx.array) -> tuple[mx.array, mx.array, mx.array | None]:
        """Expert-parallel: ids made local; pairs routed to another rank's experts get
        the id E (one past the last: sorted last, and skipped by `_sorted` and
        `_segments`) and weight 0, so this rank's sum holds only its own experts'
        terms (adding the others' zeros is exact).  Also returns which pairs are mine."""
        if self.first is None:
            return idx, w, None
        local = idx - self.first
        mine = (local >= 0) & (local < self.num_experts)
        w = mx.where(mine, w.reshape(mine.shape), mx.zeros((), w.dtype))
        return mx.where(mine, local, self.num_experts), w, mine

    def _real(self, ids: mx.array) -> mx.array:
        """ids for the gather kernels: the id E (another rank's expert, weight 0) reads
        this rank's last expert instead of out of bounds."""
        return ids if self.first is None else mx.minimum(ids, self.num_experts - 1)

    def __call__(self, h: mx.array, w: mx.array, idx: mx.array) -> mx.array:
        shape = h.shape
        h = h.reshape(-1, shape[-1])
        idx, w, mine = self._local(idx.reshape(-1, idx.shape[-1]), w)
        n, k = idx.shape
        strategy = ops.moe_strategy(n * k, n, self.num_experts)
        if strategy == "gather":
            y = self._glu(h[:, None, None, :], self._real(idx), False).reshape(n, k, -1)
        else:
            # Group (token, expert) pairs by expert so each expert's weights are read once.
            flat = idx.flatten()
            order = mx.argsort(flat)
            x = h[order // k]
            if strategy == "sorted":
                y = self._sorted(x[:, None, :], flat[order])
            else:
                y = self._segments(x, flat)
            y = y[mx.argsort(order)].reshape(n, k, -1)
        if mine is not None:  # another rank's pairs are exactly nothing (a weight of 0 times inf is NaN)
            y = mx.where(mine[..., None], y, mx.zeros((), y.dtype))
        y = (y.astype(w.dtype) * w.reshape(n, k, 1)).sum(axis=1)
        return y.astype(h.dtype).reshape(shape)

    def _sorted(self, x: mx.array, ids: mx.array) -> mx.array:
        """The sorted-gather kernel over this rank's pairs only: another rank's pairs
        (id E) sort last and get zero rows instead of a product (one host read of
        their count per layer, expert-parallel only)."""
        if self.first is None:
            return self._glu(x, ids, True)
        m = int((ids < self.num_experts).sum().item())
        y = self._glu(x[:m], ids[:m], True) if m else None
        if m == x.shape[0]:
            return y
        rest = mx.zeros((x.shape[0] - m, *x.shape[1:-1], self.hidden), x.dtype)
        return rest if y is None else mx.concatenate([y, rest.astype(y.dtype)])

    def fuse(self) -> None:
        """gate/up experts as one stacked product per expert (`models/fuse.py`):
        half the gathers per MoE layer, after any `shard`."""
        fuse.fuse(self, ("gate_proj", "up_proj"), "gate_up_proj", axis=1)

    def _gate_up(self, y: mx.array) -> mx.array:
        """geglu of a stacked gate/up product."""
        g, u = mx.split(y, 2, axis=-1)
        return ops.geglu(g, u)

    def _glu(self, x, sel, sorted_indices):
        if "gate_up_proj" in self:
            h = self._gate_up(self.gate_up_proj(x, sel, sorted_indices))
        else:
            h = ops.geglu(self.gate_proj(x, sel, sorted_indices), self.up_proj(x, sel, sorted_indices))
        return self.down_proj(h, sel, sorted_indices)

    def _segments(self, x, flat):
        """x: rows sorted by expert. One GEMM per expert, sizes read on the host."""
        counts = np.bincount(np.array(flat), minlength=self.num_experts).tolist()
        outs, start = [], 0
        for e, c in enumerate(counts):
            if c and e == self.num_experts:  # another rank's experts (`_local`): sorted last
                outs.append(mx.zeros((c, x.shape[-1]), outs[0].dtype if outs else x.dtype))
            elif c:
                xe = x[start : start + c]
                if "gate_up_proj" in self:
                    h = self._gate_up(self.gate_up_proj.segment(xe, e))
                else:
                    h = ops.geglu(self.gate_proj.segment(xe, e), self.up_proj.segment(xe, e))
                outs.append(self.down_proj.segment(h, e))
                start += c
        return mx.concatenate(outs)
