"""Prefill and decode speed of gemma4-mlx vs mlx-lm's Gemma 4, same weights, same process.

Builds mid-size random checkpoints in the real HF layout under bench/_work/ —
E2B-shaped (PLE, KV sharing, double-wide MLP) and 26B-A4B-shaped (MoE + dense
branch, K = V), each at a wide shape (hidden 1024, vocabulary 262144) and at the
thin shape issue #15 measured (hidden 512, vocabulary 32768: 35 layers / 32 small
experts) — loads each with both runtimes in float32 on the CPU (under the same
BLAS: `import gemma4_mlx` preloads OpenBLAS for both), and prints tokens/s and the
ratio, best of interleaved rounds.  `--quantized` adds each checkpoint quantized by
mlx-lm itself (4-bit, group 64, the mlx-community layout), loaded by both.  Decode
is also shown as a fraction of the roofline: weight bytes read per decoded token /
GEMV bandwidth measured here.

    make bench        # or: python bench/bench_text.py [--prompts 1024 4096 --decode 32 --shapes ... --quantized]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from gemma4_mlx import ops
from gemma4_mlx.checkpoint import cpu_forms
from gemma4_mlx.config import FULL, SLIDING, TextConfig
from gemma4_mlx.models.text import Model
from gemma4_mlx.runtime.generate import generate_tokens

WORK = Path(__file__).parent / "_work"
S, F = SLIDING, FULL

SHAPES = {
    "e2b-shaped": dict(
        vocab_size=262144,
        vocab_size_per_layer_input=262144,
        hidden_size=1024,
        num_hidden_layers=20,
        layer_types=[S, S, S, S, F] * 4,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        sliding_window=512,
        intermediate_size=4096,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=32,
        num_kv_shared_layers=8,
        final_logit_softcapping=30.0,
    ),
    # The two shapes issue #15 measured (hidden 512, vocabulary 32768): many thin
    # layers, where per-op overhead rather than bandwidth decides decode speed.
    "e2b-small": dict(
        vocab_size=32768,
        vocab_size_per_layer_input=32768,
        hidden_size=512,
        num_hidden_layers=35,
        layer_types=[S, S, S, S, F] * 7,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        global_head_dim=512,
        sliding_window=512,
        intermediate_size=1024,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=64,
        num_kv_shared_layers=20,
        final_logit_softcapping=30.0,
    ),
    "moe-small": dict(
        vocab_size=32768,
        hidden_size=512,
        num_hidden_layers=12,
        layer_types=[S, S, S, S, S, F] * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=128,
        global_head_dim=256,
        sliding_window=1024,
        intermediate_size=512,
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=32,
        top_k_experts=4,
        moe_intermediate_size=256,
        final_logit_softcapping=30.0,
    ),
    "moe-shaped": dict(
        vocab_size=262144,
        hidden_size=1024,
        num_hidden_layers=12,
        layer_types=[S, S, S, S, S, F] * 2,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_global_key_value_heads=1,
        attention_k_eq_v=True,
        head_dim=256,
        global_head_dim=512,
        sliding_window=1024,
        intermediate_size=1024,
        hidden_size_per_layer_input=0,
        enable_moe_block=True,
        num_experts=64,
        top_k_experts=8,
        moe_intermediate_size=256,
        final_logit_softcapping=30.0,
    ),
}


def hf_key(key: str) -> str:
    return "model.language_model." + key.removeprefix("model.")


def build_checkpoint(name: str, spec: dict) -> Path:
    """Random weights saved as a hub-style `gemma4` wrapper checkpoint (bf16-free, float32)."""
    folder = WORK / name
    if (folder / "model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = TextConfig.from_dict(dict(spec, model_type="gemma4_text"))
    model = Model(cfg)
    mx.random.seed(0)
    tensors = {}
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(("q_norm.weight", "k_norm.weight")):
            # Attention scale is 1.0: with unit q/k norms a random model's scores have
            # std sqrt(d) = 16-22 and the net turns chaotic (fp32 vs fp64 logits differ
            # by ~0.5).  Trained models learn small q/k norm weights; mimic that.
            v = (0.8 + 0.4 * mx.random.uniform(shape=value.shape)) * value.shape[0] ** -0.25
        elif key.endswith("router.proj.weight"):
            v = mx.random.normal(value.shape)  # decisive routing: no top-k near-ties
        elif key.endswith("norm.weight") or key.endswith(".scale") or key.endswith("per_expert_scale"):
            v = 0.8 + 0.4 * mx.random.uniform(shape=value.shape)
        elif key.endswith("layer_scalar"):
            v = 0.5 + 0.5 * mx.random.uniform(shape=value.shape)
        else:
            v = 0.02 * mx.random.normal(value.shape)
        if key.endswith(".experts.gate_proj.weight"):
            up = 0.02 * mx.random.normal(value.shape)
            tensors[hf_key(key.replace("gate_proj.weight", "gate_up_proj"))] = mx.concatenate([v, up], 1)
            continue
        if key.endswith(".experts.up_proj.weight"):
            continue
        tensors[hf_key(key.removesuffix(".weight") if ".experts.down_proj" in key else key)] = v
    mx.save_safetensors(str(folder / "model.safetensors"), tensors)
    text = dict(cfg.to_dict(), model_type="gemma4_text")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gemma4",
                "text_config": text,
                "vocab_size": cfg.vocab_size,
                "vision_config": None,
                "audio_config": None,
            },
            indent=1,
        )
    )
    del tensors, model
    gc.collect()
    return folder


def weight_bytes_per_token(model: Model) -> int:
    """Bytes of weights a decode step reads (PLE table / embedding: one row; experts: top-k)."""
    cfg = model.config
    total = 0
    for key, v in tree_flatten(model.parameters()):
        if ".embed_tokens_per_layer." in key:
            continue
        if ".experts." in key:
            total += v.nbytes * cfg.top_k_experts // cfg.num_experts
        else:
            total += v.nbytes  # includes the tied head (all of embed_tokens)
    return total


def gemv_bandwidth() -> float:
    """Best bytes/s of float32 vector-matrix products over a 1 GiB working set, far
    larger than any cache: the decode roofline."""
    best = 0.0
    for rows, cols in ((4096, 1024), (1024, 4096), (8192, 8192)):
        count = max(1, (1 << 30) // (rows * cols * 4))
        ws = [mx.random.normal((rows, cols)) for _ in range(count)]
        x = mx.random.normal((1, cols))
        mx.eval(ws, x)
        for form in (lambda w: x @ w.T, lambda w: w @ x.T):  # both BLAS orientations
            for _ in range(2):
                mx.eval([form(w) for w in ws])
            t = time.perf_counter()
            for _ in range(3):
                mx.eval([form(w) for w in ws])
            best = max(best, 3 * sum(w.nbytes for w in ws) / (time.perf_counter() - t))
        del ws
    return best


def mlx_lm_quantized(folder: Path, bits: int = 4, group: int = 64) -> Path:
    """The checkpoint quantized by mlx-lm itself (its loader, `quantize_model` and
    savers: the mlx-community layout), beside the float one."""
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    out = folder.with_name(f"{folder.name}-mlx-q{bits}")
    if (out / "config.json").exists():
        return out
    model, config = load_model(folder)
    model, config = quantize_model(model, config, group, bits)
    out.mkdir(parents=True, exist_ok=True)
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def time_run(step_iter, n_decode: int) -> tuple[float, float]:
    """(seconds to first token, seconds per following token)."""
    t0 = time.perf_counter()
    it = iter(step_iter)
    next(it)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        next(it)
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / n_decode


def ours(model, prompt, n_decode):
    return time_run(generate_tokens(model, prompt, max_tokens=n_decode + 1, prefill_chunk=2048), n_decode)


def mlx_lm_run(model, prompt, n_decode):
    from mlx_lm.generate import generate_step

    gen = generate_step(mx.array(prompt), model, max_tokens=n_decode + 1, prefill_step_size=2048)
    return time_run((int(t) for t, _ in gen), n_decode)


def load_both(folder: Path, quantized: bool):
    """(ours, mlx-lm's) models of one checkpoint, float32 activations."""
    from mlx_lm.utils import load_model

    mine, _ = gemma4_mlx.load(folder, dtype=None if quantized else "float32")
    theirs, _ = load_model(folder)
    if not quantized:
        theirs.set_dtype(mx.float32)
    mx.eval(mine.parameters(), theirs.parameters())
    return mine, theirs


def measure(name: str, folder: Path, args, quantized: bool) -> list:
    """Best of `args.rounds` rounds, ours and mlx-lm's interleaved in each round."""
    from mlx_lm.generate import generate_step

    V = SHAPES[name]["vocab_size"]
    prompts = {n: [2] + [(7 * i) % (V - 3) + 3 for i in range(n - 1)] for n in args.prompts}
    cpu_forms.forget()  # each checkpoint's load times its own forms, as in a process of its own
    mine, theirs = load_both(folder, quantized)
    own = ", ".join(f"{form} for {list(shape)}" for shape, form in sorted(ops.cpu_shape_forms().items()))
    forms = f"{ops.cpu_form(1)} (one row{'; ' + own if own else ''}), {ops.cpu_form(4)} (a few)"
    print(f"{name}{' (mlx-lm q4)' if quantized else ''}: CPU product forms {forms} (docs/text-decoder.md §6.3)")
    best = {(who, n): (float("inf"), float("inf")) for who in ("ours", "mlx-lm") for n in prompts}
    for _ in range(args.rounds):
        for n, p in prompts.items():
            for who, fn, model in (("ours", ours, mine), ("mlx-lm", mlx_lm_run, theirs)):
                pre, dec = fn(model, p, args.decode)
                old = best[who, n]
                best[who, n] = (min(old[0], pre), min(old[1], dec))
    bytes_tok = weight_bytes_per_token(mine)
    check = prompts[args.prompts[0]][:64]
    same = list(generate_tokens(mine, check, max_tokens=8)) == [
        int(t) for t, _ in generate_step(mx.array(check), theirs, max_tokens=8)
    ]
    del mine, theirs
    gc.collect()
    label = name + (" (mlx-lm q4)" if quantized else "")
    return [(label, n, best["ours", n], best["mlx-lm", n], bytes_tok, same) for n in args.prompts]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument(
        "--quantized", action="store_true", help="also the checkpoints quantized by mlx-lm (4-bit, group 64)"
    )
    args = ap.parse_args()
    import mlx_lm

    bw = gemv_bandwidth()
    print(
        f"backend: {mx.default_device()}, BLAS: {gemma4_mlx._blas.describe()}, "
        f"float32 activations, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start"
    )
    print(
        f"best float32 GEMV bandwidth: {bw / 1e9:.1f} GB/s; decode {args.decode} tokens after "
        f"each prompt; best of {args.rounds} interleaved rounds; prefill chunk 2048 for both\n"
    )
    rows = []
    for name in args.shapes:
        folder = build_checkpoint(name, SHAPES[name])
        rows += measure(name, folder, args, quantized=False)
        if args.quantized:
            rows += measure(name, mlx_lm_quantized(folder), args, quantized=True)
    print(
        f"{'shape':<26} {'prompt':>6} | {'prefill tok/s':>13} {'mlx-lm':>7} {'ratio':>5} | "
        f"{'decode tok/s':>12} {'mlx-lm':>7} {'ratio':>5} | {'roofline':>8} {'ours':>5} "
        f"{'mlx-lm':>6} | same greedy tokens"
    )
    for name, n, (op, od), (rp, rd), bytes_tok, same in rows:
        roof = bw / bytes_tok
        print(
            f"{name:<26} {n:>6} | {n / op:>13.1f} {n / rp:>7.1f} {rp / op:>5.2f} | "
            f"{1 / od:>12.2f} {1 / rd:>7.2f} {rd / od:>5.2f} | {roof:>8.2f} "
            f"{100 / od / roof:>4.0f}% {100 / rd / roof:>5.0f}% | {same}"
        )
    print(
        "\nroofline: decode tokens/s if every weight byte a token reads (experts: top-k of them;"
        " the PLE table: one row) streamed at the GEMV bandwidth above; quantized rows count their packed bytes"
    )


if __name__ == "__main__":
    main()
