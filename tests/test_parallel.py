"""The tensor / expert parallel pieces in one process (models/parallel.py; the
two-rank runs are in test_distributed.py): each rank's part of an MoE layer, computed
separately and summed, equals the whole layer in every expert strategy; which heads a
rank keeps; what is refused."""

from __future__ import annotations

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from gemma4_mlx.cli import app
from gemma4_mlx.models import moe
from gemma4_mlx.models.moe import Experts
from gemma4_mlx.models.parallel import Shard, ShardError, Slice, head_slices


@pytest.mark.parametrize("strategy", ["gather", "sorted", "segments"])
@pytest.mark.parametrize("quantized", [False, True])
def test_expert_parallel_parts_sum_to_the_whole(monkeypatch, strategy, quantized):
    mx.random.seed(1)
    E, H, inner = 8, 64, 32
    whole = Experts(E, H, inner)
    if quantized:
        whole = _quantized(whole)
    h = mx.random.normal((3, 7, H))
    idx = mx.random.randint(0, E, (3, 7, 2))
    w = mx.random.uniform(shape=(3, 7, 2))
    monkeypatch.setattr(moe.ops, "moe_strategy", lambda nk, n, experts: strategy)
    expected = whole(h, w, idx)
    parts = []
    for rank in range(2):
        part = _quantized(Experts(E, H, inner)) if quantized else Experts(E, H, inner)
        part.update(whole.parameters())
        part.shard(Shard(None, rank, 2))
        assert part.num_experts == 4 and part.first == 4 * rank
        parts.append(part(h, w, idx))
    assert mx.allclose(parts[0] + parts[1], expected, atol=1e-5).item()
    assert not mx.allclose(parts[0], expected, atol=1e-3).item()  # each rank holds only a part


def _quantized(experts: Experts) -> Experts:
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(experts, name, getattr(experts, name).to_quantized(group_size=32, bits=4))
    return experts


def test_another_ranks_expert_contributes_exactly_nothing(monkeypatch):
    """Not a weight of 0 times the product: an inf there would give NaN."""
    mx.random.seed(2)
    part = Experts(4, 16, 8)
    part.shard(Shard(None, 0, 2))  # holds experts 0 and 1
    part.down_proj.weight = mx.full(part.down_proj.weight.shape, mx.inf)  # only rank 1's would be read...
    part.down_proj.weight[0] = 0.1  # ...but this rank's own expert 0 is finite
    monkeypatch.setattr(moe.ops, "moe_strategy", lambda nk, n, experts: "gather")
    out = part(mx.ones((1, 1, 16)), mx.array([[[0.5, 0.5]]]), mx.array([[[0, 3]]]))
    assert mx.isfinite(out).all().item()


def test_which_heads_a_rank_keeps():
    q, kv, nh, nkv = head_slices(8, 1, Shard(None, 1, 2), "e2b")  # one KV head: both ranks compute it
    assert (nh, nkv, kv.whole) == (4, 1, True) and q == Slice(0, 1, 2)
    q, kv, nh, nkv = head_slices(8, 2, Shard(None, 3, 4), "e4b")  # 2 KV heads, 4 ranks: ranks 2, 3 read head 1
    assert (nh, nkv, kv) == (2, 1, Slice(0, 1, 2))
    q, kv, nh, nkv = head_slices(32, 16, Shard(None, 0, 2), "31b")
    assert (nh, nkv, kv) == (16, 8, Slice(0, 0, 2))
    with pytest.raises(ShardError, match="layer 3: query heads: 6 is not divisible by 4 ranks"):
        head_slices(6, 2, Shard(None, 0, 4), "layer 3")
    with pytest.raises(ShardError, match="3 KV heads cannot be shared evenly by 4 ranks"):
        head_slices(12, 3, Shard(None, 0, 4), "layer 0")


def test_a_slice_that_does_not_divide_names_the_tensor():
    with pytest.raises(ShardError, match=r"x\.scales: axis 1 of size 33 is not divisible into 2 pieces"):
        Slice(-1, 0, 2).take(mx.zeros((4, 33)), "x.scales")


def test_the_sorted_kernel_runs_only_this_ranks_pairs(monkeypatch):
    """Expert parallel must split the work, not only the memory (Metal's prefill path)."""
    mx.random.seed(3)
    part = Experts(8, 16, 8)
    part.shard(Shard(None, 1, 2))  # experts 4..7
    idx = mx.array([[[0, 5], [6, 1], [2, 3]]])  # two of the six pairs are this rank's
    rows = []
    glu = Experts._glu
    monkeypatch.setattr(Experts, "_glu", lambda self, x, sel, s: rows.append(x.shape[0]) or glu(self, x, sel, s))
    monkeypatch.setattr(moe.ops, "moe_strategy", lambda nk, n, experts: "sorted")
    part(mx.ones((1, 3, 16)), mx.full((1, 3, 2), 0.5), idx)
    assert rows == [2]


def test_distributed_without_a_launcher_is_one_line():
    r = CliRunner().invoke(app, ["generate", "--model", "demo", "--prompt", "hi", "--distributed"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("error: --distributed: this is the only process;")
