"""Quantized KV caches (docs/kv-cache.md): every cache operation is exact on the
quantized entries (trim after the window wrapped, ragged roll, filter,
snapshot/restore, rows joining and leaving), attention over them equals attention
over their dequantized values, and decoding with them — speculative, batched, a
chat's later turns — gives what plain decoding with the same kv_bits gives."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_unflatten

import gemma4_mlx
from gemma4_mlx import ops, ops_quantized
from gemma4_mlx.batching import Job, Scheduler
from gemma4_mlx.batching import scheduler as scheduler_module
from gemma4_mlx.cache import KVCache, LayerCaches, SlidingKVCache, build_mask, disk, rows
from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.config import FULL, SLIDING, TextConfig
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.models.rope import RoPE
from gemma4_mlx.models.text import Attention, Model
from gemma4_mlx.runtime.generate import batch_generate, generate_tokens
from gemma4_mlx.speculative.loop import speculative_generate_tokens

from helpers.checkpoints import W, max_diff, random_ids
from helpers.mtp_pairs import PAIRS
from helpers.random_net import random_weights

BITS = [8, 4]


def same(a, b) -> bool:
    """Bit-identical buffers (float arrays or quantized triples)."""
    a, b = (x if isinstance(x, tuple) else (x,) for x in (a, b))
    return len(a) == len(b) and all(x.shape == y.shape and mx.array_equal(x, y).item() for x, y in zip(a, b))


def tail(buf, n: int):
    return kvs.slots(buf, kvs.length(buf) - n)


def row_state(cache, b: int):
    """Row b's valid retained K/V as a single unpadded row (`rows.take_row`)."""
    return rows.take_row(cache.snapshot(), b)["kv"]


def normal(shape, seed: int) -> mx.array:
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


# -- cache operations, on synthetic K/V ------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("D", [16, 256])  # 16: padded to one group of 32; 256: 4 groups of 64
@pytest.mark.parametrize("sliding", [True, False])
def test_every_cache_operation_is_exact_on_quantized_entries(bits, D, sliding):
    T = 24
    k, v = normal((2, 2, T, D), 0), normal((2, 2, T, D), 1)

    def make():
        return SlidingKVCache(W, 4, kv_bits=bits) if sliding else KVCache(kv_bits=bits)

    def direct(row: int, idx: list[int]):
        """A single-row cache fed exactly these slots of row `row` in one write."""
        c = make()
        c.update_and_fetch(k[row : row + 1, :, idx], v[row : row + 1, :, idx])
        return c

    # trim after the window wrapped: append 3, drop 2, decode one -> as if built directly
    c = make()
    c.update_and_fetch(k[:1, :, :14], v[:1, :, :14])
    c.update_and_fetch(k[:1, :, 14:17], v[:1, :, 14:17])
    c.trim(2)
    got = c.update_and_fetch(k[:1, :, 20:21], v[:1, :, 20:21])
    d = direct(0, list(range(15)) + [20])
    assert c.offset == d.offset == 16
    n = min(c.size, d.size)
    assert all(same(tail(x, n), tail(y, n)) for x, y in zip(c.state, d.state))
    assert same(tail(got[0], 1), kvs.encode(k[:1, :, 20:21], bits))  # each slot quantized on its own

    # ragged speculative commit over a batch of two rows (roll), then filter
    b = make()
    b.update_and_fetch(k[:, :, :14], v[:, :, :14])
    b.update_and_fetch(k[:, :, 14:18], v[:, :, 14:18])  # bonus + 3 drafts
    LayerCaches([b]).commit(accepted=[2, 0], drafted=3)  # row 0 keeps 3, row 1 keeps 1
    b.update_and_fetch(k[:, :, 20:21], v[:, :, 20:21])
    kept = {0: list(range(17)) + [20], 1: list(range(15)) + [20]}
    for r in (0, 1):
        want = direct(r, kept[r]).state
        have = row_state(b, r)
        n = min(kvs.length(have[0]), kvs.length(want[0]))
        assert n >= min(W - 1, len(kept[r]))
        assert all(same(tail(x, n), tail(y, n)) for x, y in zip(have, want)), r

    # snapshot / restore: a write after the snapshot leaves no trace
    snap = b.snapshot()
    b.update_and_fetch(k[:, :, 21:23], v[:, :, 21:23])
    b.restore(snap)
    b.update_and_fetch(k[:, :, 23:24], v[:, :, 23:24])
    b.filter([1])
    want = direct(1, kept[1] + [23]).state
    have = row_state(b, 0)
    n = min(kvs.length(have[0]), kvs.length(want[0]))
    assert all(same(tail(x, n), tail(y, n)) for x, y in zip(have, want))

    # rows joining (either side longer) and taken back out, and dropping dead slots
    long, short = direct(0, list(range(20))), direct(1, list(range(6)))
    joined = LayerCaches([make()])
    for one in (short, long):
        joined.join(LayerCaches([one]))
    for r, one in enumerate((short, long)):
        out = LayerCaches([make()])
        joined.take_row(r, out)
        assert out[0].offset == one.offset
        assert all(same(x, y) for x, y in zip(out[0].state, one.state)), r
    joined.filter([1])
    joined.compact(min_slots=1)
    assert all(same(x, y) for x, y in zip(row_state(joined[0], 0), long.state))


