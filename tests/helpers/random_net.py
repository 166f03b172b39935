"""A well-conditioned random network for tests that compare numerics of one model
run two ways (dtypes, quantized caches): small q/k norms, decisive routers,
embeddings and matrices small enough that logits stay far from the softcap.  The
parity families' weights make bf16 rounding flip routes and argmaxes (transformers'
own bf16 model is 50% off its float32 twin there), too noisy to test a kernel."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten


def random_weights(model, seed: int) -> list:
    """(name, array) for every parameter of `model`, float32."""
    mx.random.seed(seed)
    out = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith(("q_norm.weight", "k_norm.weight")):
            w = (0.8 + 0.4 * mx.random.uniform(shape=v.shape)) * v.shape[0] ** -0.25
        elif k.endswith("router.proj.weight"):
            w = mx.random.normal(v.shape)
        elif k.endswith(("norm.weight", ".scale", "per_expert_scale")):
            w = 0.8 + 0.4 * mx.random.uniform(shape=v.shape)
        elif k.endswith("layer_scalar"):
            w = 0.5 + 0.5 * mx.random.uniform(shape=v.shape)
        else:
            w = (0.1 if k.endswith("embed_tokens.weight") else 0.05) * mx.random.normal(v.shape)
        out.append((k, w))
    return out
