"""The 12B unified model's MTP drafter (`gemma4_unified_assistant`) against transformers
5.25 (docs/unified.md §6): one draft step, the first round's drafts, and greedy
speculative decoding equal to plain decoding."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma4_mlx.cache import Mask
from gemma4_mlx.checkpoint.load import load_drafter, load_model
from gemma4_mlx.config import FULL, SLIDING
from gemma4_mlx.runtime.generate import generate_tokens, prefill_hidden
from gemma4_mlx.speculative.loop import MTPSettings, draft, speculative_generate_tokens

from helpers.checkpoints import max_diff, random_ids
from helpers.unified import W, build_hf, hf_drafter

TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["dense_head", "centroid_head"])
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("unified_pair")
    target, drafter = build_hf(seed=5), hf_drafter(seed=6, centroid=request.param)
    target.save_pretrained(root / "target")
    drafter.save_pretrained(root / "drafter")
    model, _ = load_model(root / "target", "float32")
    ours = load_drafter(root / "drafter", "float32", target=model)
    return SimpleNamespace(ht=target, hd=drafter, model=model, drafter=ours, centroid=request.param)


def test_config_and_layout(pair):
    cfg = pair.drafter.config
    assert cfg.raw["model_type"] == "gemma4_unified_assistant"
    assert cfg.backbone_hidden_size == 40 and cfg.text.hidden_size == 32
    assert pair.drafter.centroid_head == pair.centroid


@pytest.mark.parametrize("n_sliding", [W - 1, W + 3])
def test_step_matches_transformers(pair, n_sliding):
    """Carried hidden and logits of one step, given the same target K/V."""
    g = torch.Generator().manual_seed(n_sliding)
    kv = {}
    for typ, n in ((SLIDING, n_sliding), (FULL, 9)):
        spec = next(s for s in pair.drafter.config.text.layers if s.type == typ)
        kv[typ] = tuple(torch.randn(1, spec.kv_heads, n, spec.head_dim, generator=g) for _ in range(2))
    x0 = torch.randn(1, 1, 80, generator=g)
    with torch.no_grad():
        r = pair.hd(inputs_embeds=x0, position_ids=torch.tensor([[11]]), shared_kv_states=kv)
    sl = np.arange(n_sliding) >= n_sliding - (W + 1)  # transformers' drafter sees W + 1 sliding keys
    masks = {
        SLIDING: Mask(mx.array(sl)[None, None, None], 0, 0, None),
        FULL: Mask(mx.ones((1, 1, 1, 9), mx.bool_), 0, 0, None),
    }
    kv_mx = {t: (mx.array(k.numpy()), mx.array(v.numpy())) for t, (k, v) in kv.items()}
    x, h_next = pair.drafter.step(mx.array(x0.numpy()), kv_mx, masks, 11)
    assert np.abs(r.last_hidden_state.numpy()).max() > 0.5
    assert max_diff(h_next, r.last_hidden_state.numpy()) < TOL
    assert max_diff(pair.drafter.logits(x, fill="hf"), r.logits.numpy()) < TOL


def test_first_round_drafts_match_transformers(pair):
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    prompt = random_ids(13, seed=3, vocab=300)
    prompt = [t if t not in range(10, 17) else 30 for t in prompt]
    pair.hd.generation_config.num_assistant_tokens = 5
    with torch.no_grad():
        out = pair.ht(input_ids=torch.tensor([prompt]), output_hidden_states=True, return_shared_kv_states=True)
        b0 = int(out.logits[0, -1].argmax())
        gen = SinglePositionMultiTokenCandidateGenerator(
            pair.hd, pair.ht.get_input_embeddings(), GenerationConfig(max_length=100)
        )
        cand, _ = gen.get_candidates(torch.tensor([prompt + [b0]]), {}, out, False, 0)
    caches = pair.model.make_cache()
    logits, h = prefill_hidden(pair.model, mx.array([prompt]), caches)
    assert int(mx.argmax(logits[0])) == b0
    got = draft(pair.drafter, pair.model, mx.array([b0]), h, caches, 5, MTPSettings("bonus", W + 1))
    assert got.tolist()[0] == cand[0, len(prompt) + 1 :].tolist()


def test_greedy_speculative_equals_plain(pair):
    for seed in (1, 2):
        prompt = [t if t not in range(10, 17) else 30 for t in random_ids(9, seed=seed, vocab=300)]
        want = list(generate_tokens(pair.model, prompt, max_tokens=20))
        for k in (1, 3):
            got = list(speculative_generate_tokens(pair.model, pair.drafter, prompt, max_tokens=20, draft_tokens=k))
            assert got == want, (seed, k)


# -- reading the 12B drafter's config.json as transformers does (docs/unified.md §6) ---------

_LEGACY = {  # the form of the released assistants' config.json (../shared/reference/configs)
    "model_type": "gemma4_unified_assistant",
    "backbone_hidden_size": 3840,
    "use_ordered_embeddings": False,
    "text_config": {
        "model_type": "gemma4_unified_text",
        "hidden_size": 1024,
        "intermediate_size": 8192,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "num_global_key_value_heads": 1,
        "head_dim": 256,
        "global_head_dim": 512,
        "attention_k_eq_v": True,
        "vocab_size": 262144,
        "layer_types": [SLIDING] * 3 + [FULL],
    },
}


def _variant(top: dict | None = None, drop=(), **text) -> dict:
    d = {**_LEGACY, **(top or {}), "text_config": {**_LEGACY["text_config"], **text}}
    for k in drop:  # a key of the text config, else of the top level
        del (d["text_config"] if k in d["text_config"] else d)[k]
    return d


def _saved_by_transformers(tmp_path) -> dict:
    """transformers 5.25's own save of the drafter config: `per_layer_config`, no
    global_head_dim / num_global_key_value_heads."""
    import json

    import transformers

    transformers.Gemma4UnifiedAssistantConfig(**_LEGACY).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def _geometry_hf(d: dict) -> dict:
    import copy

    import transformers

    c = transformers.Gemma4UnifiedAssistantConfig(**copy.deepcopy(d))
    t = c.text_config
    per = t.per_layer_config if t.is_heterogeneous else [t] * t.num_hidden_layers
    return dict(
        layers=[(ty, per[i].head_dim, per[i].num_key_value_heads) for i, ty in enumerate(t.layer_types)],
        window=t.sliding_window,
        shared=t.num_kv_shared_layers,
        backbone=c.backbone_hidden_size,
        head=(c.use_ordered_embeddings, c.num_centroids, c.centroid_intermediate_top_k),
        softcap=t.final_logit_softcapping,
        eps=t.rms_norm_eps,
        rope={k: t.rope_parameters[k] for k in (SLIDING, FULL)},
        width=(t.hidden_size, t.intermediate_size, t.num_attention_heads, t.vocab_size),
    )


def _geometry_ours(d: dict) -> dict:
    from gemma4_mlx.config import AssistantConfig

    a = AssistantConfig.from_dict(d)
    t = a.text
    return dict(
        layers=[(s.type, s.head_dim, s.kv_heads) for s in t.layers],
        window=t.sliding_window,
        shared=t.num_kv_shared_layers,
        backbone=a.backbone_hidden_size,
        head=(a.use_ordered_embeddings, a.num_centroids, a.centroid_intermediate_top_k),
        softcap=t.final_logit_softcapping,
        eps=t.rms_norm_eps,
        rope={k: t.rope_for(k) for k in (SLIDING, FULL)},
        width=(t.hidden_size, t.intermediate_size, t.num_attention_heads, t.vocab_size),
    )


@pytest.mark.parametrize(
    "case",
    [
        "released_form",
        "transformers_save",
        "no_attention_k_eq_v",  # the full layer then has 8 KV heads, as in transformers
        "no_layer_types",
        "kv_shared_0",  # forced to "every layer shared"
        "no_global_head_dim",
        "defaults",  # window, rope, softcap, centroid fields and eps from gemma4_unified_text's defaults
        "centroid_head",
    ],
)
def test_drafter_config_read_as_transformers_reads_it(case, tmp_path):
    d = {
        "released_form": _LEGACY,
        "transformers_save": _saved_by_transformers(tmp_path) if case == "transformers_save" else None,
        "no_attention_k_eq_v": _variant(drop=["attention_k_eq_v"]),
        "no_layer_types": _variant(drop=["layer_types"], num_hidden_layers=6),
        "kv_shared_0": _variant(num_kv_shared_layers=0),
        "no_global_head_dim": _variant(drop=["global_head_dim"]),
        "defaults": _variant(drop=["use_ordered_embeddings"]),
        "centroid_head": _variant({"use_ordered_embeddings": True, "num_centroids": 1024}),
    }[case]
    assert _geometry_ours(d) == _geometry_hf(d)