def test_float_caches_keep_float_state():
    c = KVCache()
    c.update_and_fetch(normal((1, 1, 3, 16), 0), normal((1, 1, 3, 16), 1))
    assert not isinstance(c.state[0], tuple) and c.kv_bits is None
    with pytest.raises(ValueError, match="kv_bits"):
        KVCache(kv_bits=3)


# -- quantized attention == attention over the dequantized entries ----------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d, window", [(256, 8), (512, None), (16, 4)])
def test_quantized_attention_equals_dequantized(bits, d, window):
    B, nh, kv, T, S = 2, 4, 2, 130, 150  # T >= 128: the blocked path, skipping key blocks
    q = normal((B, nh, T, d), 2) * d**-0.5  # scores O(1), as after the q/k norms of a trained model
    k, v = normal((B, kv, S, d), 3), normal((B, kv, S, d), 4)
    kq, vq = kvs.encode(k, bits), kvs.encode(v, bits)
    mask = build_mask(S - T, 0, T, window, mx.array([0, 7], mx.int32))
    want = ops.attention(q, kvs.decode(kq, d), kvs.decode(vq, d), mask)
    for t in (T, 1):  # prefill block, one decode query
        m = mask.last(t)
        got = kvs.attention(q[:, :, -t:], kq, vq, m)
        assert max_diff(got, want[:, :, -t:]) < 1e-5, t
    # and it is not the float attention: quantization changed the numbers
    assert max_diff(ops.attention(q, k, v, mask), want) > 1e-4


@pytest.fixture
def compare_attention(monkeypatch):
    """Every quantized attention call of a model also run over the dequantized
    entries; returns the per-call differences."""
    diffs = []
    inner = ops_quantized.quantized_attention

    def both(terms, v, mask):
        got = inner(terms, v, mask)
        # the score terms as one product: queries and dequantized keys side by side
        q = mx.concatenate([t[0] for t in terms], axis=-1)
        k = mx.concatenate([mx.dequantize(*t[1], group_size=t[2], bits=t[3]) for t in terms], axis=-1)
        values = mx.dequantize(*v[0], group_size=v[1], bits=v[2])
        diffs.append(max_diff(got, ops.attention(q, k, values, mask)))
        return got

    monkeypatch.setattr(ops_quantized, "quantized_attention", both)
    return diffs


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_model_and_drafter_attend_over_quantized_entries(pairs, name, bits, compare_attention):
    """Producers, KV-shared consumers and the drafter (through `draft_view`) all
    read the quantized entries; each call equals attention over their dequantized
    values (float32: per-call rounding only)."""
    target, drafter = pairs[name]
    cache = target.make_cache(max_rollback=64, kv_bits=bits)
    prompt = random_ids(3 * W + 2, seed=3)
    out = list(speculative_generate_tokens(target, drafter, prompt, cache=cache, max_tokens=6, draft_tokens=2))
    assert len(out) == 6
    layers = len(target.config.layer_types) + len(drafter.config.text.layer_types)
    assert len(compare_attention) > 2 * layers  # prefill, verify blocks and draft steps
    assert max(compare_attention) < 1e-5
    assert all(isinstance(c.state[0], tuple) for c in cache.writers())


