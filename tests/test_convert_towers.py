"""The converter with vision and audio towers (docs/multimodal.md §6, docs/quantization.md §6).

One tiny multimodal checkpoint (text + "union" vision tower + audio tower), written
by transformers in float32 and sharded, is converted to bf16, q4, q4_0 and sfp8.
Exactness claims (bit-for-bit, `np.array_equal`):
- quantized recipes, default policy: the towers are stored unquantized in the source
  dtype, so the converted folder's tower outputs equal the source folder's;
- bf16: the converted towers equal the source towers with every tensor but the clamp
  scalars rounded to bf16 (float32 compute), and, loaded at the stored dtype, the
  source loaded with dtype="bfloat16" (bf16 compute);
- text_only loading of a converted folder gives the full model's text logits.
With keep_high_precision=False the quantized tower linears must compute what their
stored weights say (float32 model of the dequantized weights, tight tolerance).
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten, tree_unflatten

from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.config import read_config
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.convert.policy import Policy, classify
from gemma4_mlx.formats.safetensors import read_header
from gemma4_mlx.media.audio import FeatureConfig, log_mel
from gemma4_mlx.media.image import ImageProcessor
from gemma4_mlx.models.layers import CLAMPS, Linear
from gemma4_mlx.models.quantized import QLinear
from gemma4_mlx.models.text import Model

from helpers.dequantize import float_twin
from helpers.faults import convert_fails_at_second_shard
from helpers.mm_configs import AUDIO_TINY, VISION_TINY, build_multimodal

# Widths divisible by 32 and 64 so the text linears quantize too; global_head_dim !=
# head_dim (a transformers 5.24 config then records the full layer's head_dim).
TEXT = dict(
    vocab_size=64,
    vocab_size_per_layer_input=64,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    global_head_dim=32,
    layer_types=["full_attention"],
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
    sliding_window=4,
)
RECIPES = ["bf16", "q4", "q4_0", "sfp8"]
QUANTIZED = ["q4", "q4_0", "sfp8"]
_META = (".scales", ".biases", ".tensor_scale")


# -- checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    hf = build_multimodal(transformers.Gemma4TextConfig(**TEXT).to_dict(), "union")
    path = tmp_path_factory.mktemp("towers") / "src"
    hf.save_pretrained(path, max_shard_size="200KB")  # tower tensors spread over shards
    assert len(list(path.glob("*.safetensors"))) >= 2 and not (path / "processor_config.json").exists()
    return path


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """convert() once per (recipe, keep_high_precision)."""
    root, cache = tmp_path_factory.mktemp("towers-out"), {}

    def get(quant, keep=True):
        if (quant, keep) not in cache:
            dst = root / f"{quant}-{keep}"
            cache[quant, keep] = dst, convert(source, dst, quant, keep_high_precision=keep, progress=False)
        return cache[quant, keep]

    return get


def variant(source, dst, processor_config=None):
    """A copy of the source folder with `processor_config` (a dict, or raw text) added."""
    shutil.copytree(source, dst)
    if processor_config is not None:
        text = processor_config if isinstance(processor_config, str) else json.dumps(processor_config)
        (dst / "processor_config.json").write_text(text)
    return dst


def stored(folder) -> dict[str, mx.array]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(f)))
    return out


def header(folder) -> dict[str, dict]:
    """Every tensor's safetensors header entry (dtype, shape) straight from the files."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(read_header(f)[1])
    return out


def tower_keys(folder) -> set[str]:
    model = Model.from_config(read_config(folder))
    return {k for k, _ in tree_flatten(model.parameters()) if k.startswith(("vision.", "audio."))}


def is_clamp(key: str) -> bool:
    return key.rpartition(".")[2] in CLAMPS


# -- inputs and outputs ------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((50, 80, 3), (120, 30, 3))]
    batch = ImageProcessor(70, patch_size=4)(images)
    t = np.arange(7000) / 16000
    clip = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    features, mask = log_mel([clip])
    return batch.pixel_values, batch.position_ids, features, mask


