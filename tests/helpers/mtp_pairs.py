"""Tiny target + MTP drafter pairs written by transformers (docs/speculative.md §15).

Targets are the conftest families; each drafter matches its target's K/V layout
(heads, head dims, K = V) and carries the centroid head or the dense tied head.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from helpers.checkpoints import FAMILIES, F, S, W, randomize

# target family -> centroid head?  (E2B/E4B drafters have it; 26B/31B do not)
PAIRS = {"dense": False, "e2b_like": True, "moe": False}
CENTROIDS, TOP_K = 16, 4  # vocab 256 = 16 clusters x 16 tokens; score 4 clusters


def hf_drafter(target: str, centroid: bool, seed: int):
    fam = FAMILIES[target]
    text = transformers.Gemma4TextConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=fam["num_key_value_heads"],
        num_global_key_value_heads=fam.get("num_global_key_value_heads"),
        attention_k_eq_v=fam["attention_k_eq_v"],
        head_dim=16,
        global_head_dim=32,
        sliding_window=W,
        layer_types=[S, S, S, F],
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    cfg = transformers.Gemma4AssistantConfig(
        text_config=text.to_dict(),
        backbone_hidden_size=64,
        use_ordered_embeddings=centroid,
        num_centroids=CENTROIDS,
        centroid_intermediate_top_k=TOP_K,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma4AssistantForCausalLM(cfg).eval()
    randomize(model, seed)
    if centroid:
        perm = np.random.default_rng(seed).permutation(256)
        model.masked_embedding.token_ordering.copy_(torch.tensor(perm))
    return model