# -- decoding ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_rollback_past_the_window_equals_the_cache_built_directly(pairs, name, bits):
    """Append k drafts, trim j, decode: logits and every quantized entry equal those
    of a quantized cache that only ever saw the committed sequence."""
    model, _ = pairs[name]
    ids = random_ids(3 * W + 2 + 4, seed=bits)
    prompt, drafts = ids[: 3 * W + 2], ids[3 * W + 2 :]
    for j in range(len(drafts) + 1):
        a = model.make_cache(max_rollback=8, kv_bits=bits)
        model(mx.array([prompt]), a)
        model(mx.array([drafts]), a)
        a.trim(j)
        got = model(mx.array([[7]]), a)[0, -1]
        b = model.make_cache(max_rollback=8, kv_bits=bits)
        model(mx.array([prompt]), b)
        if len(drafts) - j:
            model(mx.array([drafts[: len(drafts) - j]]), b)
        want = model(mx.array([[7]]), b)[0, -1]
        assert max_diff(got, want) < 1e-4, j
        new = len(drafts) - j + 1  # the newest entries: kept drafts and token 7; older: the prompt
        for ca, cb in zip(a.writers(), b.writers()):
            n = min(ca.size, cb.size)
            assert n >= min(W - 1, ca.offset)
            for x, y in zip(ca.state, cb.state):
                x, y = tail(x, n), tail(y, n)
                assert same(kvs.slots(x, 0, n - new), kvs.slots(y, 0, n - new)), j  # restored exactly
                assert within_a_step(kvs.slots(x, n - new), kvs.slots(y, n - new), bits), j


def within_a_step(a, b, bits: int) -> bool:
    """Entries that came from products of different row counts (a draft block of 4
    against the 4 - j drafts kept, and what attends to them): the BLAS may round a
    row differently by the block's height (OpenBLAS's small-matrix kernels on one
    AVX-512 machine do), so a value may land one quantization step away.  Any
    rollback error is far larger."""
    if not isinstance(a, tuple):
        return max_diff(a, b) < 1e-5
    group = a[0].shape[-1] * 32 // bits // a[1].shape[-1]
    da, db = (mx.dequantize(*t, group_size=group, bits=bits) for t in (a, b))
    step = mx.repeat(mx.maximum(mx.abs(a[1]), mx.abs(b[1])), group, axis=-1)  # MLX's scales may be negative
    return bool(mx.all(mx.abs(da - db) <= 1.01 * step + 1e-5).item())


def oracle(reference: list[int], every: int):
    """Draft override: the reference continuation, wrong at every `every`-th draft."""
    calls = [0]

    def override(rows_, index, drafts):
        out = []
        for n, d in zip(index, drafts):
            row = []
            for i in range(len(d)):
                calls[0] += 1
                want = reference[n + i] if n + i < len(reference) else d[i]
                row.append(want if calls[0] % every else (want + 1) % 256)
            out.append(row)
        return out

    return override


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_greedy_speculative_equals_plain_greedy(pairs, name, bits):
    target, drafter = pairs[name]
    prompt = random_ids(13, seed=20 + bits)
    plain = list(generate_tokens(target, prompt, max_tokens=16, cache=target.make_cache(kv_bits=bits)))
    for K in (2, 5):
        cache = target.make_cache(max_rollback=64, kv_bits=bits)
        spec = speculative_generate_tokens(
            target, drafter, prompt, cache=cache, max_tokens=16, draft_tokens=K, draft_override=oracle(plain, 3)
        )
        assert list(spec) == plain, K
        assert cache.offset == len(prompt) + len(plain) - 1  # exactly what plain decoding leaves


def alone(model, prompt, max_tokens, bits):
    return list(generate_tokens(model, prompt, max_tokens=max_tokens, cache=model.make_cache(kv_bits=bits)))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name", list(PAIRS))
