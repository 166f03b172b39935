"""Where a decode step's time goes, per op class, and how many ops its graph has.

Random-weight models of bench_text.py's shapes (vocabulary reduced, see --vocab) are
built in memory; after a prefill of --context tokens, one decode step of B rows is
timed whole, then each op class alone, for every layer at once (one graph, one
eval), on inputs of the step's shapes:

  embed       token (and per-layer) embeddings
  norms       every RMSNorm of every layer (q/k/v norms included) and the final one
  qkvo        the attention projections (ops.linear; q/k/v stacked where the backend stacks them)
  rope        RoPE on q and k
  attention   ops.attention over the cached keys (window-clipped on sliding layers)
  mlp         the dense GeGLU MLP
  router      MoE router (norm, projection, softmax, top-k, weights)
  experts     MoE experts (`ops.moe_strategy` / `ops.gather_mm` as the model runs them)
  ple         per-layer-input gate and projection
  head        tied LM head and softcap

"rest" is the whole step minus the classes: residual adds, layer scalars, cache
writes, graph building.  Random inputs route uniformly (the worst case for MoE).
The op count is the number of nodes MLX exports for the step's graph (`mx.export_to_dot`).

    python bench/bench_decode_breakdown.py [--quick] [--dtype bfloat16] [--batch 1 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx
from bench_text import SHAPES  # bench/ is on sys.path when run as a script
from mlx.utils import tree_flatten, tree_unflatten
from report import Report

from gemma4_mlx import ops
from gemma4_mlx.cache import build_mask
from gemma4_mlx.config import TextConfig
from gemma4_mlx.models.text import Model

QUICK = dict(hidden_size=256, num_hidden_layers=6, intermediate_size=512, head_dim=64, global_head_dim=128)


def build(shape: str, vocab: int, dtype, quick: bool) -> Model:
    vocab = min(vocab, SHAPES[shape]["vocab_size"])
    spec = dict(SHAPES[shape], vocab_size=vocab, model_type="gemma4_text")
    if spec.get("vocab_size_per_layer_input"):
        spec["vocab_size_per_layer_input"] = vocab
    if quick:
        spec.update(QUICK, layer_types=["sliding_attention"] * 2 + ["full_attention"])
        spec["layer_types"] *= 2
        if spec.get("num_kv_shared_layers"):
            spec["num_kv_shared_layers"] = 2
        if spec.get("enable_moe_block"):
            spec.update(num_experts=16, moe_intermediate_size=128)
    model = Model(TextConfig.from_dict(spec, shape))
    mx.random.seed(0)
    new = []
    for key, value in tree_flatten(model.parameters()):
        if key.endswith(("q_norm.weight", "k_norm.weight")):
            v = (0.8 + 0.4 * mx.random.uniform(shape=value.shape)) * value.shape[0] ** -0.25
        elif key.endswith("router.proj.weight"):
            v = mx.random.normal(value.shape)
        elif key.endswith(("norm.weight", ".scale", "per_expert_scale", "layer_scalar")):
            v = 0.8 + 0.4 * mx.random.uniform(shape=value.shape)
        else:
            v = 0.02 * mx.random.normal(value.shape)
        new.append((key, v.astype(dtype)))
        mx.eval(new[-1][1])
    model.update(tree_unflatten(new))
    if ops.stack_projections():  # as the loader does
        model.fuse()
    return model


def timed(fn, reps: int) -> float:
    """Median seconds of mx.eval(fn()) after one warm-up."""
    mx.eval(fn())
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def count_ops(outputs) -> int:
    """Nodes of the graph computing `outputs` (MLX's dot export, one line per node)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.dot")
        mx.export_to_dot(path, outputs)
        with open(path) as f:
            return sum(1 for line in f if "label" in line and "->" not in line)


def op_classes(model: Model, caches, B: int, dtype) -> dict:
    """name -> a function building that class's work for one decode step of B rows."""
    cfg = model.config
    H, layers = cfg.hidden_size, model.layers
    x = mx.random.normal((B, 1, H)).astype(dtype)
    ids = mx.random.randint(3, cfg.vocab_size, (B, 1))
    kv, q, heads = {}, {}, {}  # per layer: cached K/V, a query, the attention output rows
    for i, layer in enumerate(layers):
        c = caches[i] if caches[i] is not None else caches[layer.spec.producer]
        kv[i] = c.state
        a = layer.self_attn
        q[i] = mx.random.normal((B, a.n_heads, 1, a.head_dim)).astype(dtype)
        heads[i] = mx.random.normal((B, 1, a.n_heads * a.head_dim)).astype(dtype)
    mx.eval(x, ids, q, heads)  # inputs are not part of any class's graph

    def per_head(m):
        d = m.weight.shape[0] if "weight" in m else H
        return x if d == H else x.reshape(B, 1, H // d, d) if H % d == 0 else q[0][..., :d]

    def norms():
        out = [model.model.norm(x)]
        for layer in layers:
            out += [m(per_head(m)) for name, m in layer.named_modules() if name.endswith(("norm", "layernorm"))]
        return out

    def qkvo():
        out = []
        for i, layer in enumerate(layers):
            a = layer.self_attn
            out += [getattr(a, n)(x) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj") if n in a]
            out.append(a.o_proj(heads[i]))
        return out

    def rope():
        return [layer.self_attn.rope(q[i], kv[i][0].shape[2]) for i, layer in enumerate(layers)]

    def attention():
        out = []
        for i, layer in enumerate(layers):
            k, v = kv[i]
            S = k.shape[2]
            window = cfg.sliding_window if layer.spec.type != "full_attention" else None
            out.append(ops.attention(q[i], k, v, build_mask(S - 1, 0, 1, window, None)))
        return out

    classes = {
        "embed": lambda: [model.model.embed(ids)],
        "norms": norms,
        "qkvo": qkvo,
        "rope": rope,
        "attention": attention,
        "mlp": lambda: [layer.mlp(x) for layer in layers],
    }
    if cfg.enable_moe_block:
        routes = [layer.router(x) for layer in layers]
        mx.eval(routes)
        classes["router"] = lambda: [layer.router(x) for layer in layers]
        classes["experts"] = lambda: [layer.experts(x, *routes[i]) for i, layer in enumerate(layers)]
    if cfg.hidden_size_per_layer_input:
        P = cfg.hidden_size_per_layer_input
        p = mx.random.normal((B, 1, P)).astype(dtype)
        mx.eval(p)
        classes["ple"] = lambda: [
            layer.per_layer_projection(ops.geglu(layer.per_layer_input_gate(x), p)) for layer in layers
        ]
    classes["head"] = lambda: [model.logits(x)]
    return classes


def breakdown(shape: str, args, log) -> None:
    dtype = getattr(mx, args.dtype)
    t0 = time.perf_counter()
    model = build(shape, args.vocab, dtype, args.quick)
    log(
        f"{shape}: {model.num_parameters() / 1e6:.0f} M params, {args.dtype}, built in {time.perf_counter() - t0:.0f} s"
    )
    for B in args.batch:
        caches = model.make_cache()
        prompt = mx.random.randint(3, model.config.vocab_size, (B, args.context))
        model.fill_cache(prompt, caches)
        mx.eval([c.state for c in caches if c is not None])
        step_ids = mx.random.randint(3, model.config.vocab_size, (B, 1))

        def step():
            out = model(step_ids, caches)
            return out

        def full():
            out = step()
            mx.eval(out)
            caches.trim(1)
            return out

        n_ops = count_ops(model(step_ids, caches))
        caches.trim(1)
        total = timed(full, args.reps)
        classes = op_classes(model, caches, B, dtype)
        times = {name: timed(fn, args.reps) for name, fn in classes.items()}
        ops_per = {name: count_ops(fn()) for name, fn in classes.items()}
        rest = total - sum(times.values())
        log(f"  B={B}, context {args.context}: decode step {1e3 * total:.1f} ms, {n_ops} ops in its graph")
        for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
            log(f"    {name:<10} {1e3 * t:8.2f} ms {100 * t / total:5.1f}%  {ops_per[name]:5d} ops")
        log(f"    {'rest':<10} {1e3 * rest:8.2f} ms {100 * rest / total:5.1f}%  (adds, scalars, cache writes, graph)")
        k = model.config.top_k_experts
        if model.config.enable_moe_block:
            pick = ops.moe_strategy(B * k, B, model.config.num_experts)
            log(f"    expert strategy at this B: {pick!r} ({B * k} (token, expert) pairs)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.context, args.vocab, args.reps = min(args.context, 96), min(args.vocab, 4096), min(args.reps, 3)
    log = Report(args.out)
    log(
        f"gemma4-mlx decode breakdown{' (--quick)' if args.quick else ''}: mlx {mx.__version__}, "
        f"{mx.default_device()}, BLAS {gemma4_mlx._blas.describe()}, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.2f}; medians of {args.reps}"
    )
    for shape in args.shapes:
        breakdown(shape, args, log)


if __name__ == "__main__":
    main()
