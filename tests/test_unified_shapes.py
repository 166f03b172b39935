"""Gemma 4 12B unified at its released shape (built lazily) and through `convert` / `info`
(docs/unified.md §2, §8)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx.checkpoint.info import model_info
from gemma4_mlx.config import AssistantConfig, parse_config
from gemma4_mlx.convert import convert
from gemma4_mlx.media.prepare import Audio, Image, media_prompt
from gemma4_mlx.media.unified import processors
from gemma4_mlx.models.assistant import Drafter, check_pair
from gemma4_mlx.models.text import Model
from gemma4_mlx.presets import UNIFIED_DRAFTERS, preset, unified_config

from helpers.unified import IMAGE_PROMPT, build_hf


def hf_meta_12b():
    d = unified_config("12b")
    names = set(transformers.Gemma4UnifiedTextConfig.__dataclass_fields__)
    text = {k: v for k, v in d["text_config"].items() if k in names or k.startswith("num_global")}
    text["global_head_dim"] = 512
    cfg = transformers.Gemma4UnifiedConfig(
        text_config=transformers.Gemma4UnifiedTextConfig(**text).to_dict(),
        vision_config=transformers.Gemma4UnifiedVisionConfig(**d["vision_config"]).to_dict(),
        audio_config=transformers.Gemma4UnifiedAudioConfig(**d["audio_config"]).to_dict(),
    )
    with torch.device("meta"):
        return transformers.Gemma4UnifiedForConditionalGeneration(cfg)


def test_released_shape_has_transformers_parameter_count():
    hf = hf_meta_12b()
    ours = Model.from_config(parse_config(unified_config("12b")))  # lazy: nothing is allocated
    lm = sum(p.numel() for p in hf.model.language_model.parameters())
    assert ours.num_parameters() == lm == 11_907_350_272
    assert ours.num_parameters(towers=True) == sum(p.numel() for p in hf.parameters()) == 11_959_730_176
    t = preset("gemma-4-12b-it")
    full = [s for s in t.layers if s.type == "full_attention"]
    assert len(t.layers) == 48 and len(full) == 8 and t.layers[-1].type == "full_attention"
    assert {(s.head_dim, s.kv_heads, s.k_eq_v) for s in full} == {(512, 1, True)}
    assert {(s.head_dim, s.kv_heads) for s in t.layers if s.type != "full_attention"} == {(256, 8)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("unified_src")
    build_hf(seed=7).save_pretrained(path)
    return path


def run(model, ids, **media):
    rows = media_prompt(model, None, ids, **media)[1]
    return rows, np.array(model(mx.array([ids]), media=rows).astype(mx.float32))


@pytest.mark.parametrize("quant", ["bf16", "sfp8", "q4_0"])
def test_convert_and_info(source, tmp_path, quant):
    """bf16: the converted folder computes exactly what the source loaded as bfloat16
    does.  Quantized recipes keep the embedders unquantized in the source dtype, so
    their soft tokens equal the source's bit for bit."""
    dst = tmp_path / quant
    convert(source, dst, quant, progress=False)
    ours, _ = gemma4_mlx.load(dst)
    ids, img = IMAGE_PROMPT()
    x = np.random.default_rng(1).standard_normal(183).astype(np.float32) * 0.3
    aids = [2, 40, 15] + [13] * 10 + [16, 50]
    src, _ = gemma4_mlx.load(source, dtype="bfloat16" if quant == "bf16" else None)
    rows_q, logits_q = run(ours, ids, images=[Image(img, 70)])
    rows_s, logits_s = run(src, ids, images=[Image(img, 70)])
    arows_q, _ = run(ours, aids, audio=[Audio(x)])
    arows_s, _ = run(src, aids, audio=[Audio(x)])
    assert np.array_equal(np.array(rows_q.rows.astype(mx.float32)), np.array(rows_s.rows.astype(mx.float32)))
    assert np.array_equal(np.array(arows_q.rows.astype(mx.float32)), np.array(arows_s.rows.astype(mx.float32)))
    assert np.isfinite(logits_q).all()
    if quant == "bf16":
        assert np.array_equal(logits_q, logits_s)
    info = model_info(dst, load=False)["components"]  # from the headers, nothing loaded
    assert info["vision"]["params"] == sum(v.size for _, v in tree_flatten(ours.vision.parameters())) == 13_752
    assert info["audio"]["params"] == 40 * 20


def unified_block(n: int) -> dict:
    """transformers' own feature_extractor block of a unified model with n-sample frames."""
    fe = transformers.Gemma4UnifiedAudioFeatureExtractor(feature_size=n, audio_samples_per_token=n)
    return json.loads(json.dumps(fe.to_dict()))


@pytest.mark.parametrize("existing", [None, {"processor_class": "Gemma4UnifiedProcessor"}], ids=["none", "no_block"])
def test_convert_writes_the_unified_audio_block(source, tmp_path, existing):
    """A unified source without a feature_extractor block leaves with the raw-frame block
    transformers writes for the 12B (frames of the embedder's width), never the log-mel
    block of E2B/E4B (docs/unified.md §8); transformers reads it back and frames a clip
    as we do."""
    src = source
    if existing is not None:
        src = tmp_path / "src"
        shutil.copytree(source, src)
        (src / "processor_config.json").write_text(json.dumps(existing))
    report = convert(src, tmp_path / "out", "bf16", progress=False)
    pc = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert pc == {**(existing or {}), "feature_extractor": unified_block(20)}
    assert "Gemma4UnifiedAudioFeatureExtractor" in report.processor_config
    fe = transformers.Gemma4UnifiedAudioFeatureExtractor.from_pretrained(tmp_path / "out")
    model, _ = gemma4_mlx.load(tmp_path / "out")
    _, frames, _ = processors(model, pc, "out")
    x = np.random.default_rng(2).standard_normal(93).astype(np.float32)
    ours, mask = frames.frames([x])
    ref = fe(x, return_tensors="np")
    assert frames.samples_per_token == 20 and mask.all()
    assert np.array_equal(ours, ref["input_features"])


def test_drafter_shape_pairs_with_the_12b():
    """The 12B drafter layout (inferred, docs/unified.md §6) pairs with the 12B target and
    has transformers' parameter count, the card's 423 M."""
    d = UNIFIED_DRAFTERS["12b"]
    cfg = AssistantConfig.from_dict(d)
    check_pair(cfg, parse_config(unified_config("12b")).text)
    names = set(transformers.Gemma4UnifiedTextConfig.__dataclass_fields__)
    text = {k: v for k, v in d["text_config"].items() if k in names}
    text.update(global_head_dim=512, num_global_key_value_heads=1)
    hc = transformers.Gemma4UnifiedAssistantConfig(
        text_config=transformers.Gemma4UnifiedTextConfig(**text).to_dict(), backbone_hidden_size=3840
    )
    with torch.device("meta"):
        hf = transformers.Gemma4UnifiedAssistantForCausalLM(hc)
    assert Drafter(cfg).num_parameters() == sum(p.numel() for p in hf.parameters()) == 422_856_960