def test_batched_rows_equal_each_alone(pairs, name, bits, monkeypatch):
    """A left-padded batch, and the continuous-batching scheduler with quantized
    caches: rows join (prefilled apart), decode plain and speculative rounds with
    ragged commits, leave; each equals its prompt decoded alone with the same kv_bits."""
    model, drafter = pairs[name]
    ps = [random_ids(n, seed=n + bits) for n in (5, 13, 3, 9, 17)]
    want = [alone(model, p, 10, bits) for p in ps]
    assert batch_generate(model, ps, max_tokens=10, kv_bits=bits) == want  # left-padded batch
    jobs = [Job(p, list(p), max_tokens=10) for p in ps]
    run(Scheduler(model, max_batch=3, prefill_chunk=5, kv_bits=bits), jobs)
    assert [j.out for j in jobs] == want

    ref, calls = {}, [0]

    def fake(drafter_, target, bonus, h, caches, K, mtp):
        """Each row's true continuation, wrong at every 4th draft: rows accept ragged counts."""
        out = []
        for job in sched.rows:
            r, n, row = ref[id(job)], len(job.out), []
            for i in range(K):
                calls[0] += 1
                want = r[n + i] if n + i < len(r) else 0
                row.append(want if calls[0] % 4 else (want + 1) % 256)
            out.append(row)
        return mx.array(out)

    monkeypatch.setattr(scheduler_module, "draft", fake)
    jobs = [Job(p, list(p), max_tokens=10) for p in ps]
    ref.update({id(j): w for j, w in zip(jobs, want)})
    sched = Scheduler(model, drafter=drafter, draft_tokens=3, max_batch=4, prefill_chunk=4, kv_bits=bits)
    run(sched, jobs)
    assert [j.out for j in jobs] == want
    assert sched.rounds < sum(map(len, want)) / 1.5  # drafts were accepted: rows rolled


def run(sched: Scheduler, jobs: list[Job]) -> None:
    pending = list(jobs)
    while pending or sched.busy:
        if pending:
            sched.add(pending.pop(0))
        sched.step()


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


def test_chat_turns_reuse_the_quantized_prefix(demo):
    model, tok = demo
    chat = Chat(model, tok, max_tokens=24, kv_bits=8)
    for q in ("What is the capital of France?", "What is 3 plus 4?", "Hello", "Add 12 and 9."):
        before = list(chat.cached)
        reply = chat.send(q)
        assert reply.text
        if before:
            assert chat.cached[: len(before)] == before and chat.prefilled_last < 30  # only the new turn
    assert all(isinstance(c.state[0], tuple) for c in chat.cache.writers())
    assert len(chat.cached) > model.config.sliding_window  # past the window
    # the reused cache equals a quantized cache fed the whole conversation at once
    probe = model(mx.array([[40]]), chat.cache)[0, -1]
    fresh = model.make_cache(kv_bits=8)
    want = model(mx.array([chat.cached + [40]]), fresh)[0, -1]
    assert max_diff(probe, want) < 1e-3


def test_generate_and_the_cli_take_kv_bits(demo):
    from typer.testing import CliRunner

    from gemma4_mlx.cli import app

    model, tok = demo
    q = "What is the capital of Japan?"
    text = gemma4_mlx.generate(model, tok, q, max_tokens=40, kv_bits=8)
    assert "Tokyo" in text and text == Chat(model, tok, kv_bits=8).send(q).text
    with pytest.raises(ValueError, match="kv_bits"):
        gemma4_mlx.generate(model, tok, q, kv_bits=5)
    base = ["generate", "-m", str(DEMO_MODEL), "-p", q, "-n", "12", "-q", "--draft-model", "none"]
    bad = CliRunner().invoke(app, [*base, "--kv-bits", "3"])
    assert bad.exit_code != 0 and "3 is not one of 16, 8, 4" in bad.output
    good = CliRunner().invoke(app, [*base, "--kv-bits", "4"])
    assert good.exit_code == 0, good.output


# -- K = V layers: keys stored once (docs/kv-cache.md §7) -------------------------------
def kv_layers_model() -> Model:
    """Two sliding layers and a K = V full layer at Gemma 4's real head dims (256, 512
    with proportional RoPE: 128 rotated dims), well-conditioned random weights."""
    spec = dict(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=3,
        layer_types=[SLIDING, SLIDING, FULL],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        attention_k_eq_v=True,
        sliding_window=16,
        intermediate_size=128,
        model_type="gemma4_text",
    )
    model = Model(TextConfig.from_dict(spec, "kv-layers"))
    model.update(tree_unflatten(random_weights(model, seed=5)))
    return model