def towers(model, inputs) -> tuple[np.ndarray, np.ndarray]:
    """(image soft tokens in text space, audio soft tokens), as float32 numpy."""
    pixels, positions, features, mask = inputs
    image, _ = model.vision(pixels, positions)
    audio = model.audio.soft_tokens(features, mask)
    return np.array(image.astype(mx.float32)), np.array(audio.astype(mx.float32))


def rounded(model, dtype):
    """model with every parameter but the clamp scalars rounded to dtype (kept float32)."""
    params = [
        (k, v if is_clamp(k) else v.astype(dtype).astype(mx.float32)) for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    return model


def dequantized(model, config):
    """A float32 model of the same config holding the dequantized weights of `model`."""
    return float_twin(model, Model.from_config(config))


def module(model, path):
    for p, m in model.named_modules():
        if p == path:
            return m
    raise KeyError(path)


# -- what is written -------------------------------------------------------------------


@pytest.mark.parametrize("quant", RECIPES)
def test_tower_tensors_written_under_our_names(source, converted, quant):
    dst, report = converted(quant)
    keys = {k for k in stored(dst) if k.startswith(("vision.", "audio."))}
    assert keys == tower_keys(source)  # nothing quantized (no .scales), nothing missing or extra
    entries = header(dst)
    clamps = [k for k in keys if is_clamp(k)]
    assert len(clamps) == 4 * (7 * VISION_TINY["num_hidden_layers"] + 10 * AUDIO_TINY["num_hidden_layers"])
    assert all(entries[k]["dtype"] == "F32" and entries[k]["shape"] == [] for k in clamps)
    others = {entries[k]["dtype"] for k in keys if not is_clamp(k)}
    assert others == ({"BF16"} if quant == "bf16" else {"F32"})  # recipe dtype / source dtype
    cfg = json.loads((dst / "config.json").read_text())
    record = cfg["gemma4_mlx_conversion"]
    assert record["converted"] == ["text", "vision", "audio"] and report.converted == record["converted"]
    assert "text_only" not in record and "note" not in record and not report.skipped
    if quant != "bf16":
        q = cfg["quantization"]
        towers_ = {k: e for k, e in q["tensors"].items() if k.startswith(("vision.", "audio."))}
        assert {e["class"] for e in towers_.values()} == {"tower_linear", "tower_projection", "embedder"}
        assert all(e["format"] == "float" and e["reason"] == "policy" for e in towers_.values())
        assert q["policy"]["classes"]["clamp_scalars"] == {"format": "float", "dtype": "float32"}
        assert q["tensors"]["model.layers.0.mlp.gate_proj"]["format"] == ("affine" if quant == "q4" else quant)


def test_classes_of_tower_modules():
    expect = {
        "vision.vision_tower.encoder.layers.0.self_attn.q_proj.linear": "tower_linear",
        "vision.vision_tower.encoder.layers.1.mlp.down_proj.linear": "tower_linear",
        "audio.audio_tower.layers.0.feed_forward1.ffw_layer_1.linear": "tower_linear",
        "audio.audio_tower.layers.0.self_attn.post.linear": "tower_linear",
        "audio.audio_tower.layers.1.lconv1d.linear_start.linear": "tower_linear",
        "vision.vision_tower.patch_embedder.input_proj": "tower_projection",
        "audio.audio_tower.subsample_conv_projection.input_proj_linear": "tower_projection",
        "audio.audio_tower.layers.0.self_attn.relative_k_proj": "tower_projection",
        "audio.audio_tower.output_proj": "tower_projection",
        "vision.embed_vision.embedding_projection": "embedder",
        "audio.embed_audio.embedding_projection": "embedder",
        "vision.vision_tower.encoder.layers.0.input_layernorm": "other",
        "audio.audio_tower.subsample_conv_projection.layer0.conv": "other",
        "audio.audio_tower.layers.0.lconv1d.depthwise_conv1d": "other",
        "model.layers.0.self_attn.q_proj": "linear",
    }
    assert {p: classify(p) for p in expect} == expect
    for keep in (True, False):
        p = Policy("q4", keep)
        assert not p.for_class("embedder").quantized and not p.for_class("tower_projection").quantized
        assert p.for_class("tower_linear").quantized is not keep
        assert p.for_class("other") == Policy("q4").for_class("other")
    assert "tower_linear" not in Policy("q4").describe()["classes"]  # text-only checkpoints
    assert Policy("bf16").for_class("tower_linear").dtype == "bfloat16"


def test_clamps_float32_from_bf16_source(source, tmp_path):
    """Official files store the clamp scalars as 0-d bf16: written as float32 anyway."""
    from safetensors.torch import load_file, save_file

    src = variant(source, tmp_path / "src-bf16")
    for f in src.glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
    assert {e["dtype"] for e in header(src).values()} == {"BF16"}
    for quant in ("bf16", "q4"):
        entries = header(convert(src, tmp_path / quant, quant, progress=False).dst)
        clamps = [e for k, e in entries.items() if is_clamp(k)]
        assert clamps and all(e["dtype"] == "F32" and e["shape"] == [] for e in clamps)
        assert entries["vision.vision_tower.patch_embedder.position_embedding_table"]["dtype"] == "BF16"


def test_source_without_clamps(source, tmp_path):
    """Tolerated as by the loader: the bounds stay +-inf (no clamp)."""
    from safetensors.torch import load_file, save_file

    src = variant(source, tmp_path / "src")
    for f in src.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(f).items() if not is_clamp(k)}, f, metadata={"format": "pt"})
    dst = convert(src, tmp_path / "out", "q4", progress=False).dst
    assert not any(is_clamp(k) for k in header(dst))
    model, _ = load_model(dst, dtype="float32")
    assert model.audio.audio_tower.layers[0].self_attn.q_proj.input_max.item() == float("inf")


