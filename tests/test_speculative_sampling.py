"""Sampling with speculation has exactly the target's distribution (docs/speculative.md §8, §14.5).

A tiny-vocabulary target (32 tokens) and a random drafter; 3,000 independent rows
(each its own keyed random stream) sampled in one batch.  The first three tokens'
marginals are compared with the exact distribution, computed by enumerating every
prefix through the target, with a chi-square test; the same samples must reject a
slightly wrong distribution, so the test has power.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx.config import FULL, SLIDING, AssistantConfig, TextConfig
from gemma4_mlx.models.assistant import Drafter
from gemma4_mlx.models.text import Model
from gemma4_mlx.runtime.generate import SamplingOptions
from gemma4_mlx.speculative.loop import SpecStats, speculative_batch_generate

V, N, PROMPT = 32, 3000, [2, 7, 11, 5, 19, 3]


def _randomize(model, seed: int, scale: float) -> None:
    mx.random.seed(seed)
    new = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith("norm.weight") or k.endswith("layer_scalar"):
            new.append((k, 0.7 + 0.6 * mx.random.uniform(shape=v.shape)))
        elif v.dtype == mx.int32:
            new.append((k, v))
        else:
            new.append((k, scale * mx.random.normal(v.shape)))
    model.load_weights(new)


def tiny_pair():
    common = dict(
        vocab_size=V,
        num_hidden_layers=4,
        layer_types=[SLIDING] * 3 + [FULL],
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
        sliding_window=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
    )
    target = Model(
        TextConfig.from_dict(dict(common, hidden_size=32, intermediate_size=64, final_logit_softcapping=30.0))
    )
    _randomize(target, 0, 0.3)  # top token ~0.4-0.6: peaked, yet 26+ cells
    drafter = Drafter(
        AssistantConfig.from_dict(
            {
                "model_type": "gemma4_assistant",
                "backbone_hidden_size": 32,
                "use_ordered_embeddings": True,
                "num_centroids": 4,
                "centroid_intermediate_top_k": 2,
                "text_config": dict(common, hidden_size=16, intermediate_size=32, num_kv_shared_layers=4),
            }
        )
    )
    _randomize(drafter, 1, 0.3)
    drafter.masked_embedding.token_ordering = mx.array(np.random.default_rng(0).permutation(V), dtype=mx.int32)
    return target, drafter


def exact_marginals(target, temperature: float, depth: int = 3) -> list[np.ndarray]:
    """P(token i = v) for i < depth, by enumerating all V**(depth-1) prefixes."""
    prefixes, weights, out = [[]], np.ones(1), []
    for _ in range(depth):
        ids = mx.array([PROMPT + p for p in prefixes])
        logits = np.array(target(ids)[:, -1].astype(mx.float32), dtype=np.float64) / temperature
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        joint = weights[:, None] * p
        out.append(joint.sum(0))
        prefixes = [q + [v] for q in prefixes for v in range(V)]
        weights = joint.reshape(-1)
    return out


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square with cells of expected count < 5 pooled; Wilson-Hilferty tail."""
    n = counts.sum()
    order = np.argsort(probs)
    exp, obs = probs[order] * n, counts[order].astype(float)
    small = np.cumsum(exp) < 5  # pool the rare tail into one cell
    e = np.append(exp[~small], exp[small].sum()) if small.any() else exp
    o = np.append(obs[~small], obs[small].sum()) if small.any() else obs
    stat, df = float(((o - e) ** 2 / e).sum()), len(e) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_speculative_sampling_matches_the_target_distribution():
    target, drafter = tiny_pair()
    temp = 1.0
    exact = exact_marginals(target, temp)
    wrong = exact_marginals(target, 0.8 * temp)  # a slightly sharper distribution
    modes = [int(m.argmax()) for m in exact]

    def plausible(rows, index, drafts):
        # The random drafter is rarely right; its drafts are replaced (after it ran)
        # by the most likely token at that output index, so that acceptance and
        # rejection both happen often.  No draft choice may change the output
        # distribution.
        return [[modes[n + j] if n + j < len(modes) else t for j, t in enumerate(d)] for n, d in zip(index, drafts)]

    stats = SpecStats()
    out = speculative_batch_generate(
        target,
        drafter,
        [PROMPT] * N,
        max_tokens=4,
        draft_tokens=2,
        options=SamplingOptions(temperature=temp, seed=7),
        stats=stats,
        draft_override=plausible,
    )
    acc = stats.acceptance()
    assert 0.1 < acc[0] < 0.9, acc  # both outcomes, many times
    for i in range(3):
        counts = np.bincount([o[i] for o in out], minlength=V)
        assert chi2_pvalue(counts, exact[i]) > 1e-3, i
        assert chi2_pvalue(counts, wrong[i]) < 1e-6, i  # the test can tell them apart
