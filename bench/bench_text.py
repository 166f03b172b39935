"""Prefill and decode speed of gemma4-mlx vs mlx-lm's Gemma 4, same weights, same process.

Builds two mid-size random checkpoints in the real HF layout — one E2B-shaped
(PLE, KV sharing, double-wide MLP) and one 26B-A4B-shaped (MoE + dense branch,
K = V) — under bench/_work/, loads each with both runtimes in float32 on the CPU
(under the same BLAS: `import gemma4_mlx` preloads OpenBLAS for both), and
prints tokens/s and the ratio.  Decode is also shown as a fraction of the
roofline: weight bytes read per decoded token / GEMV bandwidth measured here.

    make bench        # or: python bench/bench_text.py [--prompts 1024 4096 --decode 32 --shapes ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

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
        if key.endswith("embed_tokens_per_layer.weight"):
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


def best(fn, *args, repeats=2):
    runs = [fn(*args) for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    args = ap.parse_args()
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    bw = gemv_bandwidth()
    print(
        f"backend: {mx.default_device()}, BLAS: {gemma4_mlx._blas.loaded_from or 'MLX default'}, "
        f"float32, mlx {mx.__version__}, mlx-lm {mlx_lm.__version__}"
    )
    print(
        f"best float32 GEMV bandwidth: {bw / 1e9:.1f} GB/s; decode {args.decode} tokens after "
        f"each prompt; best of 2 runs; prefill chunk 2048 for both\n"
    )
    rows = []
    for name in args.shapes:
        folder = build_checkpoint(name, SHAPES[name])
        prompts = {n: [2] + [(7 * i) % 60000 + 3 for i in range(n - 1)] for n in args.prompts}
        model, _ = gemma4_mlx.load(folder, dtype="float32")
        mx.eval(model.parameters())
        mine = {n: best(ours, model, p, args.decode) for n, p in prompts.items()}
        bytes_tok = weight_bytes_per_token(model)
        check = prompts[args.prompts[0]][:64]
        my_tokens = list(generate_tokens(model, check, max_tokens=8))
        del model
        gc.collect()
        model, _ = load_model(folder)
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        theirs = {n: best(mlx_lm_run, model, p, args.decode) for n, p in prompts.items()}
        their_tokens = [int(t) for t, _ in generate_step(mx.array(check), model, max_tokens=8)]
        del model
        gc.collect()
        for n in args.prompts:
            rows.append((name, n, mine[n], theirs[n], bw / bytes_tok, my_tokens == their_tokens))
    print(
        f"{'shape':<11} {'prompt':>6} | {'prefill tok/s':>13} {'mlx-lm':>7} {'ratio':>5} | "
        f"{'decode tok/s':>12} {'mlx-lm':>7} {'ratio':>5} | {'roofline':>8} {'ours':>5} "
        f"{'mlx-lm':>6} | same greedy tokens"
    )
    for name, n, (op, od), (rp, rd), roof, same in rows:
        print(
            f"{name:<11} {n:>6} | {n / op:>13.1f} {n / rp:>7.1f} {rp / op:>5.2f} | "
            f"{1 / od:>12.2f} {1 / rd:>7.2f} {rd / od:>5.2f} | {roof:>8.2f} "
            f"{100 / od / roof:>4.0f}% {100 / rd / roof:>5.0f}% | {same}"
        )


if __name__ == "__main__":
    main()