# -- what it computes --------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(source, inputs):
    model, _ = load_model(source, dtype="float32")
    return towers(model, inputs)


@pytest.mark.parametrize("quant", QUANTIZED)
def test_quantized_recipes_keep_towers_exact(source, converted, inputs, reference, quant):
    dst, _ = converted(quant)
    model, _ = load_model(dst, dtype="float32")
    assert not any(isinstance(m, QLinear) for p, m in model.named_modules() if p.startswith(("vision", "audio")))
    src = dict(tree_flatten(load_model(source, dtype="float32")[0].parameters()))
    for k, v in tree_flatten(model.parameters()):
        if k.startswith(("vision.", "audio.")):
            assert mx.array_equal(v, src[k]).item(), k
    for got, want in zip(towers(model, inputs), reference):
        assert np.array_equal(got, want)


def test_bf16_towers_exact(source, converted, inputs):
    dst, _ = converted("bf16")
    model, _ = load_model(dst, dtype="float32")
    ref = rounded(load_model(source, dtype="float32")[0], mx.bfloat16)
    for got, want in zip(towers(model, inputs), towers(ref, inputs)):
        assert np.array_equal(got, want)
    # at the stored dtype: the same as the loader's own bf16 cast of the source
    model, _ = load_model(dst)
    assert model.vision.dtype == mx.bfloat16
    assert model.vision.vision_tower.encoder.layers[0].self_attn.q_proj.input_min.dtype == mx.float32
    for got, want in zip(towers(model, inputs), towers(load_model(source, dtype="bfloat16")[0], inputs)):
        assert np.array_equal(got, want)


@pytest.mark.parametrize("quant", QUANTIZED)
def test_no_keep_high_precision_quantizes_tower_linears(source, converted, inputs, reference, quant):
    dst, _ = converted(quant, keep=False)
    q = json.loads((dst / "config.json").read_text())["quantization"]
    classes, t = q["policy"]["classes"], q["tensors"]
    assert classes["tower_linear"]["format"] == ("affine" if quant == "q4" else quant)
    assert classes["embedder"]["format"] == classes["tower_projection"]["format"] == "float"
    names = [k for k in t if k.startswith(("vision.", "audio."))]
    assert names
    for k in names:
        quantized = t[k]["format"] != "float"
        assert quantized == (t[k]["class"] == "tower_linear"), (k, t[k])
    keys = stored(dst)
    assert "vision.vision_tower.encoder.layers.0.mlp.up_proj.linear.scales" in keys
    assert not any(k.endswith(_META) and ("embed_vision" in k or "embed_audio" in k) for k in keys)
    model, config = load_model(dst, dtype="float32")
    for path in (
        "vision.vision_tower.encoder.layers.1.self_attn.o_proj.linear",
        "audio.audio_tower.layers.0.lconv1d.linear_end.linear",
    ):
        assert isinstance(module(model, path), QLinear), path
    for path in (
        "vision.embed_vision.embedding_projection",
        "audio.embed_audio.embedding_projection",
        "audio.audio_tower.layers.0.self_attn.relative_k_proj",
    ):
        assert type(module(model, path)) is Linear, path
    got, want = towers(model, inputs), towers(dequantized(model, config), inputs)
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()  # runtime = its stored weights
    for g, w in zip(got, reference):
        assert not np.array_equal(g, w) and np.isfinite(g).all()  # really quantized