@pytest.mark.parametrize("bits", BITS)
def test_k_eq_v_layers_store_only_the_rotated_key_dims(bits):
    model = kv_layers_model()
    cache = model.make_cache(kv_bits=bits)
    model(mx.array([random_ids(40, seed=1)]), cache)
    sliding, full = cache[0], cache[2]
    assert sliding.key_split is None and full.key_split.width == 128
    k, v = full.state
    assert kvs.nbytes(k) * 4 == kvs.nbytes(v)  # keys: 128 of 512 dims
    assert kvs.nbytes(sliding.state[0]) == kvs.nbytes(sliding.state[1])
    assert model.make_cache()[2].key_split is None  # a float cache keeps K and V whole


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("T", [5, 20, 130])  # verify-sized (quantized products); runs the CPU dequantizes
def test_split_key_attention_scores_the_unrotated_dims_from_the_values(bits, T):
    """q . K with K's unrotated dims read as w * V: equal to float attention over the
    key that definition gives, built from the dequantized entries."""
    d, S = 512, 150
    dims = RoPE(d, {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}).rotated_dims()
    assert dims == [*range(64), *range(256, 320)]
    w = mx.array(np.random.default_rng(6).uniform(0.5, 1.5, d).astype(np.float32))
    split = kvs.KeySplit(dims, w, d)
    q = normal((1, 4, T, d), 7) * d**-0.5
    keys, values = normal((1, 2, S, d), 8), normal((1, 2, S, d), 9)
    kq, vq = kvs.encode(split.keys(keys), bits), kvs.encode(values, bits)
    mask = build_mask(S - T, 0, T, None, None)
    got = kvs.attention(q, kvs.SplitKeys(kq, split), vq, mask)
    v_deq = kvs.decode(vq, d)
    k_def = v_deq * w  # unrotated dims: w * V ...
    k_def[..., split.dims] = kvs.decode(kq, 128)  # ... rotated dims: their own buffer
    assert max_diff(got, ops.attention(q, k_def, v_deq, mask)) < 1e-5


@pytest.mark.parametrize("bits", BITS)
def test_split_keys_cost_no_accuracy(bits, monkeypatch):
    """A model whose K = V layer keeps its keys once is as close to the float model
    as one keeping K and V whole (same bits), over a prompt past the window."""
    model = kv_layers_model()
    ids = mx.array([random_ids(60, seed=2)])
    want = model(ids, model.make_cache())

    def error() -> float:
        return max_diff(model(ids, model.make_cache(kv_bits=bits)), want)

    split = error()
    monkeypatch.setattr(Attention, "key_split", lambda self: None)
    whole = error()
    assert 0 < split < 1.5 * whole, (split, whole)


def test_split_keys_round_trip_through_a_cache_file(tmp_path, monkeypatch):
    """Saved and restored at real head dims (keys 128 wide, values 512): the next
    step's logits are identical (==); caches keeping keys whole refuse the file."""
    model = kv_layers_model()
    ids = random_ids(40, seed=3)
    cache = model.make_cache(kv_bits=8)
    model(mx.array([ids]), cache)
    disk.save(tmp_path / "c.kv", cache)
    tensors, meta = disk.read(tmp_path / "c.kv")
    back = model.make_cache(kv_bits=8)
    shapes = [(s.kv_heads, s.head_dim) for s in model.config.layers]
    disk.restore(tmp_path / "c.kv", tensors, meta, back, shapes)
    step = mx.array([[9]])
    assert mx.array_equal(model(step, back), model(step, cache)).item()
    monkeypatch.setattr(Attention, "key_split", lambda self: None)
    with pytest.raises(disk.CacheFileError, match=r"c.kv: layer 2: keys stored 128 rotated dims, .* keeps them whole"):
        disk.restore(tmp_path / "c.kv", tensors, meta, model.make_cache(kv_bits=8), shapes)
