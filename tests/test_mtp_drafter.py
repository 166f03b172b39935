"""The MTP drafter against transformers' Gemma4AssistantForCausalLM (docs/speculative.md §3-§6, §15)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from gemma4_mlx.cache import Mask
from gemma4_mlx.checkpoint.load import LoadError, load_drafter, load_model
from gemma4_mlx.config import FULL, SLIDING, AssistantConfig, ConfigError, parse_config
from gemma4_mlx.models.assistant import Drafter, check_pair, producer_layers

from helpers.checkpoints import W, max_diff
from helpers.mtp_pairs import PAIRS

TOL = 1e-4


def _kv(drafter, n_sliding, n_full, seed):
    """Random target K/V of the drafter's layout: {type: (k, v)} [1, kv, S, d]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for typ, n in ((SLIDING, n_sliding), (FULL, n_full)):
        spec = next(s for s in drafter.config.text.layers if s.type == typ)
        out[typ] = tuple(torch.randn(1, spec.kv_heads, n, spec.head_dim, generator=g) for _ in range(2))
    return out


@pytest.mark.parametrize("target", list(PAIRS))
@pytest.mark.parametrize("n_sliding", [W - 1, W + 3])
def test_drafter_step_matches_transformers(drafters, target, n_sliding):
    ref = drafters[target]
    ours = load_drafter(ref.path, "float32")
    assert ours.centroid_head == PAIRS[target]
    assert ours.ordered == PAIRS[target]  # the table was reordered at load
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(1, 1, 128, generator=g)
    kv = _kv(ours, n_sliding, 9, seed=2)
    pos = 11
    with torch.no_grad():
        r = ref.hf(inputs_embeds=x0, position_ids=torch.tensor([[pos]]), shared_kv_states=kv)
    # transformers lets a drafter query see the newest W + 1 sliding keys (docs/speculative.md §4;
    # our default shows W, `MTPSettings.sliding_keys` selects W + 1)
    sl = np.arange(n_sliding) >= n_sliding - (W + 1)
    masks = {
        SLIDING: Mask(mx.array(sl)[None, None, None], 0, 0, None),
        FULL: Mask(mx.ones((1, 1, 1, 9), mx.bool_), 0, 0, None),
    }
    kv_mx = {t: (mx.array(k.numpy()), mx.array(v.numpy())) for t, (k, v) in kv.items()}
    x, h_next = ours.step(mx.array(x0.numpy()), kv_mx, masks, pos)
    logits = ours.logits(x, fill="hf")
    assert max_diff(h_next, r.last_hidden_state.numpy()) < TOL
    assert max_diff(logits, r.logits.numpy()) < TOL
    assert int(ours.argmax(x)[0, 0]) == int(r.logits[0, 0].argmax())


def test_centroid_head_scores_only_candidates(drafters):
    ref = drafters["e2b_like"]
    ours = load_drafter(ref.path, "float32")
    x = mx.random.normal((3, 1, 32))
    full = ours.logits(x)  # -inf outside the top clusters
    finite = np.isfinite(np.array(full))
    assert (finite.sum(axis=-1) == 4 * 16).all()  # TOP_K clusters x 16 tokens each
    assert (np.array(ours.argmax(x)) == np.array(mx.argmax(full, axis=-1))).all()
    # the reordered table gives the same candidates as the canonical gather
    ours.ordered = False
    ours.model.embed_tokens.weight = mx.array(ref.hf.model.embed_tokens.weight.detach().numpy())
    assert np.array_equal(np.array(ours.logits(x)), np.array(full))


def test_released_drafter_configs_build_lazily():
    # docs/speculative.md §1 gives 77.7 M, 78.5 M, 420 M, 470 M (3 significant digits)
    want = {"e2b": 77_731_328, "e4b": 78_517_760, "26b-a4b": 419_711_232, "31b": 469_518_592}
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "reference" / "configs"
    if not root.exists():
        pytest.skip("reference configs not available")
    for name, n in want.items():
        cfg = AssistantConfig.from_dict(json.loads((root / f"{name}-assistant.json").read_text()))
        target = parse_config(json.loads((root / f"{name}.json").read_text())).text
        check_pair(cfg, target)
        assert Drafter(cfg).num_parameters() == n, name
    e2b = parse_config(json.loads((root / "e2b.json").read_text())).text
    assert producer_layers(e2b) == {SLIDING: 13, FULL: 14}


def test_drafter_for_another_target_is_refused(drafters, checkpoints):
    target, _ = load_model(checkpoints["e2b_like"].path, "float32")
    with pytest.raises(LoadError, match="KV heads|kv|K/V"):
        load_drafter(drafters["dense"].path, "float32", target=target)


def test_bad_drafter_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4_text"}))
    with pytest.raises(LoadError, match="not a Gemma 4 drafter"):
        load_drafter(tmp_path)
    with pytest.raises(ConfigError, match="backbone_hidden_size"):
        AssistantConfig.from_dict(
            {
                "model_type": "gemma4_assistant",
                "text_config": {
                    "num_hidden_layers": 4,
                    "layer_types": [SLIDING] * 3 + [FULL],
                    "hidden_size_per_layer_input": 0,
                },
            }
        )


@pytest.mark.parametrize("target", ["e2b_like", "dense"])
@pytest.mark.parametrize("length", [3, 13])  # shorter than the window, and past it
def test_first_round_drafts_match_transformers_candidate_generator(checkpoints, drafters, target, length):
    """The whole draft path (target embedding x sqrt(D_t), concat order, final-norm
    hidden, producer K/V, position) against transformers' MTP candidate generator,
    under its convention: position L, W + 1 sliding keys."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    from gemma4_mlx.runtime.generate import prefill_hidden
    from gemma4_mlx.speculative.loop import MTPSettings, draft

    from helpers.checkpoints import random_ids

    ht, hd = checkpoints[target].hf, drafters[target].hf
    hd.generation_config.num_assistant_tokens = 5
    prompt = random_ids(length, seed=length)
    with torch.no_grad():
        out = ht(input_ids=torch.tensor([prompt]), output_hidden_states=True, return_shared_kv_states=True)
        b0 = int(out.logits[0, -1].argmax())
        gen = SinglePositionMultiTokenCandidateGenerator(
            hd, ht.get_input_embeddings(), GenerationConfig(max_length=100)
        )
        cand, _ = gen.get_candidates(torch.tensor([prompt + [b0]]), {}, out, False, 0)
    want = cand[0, length + 1 :].tolist()
    model, _ = load_model(checkpoints[target].path, "float32")
    drafter = load_drafter(drafters[target].path, "float32", target=model)
    caches = model.make_cache()
    logits, h = prefill_hidden(model, mx.array([prompt]), caches)
    assert int(mx.argmax(logits[0])) == b0
    got = draft(drafter, model, mx.array([b0]), h, caches, 5, MTPSettings("bonus", W + 1))
    assert got.tolist()[0] == want


def test_bad_token_ordering_is_a_load_error(drafters, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    src = drafters["e2b_like"].path
    for bad in (np.full(256, -1, np.int64), np.arange(128, dtype=np.int64)):
        d = tmp_path / f"bad{bad.size}"
        shutil.copytree(src, d)
        f = next(d.glob("*.safetensors"))
        t = load_file(f)
        t["masked_embedding.token_ordering"] = bad
        save_file(t, f, metadata={"format": "pt"})
        with pytest.raises(LoadError, match="token_ordering"):
            load_drafter(d)