def test_text_only_load(converted):
    dst, _ = converted("q4")
    full, _ = load_model(dst, dtype="float32")
    text, _ = load_model(dst, dtype="float32", text_only=True)
    assert "vision" not in text and "audio" not in text and "vision" in full and "audio" in full
    ids = mx.array([[2, 5, 9, 33, 17, 40, 1, 7]])
    assert mx.array_equal(text(ids), full(ids)).item()


# -- processor_config.json ----------------------------------------------------------------


def hf_defaults() -> dict:
    """transformers' Gemma4AudioFeatureExtractor defaults, as JSON would hold them."""
    return json.loads(json.dumps(transformers.Gemma4AudioFeatureExtractor().to_dict(), default=float))


def test_feature_extractor_written_when_missing(converted):
    dst, report = converted("q4")
    pc = json.loads((dst / "processor_config.json").read_text())
    assert pc == {"feature_extractor": hf_defaults()}
    assert FeatureConfig.from_dict(pc) == FeatureConfig()
    assert transformers.Gemma4AudioFeatureExtractor.from_pretrained(dst).to_dict()["fft_length"] == 512
    record = json.loads((dst / "config.json").read_text())["gemma4_mlx_conversion"]
    assert "no processor_config.json" in record["processor_config"] == report.processor_config


def test_feature_extractor_added_to_existing_file(source, tmp_path):
    image = {"image_processor_type": "Gemma4ImageProcessor", "patch_size": 4, "max_soft_tokens": 70}
    src = variant(source, tmp_path / "src", {"processor_class": "Gemma4Processor", "image_processor": image})
    report = convert(src, tmp_path / "out", "bf16", progress=False)
    pc = json.loads((tmp_path / "out" / "processor_config.json").read_text())
    assert pc == {"processor_class": "Gemma4Processor", "image_processor": image, "feature_extractor": hf_defaults()}
    assert "had none" in report.processor_config


def test_feature_extractor_of_the_source_preserved(source, tmp_path):
    block = {**hf_defaults(), "max_frequency": 7600.0, "mel_floor": 1e-5}  # valid, not the default
    src = variant(source, tmp_path / "src", {"feature_extractor": block, "processor_class": "Gemma4Processor"})
    report = convert(src, tmp_path / "out", "q4_0", progress=False)
    out = tmp_path / "out" / "processor_config.json"
    assert out.read_bytes() == (src / "processor_config.json").read_bytes()
    assert FeatureConfig.from_dict(json.loads(out.read_text())).max_frequency == 7600.0
    assert report.processor_config is None
    record = json.loads((tmp_path / "out" / "config.json").read_text())["gemma4_mlx_conversion"]
    assert "processor_config" not in record


# -- atomic output --------------------------------------------------------------------------


def test_failure_mid_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    convert_fails_at_second_shard(monkeypatch, lambda: convert(source, dst, "q4", progress=False))
    assert not dst.exists() and not (tmp_path / "out.partial").exists()
    monkeypatch.undo()
    # after every shard is written: a bad processor_config.json, named in one line
    bad = variant(source, tmp_path / "bad", "{not json")
    with pytest.raises(ConvertError, match=r"bad/processor_config\.json: not valid JSON"):
        convert(bad, dst, "sfp8", progress=False)
    assert not dst.exists() and not (tmp_path / "out.partial").exists()
