"""Speculative decoding (MTP drafter) on the CPU: cost curves, a B x K grid, "auto".

Random-weight targets built in memory in float32 — one dense (31B-like: K = V full
layers, 5:1 sliding/full) and one MoE (26B-A4B-like: 64 experts top-8 plus the dense
branch, K = V) — each with a matching 4-layer drafter ([S, S, S, F], dense tied head,
the target's K/V heads and head dims, backbone_hidden_size = the target's hidden).
Method (docs/speculative.md §14 (§14.6: CPU verify cost)):

1. Cost curves first: t_verify(T) — one target forward over T tokens per row on a
   cache holding a real (ragged, > W) context, trimmed off again — and t_draft(B)
   per draft step.  MoE: the expert strategies of `ops.moe_strategy`, each forced.
2. Grid B x K with controlled acceptance: the real drafter runs (its cost is paid),
   then each draft token is replaced by the target's recorded greedy continuation
   with conditional probability a_j (the 26B profile of docs/speculative.md §14.2), else by a wrong token.
   The reference continuation is the same-batch non-speculative run (K = 0), which
   is also the timing baseline.  Every speculative output must equal it.
3. draft_tokens="auto" (the cost-aware `DraftPolicy`, learning from live rounds), same
   acceptance control, against plain decoding and the best fixed K: at the grid's
   length (32 tokens per row) and at `long_tokens` (256) per row, where a smaller
   grid of fixed K runs first (docs/speculative.md §12.2 states the targets).

Times are decode only (first token to last).  The prompt prefill of a given batch
is computed once and restored from a cache snapshot in every later run of that
batch (`speculative.prefill_hidden` is wrapped in this process only), so the
grid does not pay for the same prefill 20 times.

    make bench-spec   # or: python bench/bench_speculative.py [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from report import Report  # bench/report.py (the script's folder is on sys.path)

import gemma4_mlx.ops as ops
import gemma4_mlx.speculative.loop as spec
from gemma4_mlx.config import FULL, SLIDING, AssistantConfig, TextConfig
from gemma4_mlx.models.assistant import Drafter, check_pair
from gemma4_mlx.models.text import Model
from gemma4_mlx.runtime.generate import DEFAULT_PREFILL_CHUNK, generate_tokens
from gemma4_mlx.speculative.policy import DraftPolicy, expected_tokens

S, F = SLIDING, FULL

# Conditional acceptance per draft position (docs/speculative.md §14.2: 26B profile, then 0.7).
ACCEPT = [0.844, 0.71, 0.64, 0.70, 0.7, 0.7, 0.7]

# Reduced vocabulary: with hidden 1024 a 262144-row tied head would be ~57% of the
# dense target's bytes (real 31B: 4.5%, real 26B-A4B: ~19% of the active bytes) and
# the drafter/target cost ratio would be ~15%; 65536 keeps head and drafter shares
# near the real ones (and the run inside its time budget).
FULL_SETUP = dict(
    vocab=65536,
    window=128,
    prompt_lengths=[277, 143, 211, 104, 296, 168, 239, 122],
    max_tokens=32,
    batches=[1, 2, 4, 8],
    ks=[1, 2, 3, 5, 7],
    auto_batches=[1, 4, 8],
    long_tokens=256,  # the second auto table: generations of this many tokens per row
    long_ks=[1, 2, 3, 5],  # fixed K runs it is compared with
    curve_T=[1, 2, 4, 8, 16, 32, 64],
    moe_T=[1, 2, 4, 6, 8, 12, 16],
    reps=3,
    dense=dict(
        hidden_size=768,
        num_hidden_layers=12,
        layer_types=[S] * 5 + [F] + [S] * 5 + [F],
        num_attention_heads=8,
        num_key_value_heads=4,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=256,
        global_head_dim=512,
        intermediate_size=3072,
    ),
    moe=dict(
        hidden_size=768,
        num_hidden_layers=12,
        layer_types=[S] * 5 + [F] + [S] * 5 + [F],
        num_attention_heads=8,
        num_key_value_heads=4,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=256,
        global_head_dim=512,
        intermediate_size=768,
        enable_moe_block=True,
        num_experts=64,
        top_k_experts=8,
        moe_intermediate_size=256,
    ),
    drafter=dict(hidden_size=256, intermediate_size=2048, num_attention_heads=8),
)

QUICK_SETUP = dict(
    vocab=4096,
    window=32,
    prompt_lengths=[71, 45, 90, 38, 83, 52, 64, 41],
    max_tokens=12,
    batches=[1, 2, 4, 8],
    ks=[1, 2, 3, 5, 7],
    auto_batches=[1, 4, 8],
    long_tokens=48,
    long_ks=[1, 2, 3, 5],
    curve_T=[1, 2, 4, 8, 16, 32, 64],
    moe_T=[1, 2, 4, 8, 16],
    reps=1,
    dense=dict(
        hidden_size=128,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=32,
        global_head_dim=64,
        intermediate_size=256,
    ),
    moe=dict(
        hidden_size=128,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=32,
        global_head_dim=64,
        intermediate_size=128,
        enable_moe_block=True,
        num_experts=16,
        top_k_experts=4,
        moe_intermediate_size=64,
    ),
    drafter=dict(hidden_size=64, intermediate_size=256, num_attention_heads=4),
)


# --------------------------------------------------------------------------- models
def randomize(module, seed: int) -> None:
    """Random float32 weights as bench_text.py draws them (small q/k norms keep the
    random net non-chaotic; decisive routers)."""
    mx.random.seed(seed)
    new = []
    for key, value in tree_flatten(module.parameters()):
        if key.endswith("token_ordering"):
            continue
        if key.endswith(("q_norm.weight", "k_norm.weight")):
            v = (0.8 + 0.4 * mx.random.uniform(shape=value.shape)) * value.shape[0] ** -0.25
        elif key.endswith("router.proj.weight"):
            v = mx.random.normal(value.shape)
        elif key.endswith("norm.weight") or key.endswith(".scale") or key.endswith("per_expert_scale"):
            v = 0.8 + 0.4 * mx.random.uniform(shape=value.shape)
        elif key.endswith("layer_scalar"):
            v = 0.5 + 0.5 * mx.random.uniform(shape=value.shape)
        elif value.size > 1 << 20:  # uniform with the same std: 3x faster to draw
            v = (0.02 * 3**0.5) * (2 * mx.random.uniform(shape=value.shape) - 1)
        else:
            v = 0.02 * mx.random.normal(value.shape)
        v = v.astype(mx.float32)
        mx.eval(v)
        new.append((key, v))
    module.update(tree_unflatten(new))
    mx.eval(module.parameters())


def build_pair(kind: str, setup: dict, seed: int):
    W, V = setup["window"], setup["vocab"]
    t = dict(
        setup[kind],
        vocab_size=V,
        sliding_window=W,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=V,
        num_kv_shared_layers=0,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        model_type="gemma4_text",
    )
    tcfg = TextConfig.from_dict(t, f"{kind} target")
    target = Model(tcfg)
    randomize(target, seed)
    if ops.stack_projections():  # as `load_model` does: the products users run
        target.fuse()
    tt = setup[kind]
    d = dict(
        setup["drafter"],
        vocab_size=V,
        sliding_window=W,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_key_value_heads=tt["num_key_value_heads"],
        num_global_key_value_heads=tt["num_global_key_value_heads"],
        attention_k_eq_v=tt["attention_k_eq_v"],
        head_dim=tt["head_dim"],
        global_head_dim=tt["global_head_dim"],
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    dcfg = AssistantConfig.from_dict(
        {
            "model_type": "gemma4_assistant",
            "text_config": d,
            "backbone_hidden_size": tcfg.hidden_size,
            "use_ordered_embeddings": False,
        },
        f"{kind} drafter",
    )
    check_pair(dcfg, tcfg, f"{kind} drafter")
    drafter = Drafter(dcfg)
    randomize(drafter, seed + 1)
    if ops.stack_projections():  # as `load_drafter` does
        drafter.fuse()
    return target, drafter


def param_summary(target: Model, drafter: Drafter) -> str:
    cfg = target.config
    total = target.num_parameters()
    head = cfg.vocab_size * cfg.hidden_size
    line = f"{total / 1e6:.1f} M params (tied head/embedding {head / 1e6:.1f} M)"
    if cfg.enable_moe_block:
        experts = sum(v.size for k, v in tree_flatten(target.parameters()) if ".experts." in k)
        active = total - experts + experts * cfg.top_k_experts // cfg.num_experts
        line += f", experts {experts / 1e6:.1f} M, active per token {active / 1e6:.1f} M"
    dh = cfg.vocab_size * drafter.config.text.hidden_size
    line += f"; drafter {drafter.num_parameters() / 1e6:.1f} M (dense tied head {dh / 1e6:.1f} M)"
    return line


def shape_line(kind: str, setup: dict) -> str:
    t, d = setup[kind], setup["drafter"]
    s = (
        f"hidden {t['hidden_size']}, {t['num_hidden_layers']} layers "
        f"({''.join('F' if x == F else 'S' for x in t['layer_types'])}), {t['num_attention_heads']} q heads, "
        f"kv {t['num_key_value_heads']}x{t['head_dim']} sliding / {t['num_global_key_value_heads']}x"
        f"{t['global_head_dim']} full (K=V), MLP {t['intermediate_size']}"
    )
    if t.get("enable_moe_block"):
        s += f" + {t['num_experts']} experts top-{t['top_k_experts']} x {t['moe_intermediate_size']}"
    s += (
        f", vocab {setup['vocab']}, W {setup['window']}, softcap 30 | drafter: hidden "
        f"{d['hidden_size']}, 4 layers SSSF, {d['num_attention_heads']} q heads, MLP "
        f"{d['intermediate_size']}, dense tied head"
    )
    return s


# --------------------------------------------------------------------------- prefill memo
_orig_prefill = spec.prefill_hidden
_memo: dict = {}
prefill_seconds: dict = {}


def _memo_prefill(model, ids, caches, chunk=DEFAULT_PREFILL_CHUNK, media=None):
    """Compute a batch's prefill once; every run (the first too) restores the caches
    from a snapshot, then gives them buffers of their own (`_like_a_prefill`)."""
    if media is not None:  # text prompts only here
        raise ValueError("the speculative bench memoises text prompts only")
    key = (
        id(model),
        chunk,
        ids.shape,
        np.array(ids).tobytes(),
        tuple(getattr(c, "keep", -1) for c in caches if c is not None),
    )
    hit = _memo.get(key)
    if hit is None:
        t0 = time.perf_counter()
        logits, h = _orig_prefill(model, ids, caches, chunk)
        mx.eval(logits, h, [c.state for c in caches if c is not None])
        prefill_seconds[(id(model), ids.shape)] = time.perf_counter() - t0
        hit = _memo[key] = ([None if c is None else c.snapshot() for c in caches], logits, h)
    snaps, logits, h = hit
    for c, s in zip(caches, snaps):
        if c is not None:  # fresh array objects: nothing the run writes reaches the snapshot
            kv = None if s["kv"] is None else tuple(x[:] for x in s["kv"])
            c.restore(dict(s, kv=kv))
    _like_a_prefill(caches)
    return logits, h


def _like_a_prefill(caches):
    """Caches restored from a snapshot hold views of its buffers, full to the last slot:
    the run's first write would copy and regrow every one of them inside round 1's
    time (~25-60 ms on the dense target at B = 4; a real prefill leaves buffers of
    the cache's own with room to grow, and its first round is not dearer than the
    next).  One write and trim now does that copy before the clock starts."""
    for c in caches:  # the bench's caches: float K/V, rollback slack >= 32
        if c is not None and c.keys is not None and c.kv_bits is None:
            k, v = c.state
            c.update_and_fetch(mx.zeros_like(k[:, :, :1]), mx.zeros_like(v[:, :, :1]))
            c.trim(1)
    mx.eval([c.state for c in caches if c is not None])


spec.prefill_hidden = _memo_prefill


# --------------------------------------------------------------------------- cost curves
def median(xs):
    return float(np.median(xs))


def batch_caches(target, prompts, max_rollback=32):
    """Caches holding these (ragged, left-padded) prompts, built exactly as `speculate`
    builds them (with the default rollback slack the prefill goes through the memo,
    so the grid's runs reuse it)."""
    longest = max(len(p) for p in prompts)
    pads = [longest - len(p) for p in prompts]
    caches = target.make_cache(max_rollback=max_rollback, left_pad=pads if any(pads) else None)
    ids = mx.array([[0] * n + list(p) for n, p in zip(pads, prompts)])
    _, h = _memo_prefill(target, ids, caches, DEFAULT_PREFILL_CHUNK)
    mx.eval(h, [c.state for c in caches if c is not None])
    return caches, h


def time_verify(target, caches, B, T, reps, rng, repeated=False):
    """Median seconds of one verify forward of T tokens per row (logits, argmax and
    hiddens evaluated, as in a round); the block is trimmed off again."""
    V = target.config.vocab_size
    times = []
    for i in range(reps + 1):  # the first run warms up
        toks = rng.integers(3, V, (B, 1 if repeated else T))
        block = mx.array(np.repeat(toks, T, axis=1) if repeated else toks)
        t0 = time.perf_counter()
        logits, h = spec.verify(target, block, caches)
        mx.eval(mx.argmax(logits, axis=-1), h)
        dt = time.perf_counter() - t0
        caches.trim(T)
        if i:
            times.append(dt)
    return median(times)


def time_draft(target, drafter, caches, h, B, reps, rng, steps=4):
    """Median seconds per draft step (a `steps`-token draft, divided)."""
    V = target.config.vocab_size
    times = []
    for i in range(reps + 1):
        bonus = mx.array(rng.integers(3, V, (B,)))
        t0 = time.perf_counter()
        mx.eval(spec.draft(drafter, target, bonus, h, caches, steps, spec.MTPSettings()))
        dt = time.perf_counter() - t0
        if i:
            times.append(dt / steps)
    return median(times)


def cost_curves(name, target, drafter, setup, prompts, log):
    reps, rng = setup["reps"], np.random.default_rng(0)
    ks = [0] + setup["ks"]
    costs = {"verify": {}, "draft": {}}
    caches, h = batch_caches(target, prompts[:1], max_rollback=max(setup["curve_T"]))
    log(f"t_verify(T), one row, context {len(prompts[0])} tokens (> W), median of {reps}:")
    base = None
    cells = []
    for T in setup["curve_T"]:
        t = time_verify(target, caches, 1, T, reps, rng)
        base = base or t
        cells.append(f"T={T}: {1e3 * t:.1f} ms ({t / base:.2f}x)")
    for i in range(0, len(cells), 4):
        log("  " + " | ".join(cells[i : i + 4]))
    log(
        "t_verify(B rows x K+1 tokens) in ms (ratio to B x 1), contexts = the grid's ragged "
        "prompts; t_draft(B) per draft step in ms (ratio to t_verify(B x 1)):"
    )
    log(f"  {'B':>2} | " + " ".join(f"{'K+1=' + str(k + 1):>13}" for k in ks) + f" | {'t_draft':>14}")
    for B in setup["batches"]:
        caches, h = batch_caches(target, prompts[:B])
        row = []
        for k in ks:
            t = time_verify(target, caches, B, k + 1, reps, rng)
            costs["verify"][(B, k + 1)] = t
            row.append(f"{1e3 * t:7.1f} ({t / costs['verify'][(B, 1)]:.2f})")
        td = time_draft(target, drafter, caches, h, B, reps, rng)
        costs["draft"][B] = td
        log(
            f"  {B:>2} | "
            + " ".join(f"{c:>13}" for c in row)
            + f" | {1e3 * td:6.1f} ({td / costs['verify'][(B, 1)]:.2f})"
        )
    del caches
    return costs


def moe_strategies(target, setup, prompts, log):
    """t_verify(T) at B = 1 with each expert strategy forced (this process only)."""
    reps, rng = setup["reps"], np.random.default_rng(1)
    k, E = target.config.top_k_experts, target.config.num_experts
    caches, _ = batch_caches(target, prompts[:1])
    real = ops.moe_strategy
    names = ["gather", "segments", "sorted"]
    log(f"MoE expert strategy, t_verify(T) in ms, one row (pairs = T x {k}); default = ops.moe_strategy's pick:")
    log(f"  {'T':>3} {'pairs':>5} | " + " ".join(f"{n:>9}" for n in names) + " | default   | fastest")
    try:
        for T in setup["moe_T"]:
            res = {}
            for n in names:
                ops.moe_strategy = lambda pairs, tokens=1, experts=16, n=n: n
                res[n] = time_verify(target, caches, 1, T, reps, rng)
            ops.moe_strategy = real
            best = min(res, key=res.get)
            log(
                f"  {T:>3} {T * k:>5} | "
                + " ".join(f"{1e3 * res[n]:9.1f}" for n in names)
                + f" | {real(T * k, T, E):<9} | {best}"
                + (
                    ""
                    if best == real(T * k, T, E)
                    else f" ({res[real(T * k, T, E)] / res[best]:.2f}x faster than default)"
                )
            )
    finally:
        ops.moe_strategy = real
    # The auto policy profiles verify cost with the bonus token repeated K + 1 times;
    # identical tokens route to (nearly) the same experts.
    B = min(8, max(setup["batches"]))
    caches, _ = batch_caches(target, prompts[:B])
    a = time_verify(target, caches, B, 8, reps, rng)
    b = time_verify(target, caches, B, 8, reps, rng, repeated=True)
    log(
        f"  B={B} x 8 tokens: distinct tokens {1e3 * a:.1f} ms vs one token repeated (what "
        f"speculative.profile times) {1e3 * b:.1f} ms ({a / b:.2f}x)"
    )
    del caches


# --------------------------------------------------------------------------- runs
def controlled(reference, probs, seed, vocab):
    """Draft override: position j gets the reference token with conditional
    probability probs[j] (given all earlier ones were right), else a wrong token."""
    rng = random.Random(seed)

    def override(rows, index, drafts):
        out = []
        for r, n, d in zip(rows, index, drafts):
            ref, ok, new = reference[r], True, []
            for j in range(len(d)):
                if n + j >= len(ref):
                    new.append(d[j])
                    continue
                want = ref[n + j]
                ok = ok and rng.random() < probs[j]
                new.append(want if ok else (want + 1) % vocab)
            out.append(new)
        return out

    return override


_profile_time = [0.0]
_orig_profile = spec.profile


def _timed_profile(*a, **kw):
    t0 = time.perf_counter()
    _orig_profile(*a, **kw)
    _profile_time[0] += time.perf_counter() - t0


spec.profile = _timed_profile


def run(target, drafter, prompts, max_tokens, K, override=None, policy=None):
    """(outputs, decode seconds, decoded tokens, stats, policy-profile seconds)."""
    stats = spec.SpecStats()
    out = [[] for _ in prompts]
    _profile_time[0] = 0.0
    gen = spec.speculate(
        target,
        drafter,
        prompts,
        max_tokens=max_tokens,
        draft_tokens=K,
        policy=policy,
        stats=stats,
        draft_override=override,
    )
    t_first = None
    for r, toks in gen:
        if t_first is None:
            t_first = time.perf_counter()
        out[r].extend(toks)
    t_end = time.perf_counter()
    decoded = sum(len(o) for o in out) - len(prompts)
    return out, t_end - t_first, decoded, stats, _profile_time[0]


RUNS = 2  # runs per timed cell (--runs); each cell keeps its fastest


def fastest(make_run, runs: int | None = None):
    """The fastest of `runs` calls of make_run() (a `run` tuple, extras allowed after it):
    contention on a shared machine only slows a run, so every compared cell gets the
    same number of tries.  Their outputs must agree."""
    return fastest_of([make_run() for _ in range(runs or RUNS)])


def fastest_of(tries: list):
    """The fastest of a cell's `run` tuples; their outputs must agree."""
    assert all(t[0] == tries[0][0] for t in tries), "runs of one cell gave different outputs"
    return min(tries, key=lambda t: t[1])


def predict(costs, B, K, e):
    tv = costs["verify"]
    return e * tv[(B, 1)] / (K * costs["draft"][B] + tv[(B, K + 1)])


def predict_k(costs, B, K):
    """The cost tables' speed-up for K drafts at the controlled acceptance (K = 0: 1)."""
    return predict(costs, B, K, expected_tokens(ACCEPT[:K])) if K else 1.0


def grid(name, target, drafter, setup, prompts, costs, log):
    V, M = target.config.vocab_size, setup["max_tokens"]
    ks = setup["ks"]
    log(
        f"Grid ({name}): controlled acceptance a_j = {', '.join(map(str, ACCEPT[: max(ks)]))}; "
        f"{M} tokens per row ({M - 1} decoded); decode-only times"
    )
    log(
        "  a_j: conditional acceptance measured (SpecStats.acceptance(): draft j accepted given drafts < j were); "
        "pred = E[A+1] t_v(B,1) / (K t_d(B) + t_v(B,K+1)) from the tables above, pred@meas with the "
        "measured tok/round"
    )
    log(
        f"  {'B':>2} {'K':>2} | {'tok/round':>9} {'E[A+1]':>6} | {'a_j measured, j = 1..K':<34} | "
        f"{'tok/s':>6} {'speed-up':>8} {'pred':>5} {'pred@meas':>9} | "
        f"{'draft':>6} {'verify':>6} {'other':>6} ms/round | lossless"
    )
    results, baselines, base, all_same = {}, {}, {}, True
    for B in setup["batches"]:
        ps = prompts[:B]
        ref, dt, n, st, _ = fastest(lambda: run(target, drafter, ps, M, 0), max(2, RUNS))
        baselines[B] = ref
        base_tps = n / dt
        log(
            f"  {B:>2} {0:>2} | {'baseline':>9} {'':>6} | {'(same batch, K = 0)':<34} | "
            f"{base_tps:6.2f} {'1.00':>8} {'':>5} {'':>9} | {'':>6} {1e3 * st.verify_time / st.rounds:6.1f} "
            f"{1e3 * (dt - st.draft_time - st.verify_time) / st.rounds:6.1f} ms/round | "
            f"prefill {prefill_seconds.get((id(target), (B, max(map(len, ps)))), 0):.1f} s (once)"
        )
        for K in ks:
            out, dt, n, st, _ = fastest(
                lambda: run(target, drafter, ps, M, K, override=controlled(ref, ACCEPT, 1000 * B + K, V))
            )
            same = out == ref
            all_same &= same
            diff = sum(o != r for o, r in zip(out, ref))
            e = expected_tokens(ACCEPT[:K])
            tps = n / dt
            results[(B, K)] = tps / base_tps
            acc = " ".join(f"{a:.2f}" for a in st.acceptance())
            log(
                f"  {B:>2} {K:>2} | {st.tokens_per_round:9.2f} {e:6.2f} | {acc:<34} | {tps:6.2f} "
                f"{tps / base_tps:8.2f} {predict(costs, B, K, e):5.2f} "
                f"{predict(costs, B, K, st.tokens_per_round):9.2f} | "
                f"{1e3 * st.draft_time / st.rounds:6.1f} {1e3 * st.verify_time / st.rounds:6.1f} "
                f"{1e3 * (dt - st.draft_time - st.verify_time) / st.rounds:6.1f} ms/round | "
                f"{'yes' if same else f'NO ({diff} rows differ)'}"
            )
        results[(B, 0)] = 1.0
        base[B] = (base_tps, ref)
    log(f"  every speculative output == its same-batch baseline (greedy lossless): {all_same}")
    # Batch invariance of the plain decode: row i must not depend on its batch-mates.
    per_row = {}
    for B in setup["batches"]:
        for i in range(B):
            per_row.setdefault(i, []).append(baselines[B][i])
    flips = sum(any(o != outs[0] for o in outs) for outs in per_row.values())
    log(
        f"  baselines across batch sizes: each row's output is the same in every batch it is in: "
        f"{flips == 0} ({flips} of {len(per_row)} rows differ; near-tie numerics if any)"
    )
    # The prefill memo must be invisible: plain decoding without it gives the same tokens.
    plain = list(generate_tokens(target, prompts[0], max_tokens=M))
    log(
        f"  B=1 baseline == generate_tokens (own prefill, no memo, no speculate): "
        f"{plain == baselines[min(setup['batches'])][0]}"
    )
    all_same &= plain == baselines[min(setup["batches"])][0]
    return results, base, all_same


def long_grid(name, target, drafter, setup, prompts, log, M=None, ks=None):
    """Plain, fixed-K and auto runs of M (default `long_tokens`) per row for the auto table (no
    cost model columns: the grid above has them), interleaved: each of the runs goes
    plain, K = 1.., auto in turn and every cell keeps its fastest, so that this
    machine's drift (10-20 % over minutes) falls on all of them alike.  Run one
    after the other, a cell measured in a slow minute made auto look 0.85x the best
    K where interleaved runs of the same cell gave 0.95-1.01x (docs/speculative.md §12.2).
    Returns (speed-ups, plain baselines, auto runs per B, all lossless)."""
    V, M, ks = target.config.vocab_size, M or setup["long_tokens"], ks or setup["long_ks"]
    log(
        f"Fixed K at {M} tokens per row ({name}), controlled acceptance as in the grid, interleaved with "
        f"plain and auto runs ({max(2, RUNS)} of each); speed-up vs K = 0:"
    )
    results, base, autos, ok = {}, {}, {}, True
    for B in setup["auto_batches"]:
        ps = prompts[:B]
        tries: dict = {}
        for _ in range(max(2, RUNS)):
            tries.setdefault(0, []).append(run(target, drafter, ps, M, 0))
            ref = tries[0][0][0]
            for K in ks:
                override = controlled(ref, ACCEPT, 2000 * B + K, V)
                tries.setdefault(K, []).append(run(target, drafter, ps, M, K, override=override))
            tries.setdefault("auto", []).append(_auto_run(target, drafter, ps, M, ref, B, V))
        best = {k: fastest_of(ts) for k, ts in tries.items()}
        base[B] = (best[0][2] / best[0][1], ref)
        cells = []
        for K in ks:
            out, dt, n = best[K][:3]
            ok &= out == ref
            results[(B, K)] = n / dt / base[B][0]
            cells.append(f"K={K}: {results[(B, K)]:.2f}{'' if out == ref else ' (NOT lossless)'}")
        results[(B, 0)] = 1.0
        autos[B] = best["auto"]
        log(f"  B={B}: plain {base[B][0]:.2f} tok/s | " + " | ".join(cells))
    return results, base, autos, ok


def _auto_run(target, drafter, ps, M, ref, B, V):
    """One generation with a fresh "auto" policy: a `run` tuple plus the policy."""
    policy = DraftPolicy(k_max=7)
    override = controlled(ref, ACCEPT, 77 + B + M, V)
    return (*run(target, drafter, ps, M, "auto", override=override, policy=policy), policy)


def auto_runs(name, target, drafter, setup, prompts, costs, results, base, log, max_tokens, ks, autos=None):
    """draft_tokens="auto" against plain (same batch) and the best fixed K in `ks`;
    autos: auto runs per B already made (`long_grid`), else they run here."""
    V, M = target.config.vocab_size, max_tokens
    log(
        f'draft_tokens="auto" ({name}, {M} tokens per row): DraftPolicy(k_max=7) learns costs and '
        f"acceptance from its own rounds (no start-up profile; any profile time is inside the decode time)"
    )
    log(
        f"  {'B':>2} | {'K used (rounds)':<30} | {'tok/round':>9} | {'auto/plain':>10} | "
        f"{'best fixed K':>12} {'its speed-up':>12} | {'auto/best':>9} | {'model K*':>8} | lossless"
    )
    ok_all = True
    for B in setup["auto_batches"]:
        ps = prompts[:B]
        base_tps, ref = base[B]  # the same-batch plain baseline

        if autos is not None:
            out, dt, n, st, prof, policy = autos[B]
        else:
            out, dt, n, st, prof, policy = fastest(lambda: _auto_run(target, drafter, ps, M, ref, B, V))
        ok_all &= out == ref
        used = ", ".join(f"{k}:{c}" for k, c in sorted(st.k_used.items()))
        best = max((k for k in [0] + ks if (B, k) in results), key=lambda k: results[(B, k)])
        speed = n / dt / base_tps
        # What the cost model picks from this bench's own cost table and the true profile.
        model_k = "-" if costs is None else max([0] + setup["ks"], key=lambda k: predict_k(costs, B, k))
        log(
            f"  {B:>2} | {used:<30} | {st.tokens_per_round:9.2f} | {speed:10.2f} | {best:>12} "
            f"{results[(B, best)]:12.2f} | {speed / results[(B, best)]:9.2f} | {model_k:>8} | "
            f"{'yes' if out == ref else 'NO'}{f' (profile {prof:.1f} s)' if prof else ''}"
        )
        pv = ", ".join(f"T={T}: {1e3 * t:.0f}" for T, t in sorted(policy.verify_time.items()))
        td = ", ".join(f"B={b}: {1e3 * t:.1f}" for b, t in sorted(policy.draft_time.items()))
        log(
            f"       policy's t_verify (ms) {pv}; t_draft {td} ms; "
            f"learned a_j {' '.join(f'{a:.2f}' for a in policy.acceptance)}"
        )
    return ok_all


# --------------------------------------------------------------------------- main
def main():
    global RUNS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run in < 1 min")
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument(
        "--runs",
        type=int,
        default=RUNS,
        help="runs per timed cell; each keeps its fastest (plain baselines: >= 2)",
    )
    ap.add_argument("--targets", nargs="*", default=["dense", "moe"])
    ap.add_argument("--no-long", action="store_true", help="skip the long_tokens (256 per row) auto table")
    ap.add_argument(
        "--long-only",
        action="store_true",
        help="only the long_tokens table: fixed K, plain and auto interleaved (no cost curves or grid)",
    )
    ap.add_argument(
        "--short-only",
        action="store_true",
        help="only the max_tokens (32 per row) auto table, interleaved as --long-only's (no cost curves or grid)",
    )
    ap.add_argument(
        "--batches",
        nargs="+",
        type=int,
        help="only these batch sizes in the cost table, grid and auto tables (single cells, e.g. "
        "--targets dense --batches 8 --no-long); the MoE expert strategy table is skipped",
    )
    args = ap.parse_args()
    RUNS = max(1, args.runs)
    setup = QUICK_SETUP if args.quick else FULL_SETUP
    if args.batches:
        setup = dict(setup, batches=args.batches, auto_batches=args.batches)
    log = Report(args.out)
    t_start = time.perf_counter()
    rng = random.Random(0)
    V = setup["vocab"]
    prompts = [[2] + [rng.randrange(3, V) for _ in range(n - 1)] for n in setup["prompt_lengths"]]

    log(f"gemma4-mlx speculative decoding benchmark{' (--quick)' if args.quick else ''}")
    log(
        f"mlx {mx.__version__}, device {mx.default_device()}, BLAS "
        f"{gemma4_mlx._blas.describe()}, float32 (target and drafter), "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"python {sys.version.split()[0]}"
    )
    log(
        f"load average at start {os.getloadavg()[0]:.2f} (compare with the end): on a shared machine "
        f"other processes slow single runs, OpenBLAS threads badly so (every timed cell the fastest of "
        f"{RUNS} runs, plain baselines of {max(2, RUNS)}; cost curves medians of {setup['reps']})"
    )
    log(
        f"prompts: {len(prompts)} ragged lengths {setup['prompt_lengths']} (> W = {setup['window']}: "
        f"sliding windows wrap and roll back); batch B uses the first B; greedy"
    )
    log(
        f"vocab {V} (reduced from 262144: see FULL_SETUP); random weights (random routers = "
        f"uniform routing, the worst case for distinct experts per verify block)"
    )
    ok = True
    for i, name in enumerate(args.targets):
        t0 = time.perf_counter()
        target, drafter = build_pair(name, setup, seed=10 * i)
        log("")
        log("=" * 100)
        log(f"{name} target: {shape_line(name, setup)}")
        log(f"  {param_summary(target, drafter)}; built in {time.perf_counter() - t0:.1f} s")
        # warm-up (discarded): plain and speculative, batched, short
        run(target, drafter, prompts[:2], 6, 0)
        run(target, drafter, prompts[:2], 6, 3)
        costs = None
        if args.short_only:
            log("")
            M, ks = setup["max_tokens"], setup["ks"]
            short_results, short_base, autos, same = long_grid(name, target, drafter, setup, prompts, log, M, ks)
            ok &= same
            ok &= auto_runs(name, target, drafter, setup, prompts, costs, short_results, short_base, log, M, ks, autos)
        elif not args.long_only:
            log("")
            costs = cost_curves(name, target, drafter, setup, prompts, log)
            if target.config.enable_moe_block and not args.batches:
                log("")
                moe_strategies(target, setup, prompts, log)
            log("")
            results, base, same = grid(name, target, drafter, setup, prompts, costs, log)
            log("")
            ok &= same
            M, ks = setup["max_tokens"], setup["ks"]
            ok &= auto_runs(name, target, drafter, setup, prompts, costs, results, base, log, M, ks)
        if not (args.no_long or args.short_only):
            log("")
            long_results, long_base, autos, same = long_grid(name, target, drafter, setup, prompts, log)
            ok &= same
            M, ks = setup["long_tokens"], setup["long_ks"]
            ok &= auto_runs(name, target, drafter, setup, prompts, costs, long_results, long_base, log, M, ks, autos)
        log(f"({name}: {time.perf_counter() - t0:.0f} s)")
        del target, drafter
        _memo.clear()
        mx.clear_cache()
    log("")
    log(
        f"all speculative outputs lossless: {ok}; total {time.perf_counter() - t_start:.0f} s; "
        f"load average at end {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
