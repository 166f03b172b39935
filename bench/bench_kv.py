"""Quantized KV caches (docs/kv-cache.md): memory, quality and decode speed at 16 / 8 / 4 bits.

1. bytes   KV cache bytes at 8K / 32K / 128K / 256K tokens for every released
           variant (`presets.PRESETS`, real layer shapes), from the same layout the
           cache uses (`cache.quantized.layout`); checked against a real cache's
           nbytes on a shortened copy of each variant; then the longest context
           each variant, weight format and KV width fits on a 16 / 24 / 32 / 64 GB Mac.
2. quality teacher-forced next-token agreement with the 16-bit cache and
           perplexity change over >= 2,000 tokens of context, on the embedded demo
           model (a trained, non-chaotic model) and on random weights with small
           q/k norms (bench-style, real head dims).
3. speed   decode tokens/s at 8K and 32K context on the E2B shape (every layer,
           vocabulary cut; caches filled with random entries), 16 vs 8 vs 4 bits
           (--quick: 2K context, a 12-layer random model with the real head dims).
4. prefill peak MLX memory of a 32K-token chunked prefill (4K and the E2B shape
           only with --quick) on 2-layer models with each variant's real layer
           shapes (vocabulary cut to 8,192), split into weights, KV cache, rest.

    python bench/bench_kv.py [--quick] [--dtype bfloat16] [--skip bytes quality speed prefill]
                             [--prefill-variants e2b 31b] [--prefill-chunk 512] [--prefill-bits 16 8]
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from gemma4_mlx.cache import KVCache, LayerCaches
from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.config import FULL, SLIDING, TextConfig
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.demo.corpus import corpus
from gemma4_mlx.models.rope import RoPE
from gemma4_mlx.models.text import Model
from gemma4_mlx.presets import PRESETS, preset
from gemma4_mlx.prompt.template import render
from gemma4_mlx.runtime.generate import DEFAULT_PREFILL_CHUNK, prefill

CONTEXTS = [8192, 32768, 131072, 262144]
BITS = [16, 8, 4]
ROLLBACK = 32  # make_cache's default sliding slack (a Chat keeps 2048: +2016 sliding slots)


# -- 1. bytes ---------------------------------------------------------------------------
def slot_bytes(width: int, kv_heads: int, bits: int, float_bytes: int = 2) -> int:
    """Bytes of one slot's K or V (`width` values per head) in one layer: codes + scales
    + biases (scales and biases in the model's dtype, bf16 for released checkpoints)."""
    if bits == 16:
        return kv_heads * width * float_bytes
    group, padded = kvs.layout(width)
    return kv_heads * (padded * bits // 8 + 2 * (padded // group) * float_bytes)


def key_width(cfg: TextConfig, s, bits: int) -> int:
    """Values per head a layer's cached keys hold: a quantized K = V layer keeps only the
    dims RoPE rotates (docs/kv-cache.md §7)."""
    if bits == 16 or not s.k_eq_v:
        return s.head_dim
    return len(RoPE(s.head_dim, cfg.rope_for(s.type)).rotated_dims())


def kv_bytes(cfg: TextConfig, ctx: int, bits: int, rollback: int = ROLLBACK) -> int:
    """Retained K and V bytes of every cache-owning layer after `ctx` tokens."""
    total = 0
    for s in cfg.layers[: cfg.first_shared]:
        kept = ctx if s.type == FULL else min(ctx, cfg.sliding_window - 1 + rollback)
        total += kept * (
            slot_bytes(key_width(cfg, s, bits), s.kv_heads, bits) + slot_bytes(s.head_dim, s.kv_heads, bits)
        )
    return total


def check_accounting(name: str, bits: int, ctx: int = 1500) -> None:
    """kv_bytes against a real cache's retained bytes (bf16) on a 6-layer copy of the
    variant: the model's own `make_cache` (split K = V keys included); the model is
    never evaluated (lazy weights), only its caches are written."""
    spec = dict(PRESETS[name], num_hidden_layers=6, layer_types=[SLIDING] * 5 + [FULL], num_kv_shared_layers=0)
    spec.update(sliding_window=64)
    small = TextConfig.from_dict(spec, name)
    caches = Model(small).make_cache(max_rollback=ROLLBACK, kv_bits=bits)
    for c, s in zip(caches, small.layers):
        for _ in range(0, ctx, 500):
            x = mx.random.normal((1, s.kv_heads, 500, s.head_dim)).astype(mx.bfloat16)
            c.update_and_fetch(x, x)
    real = sum(kvs.nbytes(k) + kvs.nbytes(v) for k, v in caches.state)
    want = kv_bytes(small, ctx, bits)
    assert real == want, (name, bits, real, want)


def table_bytes() -> None:
    print("\n## KV cache bytes (bf16 scales/biases, group 64 along the head dim, sliding slack 32)\n")
    print("| variant | bits | " + " | ".join(f"{c // 1024}K" for c in CONTEXTS) + " | vs 16 bit at 128K |")
    print("|---|---|" + "---|" * len(CONTEXTS) + "---|")
    for name in PRESETS:
        cfg = preset(name)
        base = kv_bytes(cfg, 131072, 16)
        for bits in BITS:
            if bits != 16:
                check_accounting(name, bits)
            row = [kv_bytes(cfg, c, bits) / 2**30 for c in CONTEXTS]
            mark = ["" if c <= cfg.max_position_embeddings else "*" for c in CONTEXTS]
            cells = " | ".join(f"{g:.2f} GiB{m}" for g, m in zip(row, mark))
            print(f"| {name} | {bits} | {cells} | {kv_bytes(cfg, 131072, bits) / base:.3f} |")
    print("\n(* beyond the variant's max_position_embeddings; accounting checked against real caches)")


# Bits per weight of each checkpoint format: bf16; SFP8 (one byte, a per-tensor scale);
# MLX affine 8 / 4-bit with group 64 (a bf16 scale and bias per group); Q4_0 (18 bytes per 32).
WEIGHT_FORMATS = {"bf16": 16.0, "sfp8": 8.0, "mlx 8-bit": 8.5, "q4_0 / mlx 4-bit": 4.5}
MACS = [16, 24, 32, 64]  # "GB" of unified memory, as Apple sells it: GiB
# The share of a Mac's memory a model may take: an assumption (macOS and the apps beside
# the model keep the rest; GPU memory is wired up to a default limit of about this share)
USABLE = 0.70
ACTIVATIONS = 2**30  # a chunked prefill's activations (measured near 1 GiB at 32K, section 4)


def weight_bytes(name: str, fmt: str) -> int:
    """Resident weight bytes of a variant (text decoder) in a format; an unquantized PLE
    table stays memory-mapped in its file (`checkpoint.load.map_ple_table`)."""
    total = 0
    for key, value in tree_flatten(Model(preset(name)).parameters()):  # lazy: nothing allocated
        if fmt == "bf16" and "embed_tokens_per_layer" in key:
            continue
        total += value.size
    return int(total * WEIGHT_FORMATS[fmt] / 8)


def table_fits() -> None:
    """The longest context (of CONTEXTS) each variant, weight format and KV width fits
    on a Mac of each size: weights + KV + activations within USABLE of its memory."""
    print(f"\n## Fits on a Mac: longest context with weights + KV + 1 GiB activations <= {USABLE:.0%} of memory\n")
    print("| variant | weights | weight GiB | kv bits | " + " | ".join(f"{m} GB Mac" for m in MACS) + " |")
    print("|---|---|---|---|" + "---|" * len(MACS))
    for name in PRESETS:
        cfg = preset(name)
        contexts = [c for c in CONTEXTS if c <= cfg.max_position_embeddings]
        for fmt in WEIGHT_FORMATS:
            w = weight_bytes(name, fmt)
            for bits in BITS:
                cells = []
                for mac in MACS:
                    room = USABLE * mac * 2**30 - w - ACTIVATIONS
                    fit = [c for c in contexts if kv_bytes(cfg, c, bits) <= room]
                    cells.append(f"{fit[-1] // 1024}K" if fit else ("—" if room < 0 else "< 8K"))
                print(f"| {name} | {fmt} | {w / 2**30:.1f} | {bits} | " + " | ".join(cells) + " |")
    print(
        "\n(— : the weights alone do not fit; < 8K: they fit, 8K of context does not. E2B / E4B "
        "in bf16 keep their PLE table memory-mapped (not counted); the other formats count it at their bits. "
        "Sliding slack 32 tokens (generate's); a Chat's 2,048 add up to 1.5 GiB (31B, bf16), see slack in `info`)"
    )


# -- 2. quality -------------------------------------------------------------------------
def demo_sequence(tokenizer, n_tokens: int) -> list[int]:
    """One long conversation of the demo corpus' question/answer turns."""
    messages = []
    for conv in corpus(400, seed=7):
        if conv["tools"] is None:
            messages += [m for m in conv["messages"] if m["role"] in ("user", "assistant")]
        ids = tokenizer.encode(render(messages, add_generation_prompt=False), add_special_tokens=False)
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise RuntimeError("corpus too short")


def teacher_forced(model, ids: list[int], bits: int, chunk: int, full_only: bool = False) -> mx.array:
    """Log-probabilities [T, V] of every position, fed through a cache in chunks (as a
    prefill is): each chunk attends over the (quantized) entries of all before it.
    full_only: only the full-attention layers quantized, K and V whole, the sliding
    layers keeping float entries — the scheme issue #17 describes for mlx-vlm (not
    installed here to check against)."""
    cache = model.make_cache(kv_bits=None if full_only else bits)
    if full_only:
        for i, c in enumerate(cache):
            if c is not None and c.window is None:
                cache[i] = KVCache(kv_bits=bits)  # K and V whole
    outs = []
    for a in range(0, len(ids), chunk):
        logits = model(mx.array([ids[a : a + chunk]]), cache)[0].astype(mx.float32)
        outs.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        mx.eval(outs[-1])
    return mx.concatenate(outs)


def quality(model, ids: list[int], label: str, chunk: int) -> None:
    nxt = mx.array(ids[1:])
    ref = teacher_forced(model, ids, 16, chunk)[:-1]
    ref_nll = -mx.take_along_axis(ref, nxt[:, None], axis=1)[:, 0]
    ref_top = mx.argmax(ref, axis=-1)
    half = len(ids) // 2
    runs = [(bits, False) for bits in BITS] + [(bits, True) for bits in BITS if bits != 16]
    for bits, full_only in runs:
        lp = teacher_forced(model, ids, bits, chunk, full_only)[:-1]
        nll = -mx.take_along_axis(lp, nxt[:, None], axis=1)[:, 0]
        agree = (mx.argmax(lp, axis=-1) == ref_top).astype(mx.float32)
        ppl, ppl_ref = math.exp(mx.mean(nll).item()), math.exp(mx.mean(ref_nll).item())
        late = math.exp(mx.mean(nll[half:]).item()) / math.exp(mx.mean(ref_nll[half:]).item()) - 1
        kl = mx.mean(mx.sum(mx.exp(ref) * (ref - lp), axis=-1)).item()
        scheme = f"{bits}, full layers only" if full_only else str(bits)
        print(
            f"| {label} | {len(ids)} | {scheme} | {ppl:.4f} | {100 * (ppl / ppl_ref - 1):+.3f} % | "
            f"{100 * late:+.3f} % | {100 * mx.mean(agree).item():.2f} % | "
            f"{100 * mx.mean(agree[half:]).item():.2f} % | {kl:.2e} |",
            flush=True,
        )


def random_model(dtype, layers: int = 6, vocab: int = 4096, seed: int = 0) -> Model:
    """Small shape, real head dims (256 sliding / 512 full), GQA; q/k norms scaled by
    d^-1/4 so that scores are O(1) as in a trained model (not a chaotic one)."""
    spec = dict(
        vocab_size=vocab,
        hidden_size=512,
        num_hidden_layers=layers,
        layer_types=([SLIDING] * 5 + [FULL]) * (layers // 6),
        num_attention_heads=8,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        attention_k_eq_v=True,
        sliding_window=512,
        intermediate_size=1024,
        final_logit_softcapping=30.0,
        model_type="gemma4_text",
        max_position_embeddings=262144,
    )
    return random_weights(Model(TextConfig.from_dict(spec, "random")), dtype, seed)


def table_quality(n_tokens: int, dtype, chunk: int) -> None:
    print(f"\n## Quality: teacher-forced over {n_tokens} tokens, cache fed in chunks of {chunk}\n")
    print("| model | tokens | bits | perplexity | vs 16 bit | 2nd half vs 16 bit | top-1 agreement | 2nd half | KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    demo, tok = gemma4_mlx.load(DEMO_MODEL)
    quality(demo, demo_sequence(tok, n_tokens), "demo (trained)", chunk)
    rng = np.random.default_rng(0)
    rnd = random_model(dtype)
    # random weights know no language: random tokens still measure how far the
    # quantized cache moves the distribution (perplexity change, top-1 agreement, KL)
    quality(rnd, rng.integers(0, 4096, size=n_tokens).tolist(), f"random {dtype}", chunk)


# -- 3. speed ---------------------------------------------------------------------------
def fill_synthetic(model: Model, cache: LayerCaches, ctx: int, dtype, chunk: int = 2048) -> None:
    """Write ctx tokens of random K/V into every cache-owning layer, as a prefill
    would (quantized on the way in at kv_bits < 16), without running the model:
    decode speed depends on how much cache a step reads, not on its values."""
    for i, c in enumerate(cache):
        if c is None:
            continue
        a = model.layers[i].self_attn
        for done in range(0, ctx, chunk):
            n = min(chunk, ctx - done)
            k, v = (mx.random.normal((1, a.n_kv, n, a.head_dim)).astype(dtype) for _ in range(2))
            mx.eval(c.update_and_fetch(k, v))


def decode_speed(variant: str | None, contexts: list[int], n: int, dtype) -> None:
    """Median decode step at each context length for 16 / 8 / 4-bit caches: on the
    variant's real shape (every layer, vocabulary cut to 8,192), or with variant None
    the 12-layer random model (--quick)."""
    what = f"the {variant} shape (all layers, vocabulary 8,192)" if variant else "a 12-layer random model"
    print(f"\n## Decode with 16 / 8 / 4-bit KV caches ({dtype}, {what}, random weights)\n")
    print("| context | cache | KV bytes | decode tok/s (median step) | ms/token | vs unquantized |")
    print("|---|---|---|---|---|---|")
    model = full_model(variant, dtype) if variant else random_model(dtype, layers=12)
    for ctx in contexts:
        base = None
        for bits in BITS:
            cache = model.make_cache(kv_bits=bits)
            fill_synthetic(model, cache, ctx, dtype)
            tok = mx.array([[5]])
            mx.eval(model(tok, cache))  # warm-up
            times = []
            for _ in range(n):
                t = time.perf_counter()
                out = model(tok, cache)
                tok = mx.argmax(out[:, -1:], axis=-1)
                mx.eval(tok)
                times.append(time.perf_counter() - t)
            dt = float(np.median(times))  # the median step: robust to a loaded machine's spikes
            base = base or dt
            nbytes = sum(c.nbytes for c in cache.writers())
            label = f"unquantized ({str(dtype).split('.')[-1]})" if bits == 16 else f"{bits}-bit"
            print(f"| {ctx} | {label} | {nbytes / 2**20:.1f} MiB | {1 / dt:.2f} | {1000 * dt:.1f} | {base / dt:.2f} |")
            del cache
            gc.collect()
    del model


# -- 4. prefill memory -------------------------------------------------------------------
def two_layer_model(name: str, dtype, vocab: int = 8192, seed: int = 0) -> Model:
    """The variant's real layer shapes (hidden, heads, head dims, MLP / experts,
    window), 2 layers (one sliding, one full), random weights; the
    vocabulary cut to `vocab` (the table is weights, not activations: a prefill's
    only vocabulary-sized activation is the last position's logits)."""
    spec = dict(PRESETS[name], num_hidden_layers=2, layer_types=[SLIDING, FULL], num_kv_shared_layers=0)
    spec.update(vocab_size=vocab, vocab_size_per_layer_input=vocab)
    return random_weights(Model(TextConfig.from_dict(spec, f"{name}-2layer")), dtype, seed)


def full_model(name: str, dtype, vocab: int = 8192) -> Model:
    """The variant's real shape with every layer (KV sharing included), random
    weights; vocabulary cut to `vocab`."""
    spec = dict(PRESETS[name], vocab_size=vocab, vocab_size_per_layer_input=vocab)
    return random_weights(Model(TextConfig.from_dict(spec, name)), dtype)


def random_weights(model: Model, dtype, seed: int = 0) -> Model:
    """Random weights: q/k norms scaled by d^-1/4 (scores O(1), as in a trained model),
    other norms, scalars and router scales near 1, matrices N(0, 0.02^2)."""
    mx.random.seed(seed)
    new = []
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(("q_norm.weight", "k_norm.weight")):
            v = (0.8 + 0.4 * mx.random.uniform(shape=value.shape)) * value.shape[-1] ** -0.25
        elif key.endswith(("norm.weight", "layer_scalar", "scale")):
            v = 0.8 + 0.4 * mx.random.uniform(shape=value.shape)
        else:
            v = 0.02 * mx.random.normal(value.shape)
        new.append((key, v.astype(dtype)))
        mx.eval(new[-1][1])  # one tensor at a time: the build's own peak stays small
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())
    return model


def prefill_memory(variants: list[str], ctx: int, chunk: int, bits_list: list[int], dtype) -> None:
    """Peak MLX memory of a ctx-token chunked prefill (`runtime.generate.prefill`),
    split into weights, the KV cache it leaves, and the rest (activations of a chunk,
    the attention scores of its queries over every key before them, allocator slack)."""
    print(f"\n## Peak memory of a {ctx}-token prefill in chunks of {chunk} (2-layer real shapes, {dtype})\n")
    print("| variant | kv bits | weights | KV cache | peak | peak - weights - KV | time |")
    print("|---|---|---|---|---|---|---|")
    ids = mx.array([np.random.default_rng(2).integers(3, 8192, size=ctx).tolist()])
    for name in variants:
        gc.collect()
        mx.clear_cache()
        model = two_layer_model(name, dtype)
        weights = mx.get_active_memory()
        for bits in bits_list:
            cache = model.make_cache(kv_bits=bits)
            mx.clear_cache()
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            t0 = time.perf_counter()
            mx.eval(prefill(model, ids, cache, chunk))
            dt = time.perf_counter() - t0
            peak, kv = mx.get_peak_memory() - base, sum(c.nbytes for c in cache.writers())
            print(
                f"| {name} | {bits} | {weights / 2**30:.2f} GiB | {kv / 2**30:.3f} GiB | "
                f"{(weights + peak) / 2**30:.2f} GiB | {(peak - kv) / 2**30:.3f} GiB | {dt:.0f} s |"
            )
            del cache
        del model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,048-token quality runs, decode at 2K context")
    # float32 by default: MLX's CPU matmul in bf16 is not BLAS and far slower
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--skip", nargs="*", default=[], choices=["bytes", "quality", "speed", "prefill"])
    ap.add_argument("--prefill-variants", nargs="*", default=None, choices=list(PRESETS))
    ap.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK)
    ap.add_argument("--prefill-bits", nargs="*", type=int, default=[16, 8], choices=BITS)
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    print(f"# bench_kv ({'quick' if args.quick else 'full'}) on {platform.machine()}, {mx.default_device()}")
    if "bytes" not in args.skip:
        table_bytes()
        table_fits()
    if "quality" not in args.skip:
        table_quality(2048 if args.quick else 4096, dtype, 256)
    if "speed" not in args.skip:
        if args.quick:
            decode_speed(None, [2048], 8, dtype)
        else:
            decode_speed("e2b", [8192, 32768], 16, dtype)
    if "prefill" not in args.skip:
        variants = args.prefill_variants or (["e2b"] if args.quick else list(PRESETS))
        prefill_memory(variants, 4096 if args.quick else 32768, args.prefill_chunk, args.prefill_bits, dtype)


if __name__ == "__main__":
    main()
