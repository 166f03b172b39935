"""GGUF import of the 12B unified model (docs/unified.md §9): llama.cpp's text GGUF (an
ordinary `gemma4` one) plus its `clip` mmproj with the vision and audio embedders.

Both files are written here the way llama.cpp's converter writes them (its
`Gemma4UnifiedModel` / `Gemma4UnifiedVisionAudioModel`, checked against the files that
converter wrote for such a checkpoint: the same tensor names, metadata keys and layouts):
the text tensors under gguf-py's gemma4 names, the mmproj tensors as
`v.patch_embd` (columns in CHW order), `v.patch_norm.1` (CHW order), `v.patch_norm.2`,
`v.position_embd` ([axis, position, D]), `v.patch_norm.3` (pos_norm),
`mm.input_projection`, `mm.a.input_projection`, projector types gemma4uv / gemma4ua.
The imported folder must embed images and audio and compute logits exactly as the
source does."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors.numpy import load_file

import gemma4_mlx
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.media.prepare import Audio, Image, media_prompt

from helpers.checkpoints import randomize
from helpers.unified import AUDIO, EOS, TEXT, VISION, randomize_embedders
from test_gguf_info import gguf_name
from test_gguf_tokenizer import V, _id_layout, add_vocabulary, rope_freqs, write_source_tokenizer

gguf = pytest.importorskip("gguf")

MEDIA = {  # config key -> the control string whose tokenizer id it is
    "image_token_id": "<|image|>",
    "audio_token_id": "<|audio|>",
    "video_token_id": "<|video|>",
    "boi_token_id": "<|image>",
    "eoi_token_id": "<image|>",
    "boa_token_id": "<|audio>",
    "eoa_token_index": "<audio|>",
}


def hf_source(folder):
    """The tiny unified checkpoint with a V-token tokenizer whose media ids the config names."""
    ids = {k: _id_layout()[s] for k, s in MEDIA.items()}
    cfg = transformers.Gemma4UnifiedConfig(
        text_config=transformers.Gemma4UnifiedTextConfig(**{**TEXT, "vocab_size": V}).to_dict(),
        vision_config=transformers.Gemma4UnifiedVisionConfig(**VISION).to_dict(),
        audio_config=transformers.Gemma4UnifiedAudioConfig(**AUDIO).to_dict(),
        eos_token_id=EOS,
        **ids,
    )
    torch.manual_seed(4)
    hf = transformers.Gemma4UnifiedForConditionalGeneration(cfg).eval()
    randomize(hf.model.language_model, 5)
    randomize_embedders(hf, 6)
    hf.lm_head.weight = hf.model.language_model.embed_tokens.weight
    hf.save_pretrained(folder)
    write_source_tokenizer(folder)
    return ids


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def text_gguf(src, path):
    """The decoder as llama.cpp writes the 12B's: arch gemma4, K = V full layers without
    attn_v, per-layer KV heads, no PLE, F32 tensors, rope_freqs for factor 0.25."""
    model, _ = gemma4_mlx.load(src, dtype="float32", text_only=True, fuse=False)  # named as in the checkpoint
    types = TEXT["layer_types"]
    w = gguf.GGUFWriter(path, "gemma4")
    w.add_uint32("gemma4.block_count", len(types))
    w.add_uint32("gemma4.context_length", 262144)
    w.add_uint32("gemma4.embedding_length", TEXT["hidden_size"])
    w.add_uint32("gemma4.feed_forward_length", TEXT["intermediate_size"])
    w.add_uint32("gemma4.attention.head_count", TEXT["num_attention_heads"])
    kv = [TEXT["num_key_value_heads"] if t.startswith("sliding") else TEXT["num_global_key_value_heads"] for t in types]
    w.add_array("gemma4.attention.head_count_kv", kv)
    w.add_float32("gemma4.rope.freq_base", 1000000.0)
    w.add_float32("gemma4.rope.freq_base_swa", 10000.0)
    w.add_float32("gemma4.attention.layer_norm_rms_epsilon", TEXT["rms_norm_eps"])
    for k, v in (("key_length", "global_head_dim"), ("value_length", "global_head_dim")):
        w.add_uint32(f"gemma4.attention.{k}", TEXT[v])
        w.add_uint32(f"gemma4.attention.{k}_swa", TEXT["head_dim"])
    w.add_float32("gemma4.final_logit_softcapping", TEXT["final_logit_softcapping"])
    w.add_uint32("gemma4.attention.sliding_window", TEXT["sliding_window"])
    w.add_uint32("gemma4.attention.shared_kv_layers", 0)
    w.add_uint32("gemma4.embedding_length_per_layer_input", 0)
    w.add_array("gemma4.attention.sliding_window_pattern", [t.startswith("sliding") for t in types])
    w.add_uint32("gemma4.rope.dimension_count", TEXT["global_head_dim"])
    w.add_uint32("gemma4.rope.dimension_count_swa", TEXT["head_dim"])
    add_vocabulary(w, src)
    for key, p in tree_flatten(model.parameters()):
        w.add_tensor(gguf_name(key), np.array(p.astype(mx.float32)))
    w.add_tensor("rope_freqs.weight", rope_freqs(0.25, TEXT["global_head_dim"]))
    _finish(w)


def hwc_index_of_chw(side: int) -> np.ndarray:
    """For each position of a CHW-flattened patch, its index in the HWC flattening."""
    return np.arange(side * side * 3).reshape(side, side, 3).transpose(2, 0, 1).reshape(-1)


def mmproj_gguf(src, path, projector="gemma4uv"):
    """The embedders as llama.cpp's mmproj: CHW columns, [axis, position, D] table,
    pos_norm as patch_norm.3, the projections under mm.* / mm.a.*."""
    sd = {k: v for k, v in load_file(src / "model.safetensors").items() if not k.startswith("model.language_model")}
    side = VISION["patch_size"] * VISION["pooling_kernel_size"]
    perm = hwc_index_of_chw(side)
    names = {
        "patch_ln1": "v.patch_norm.1",
        "patch_dense": "v.patch_embd",
        "patch_ln2": "v.patch_norm.2",
        "pos_norm": "v.patch_norm.3",
    }
    w = gguf.GGUFWriter(path, "clip")
    w.add_string("general.type", "mmproj")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", TEXT["hidden_size"])
    w.add_uint32("clip.vision.image_size", 224)
    w.add_uint32("clip.vision.patch_size", VISION["patch_size"])
    w.add_uint32("clip.vision.embedding_length", VISION["mm_embed_dim"])
    w.add_bool("clip.has_audio_encoder", True)
    w.add_uint32("clip.audio.embedding_length", AUDIO["audio_embed_dim"])
    w.add_string("clip.vision.projector_type", projector)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_string("clip.audio.projector_type", "gemma4ua")
    w.add_uint32("clip.audio.num_mel_bins", 128)
    for k, v in sd.items():
        leaf = k.rsplit(".", 2)
        if "pos_embedding" in k:
            w.add_tensor("v.position_embd.weight", np.ascontiguousarray(v.transpose(1, 0, 2)))
        elif "audio" in k:
            w.add_tensor("mm.a.input_projection.weight", v)
        elif "embedding_projection" in k:
            w.add_tensor("mm.input_projection.weight", v)
        else:
            if leaf[-2] in ("patch_dense", "patch_ln1") and v.shape[-1] == 3 * side * side:
                v = np.ascontiguousarray(v[..., perm])
            w.add_tensor(f"{names[leaf[-2]]}.{leaf[-1]}", v)
    _finish(w)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_unified")
    ids = hf_source(root / "src")
    text_gguf(root / "src", root / "model.gguf")
    mmproj_gguf(root / "src", root / "mmproj-model.gguf")
    return root, ids


@pytest.fixture(scope="module")
def imported(files):
    root, _ = files
    report = convert(root / "model.gguf", root / "out", "q4_0", progress=False, mmproj=root / "mmproj-model.gguf")
    return root / "out", report


def test_mmproj_has_every_embedder_tensor(files):
    reader = gguf.GGUFReader(files[0] / "mmproj-model.gguf")
    assert len(reader.tensors) == 11


def test_config_and_record(files, imported):
    root, ids = files
    out, report = imported
    cfg = json.loads((out / "config.json").read_text())
    src = json.loads((root / "src" / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_unified" and cfg["text_config"]["model_type"] == "gemma4_unified_text"
    assert {k: cfg[k] for k in ids} == ids
    for part in ("vision_config", "audio_config"):
        assert all(cfg[part][k] == pytest.approx(src[part][k]) for k in cfg[part]), part
    assert report.converted[:3] == ["text", "vision", "audio"]
    record = cfg["gemma4_mlx_conversion"]
    assert record["text_only"] is False and record["mmproj_file"] == "mmproj-model.gguf"


def test_embedders_and_logits_equal_the_source(files, imported):
    """Soft tokens bit-identical (the F32 tensors, unpermuted), logits of an image prompt
    and of an audio prompt equal to the source's (F32 everywhere)."""
    root, ids = files
    ours, _ = gemma4_mlx.load(imported[0], dtype="float32")
    src, _ = gemma4_mlx.load(root / "src", dtype="float32")
    img = np.random.default_rng(0).integers(0, 256, (84, 108, 3), dtype=np.uint8)  # 7 x 9 merged patches
    wave = np.random.default_rng(1).standard_normal(183).astype(np.float32) * 0.3
    prompts = [
        (
            [2, 40, 41, ids["boi_token_id"]] + [ids["image_token_id"]] * 63 + [ids["eoi_token_id"], 50],
            {"images": [Image(img, 70)]},
        ),
        (
            [2, 40, ids["boa_token_id"]] + [ids["audio_token_id"]] * 10 + [ids["eoa_token_index"], 50],
            {"audio": [Audio(wave)]},
        ),
    ]
    for prompt, media in prompts:
        got, want = (media_prompt(m, None, prompt, **media)[1] for m in (ours, src))
        assert np.array_equal(np.array(got.rows), np.array(want.rows))
        a = np.array(ours(mx.array([prompt]), media=got))
        b = np.array(src(mx.array([prompt]), media=want))
        assert np.abs(b).max() > 0.5 and np.array_equal(a, b)


def test_wrong_projector_and_misuse_are_one_line(files, tmp_path):
    root, _ = files
    mmproj_gguf(root / "src", tmp_path / "mm.gguf", projector="gemma4v")
    with pytest.raises(ConvertError, match=r"mm\.gguf: clip\.vision\.projector_type is 'gemma4v', expected 'gemma4uv'"):
        convert(root / "model.gguf", tmp_path / "out", "q4_0", progress=False, mmproj=tmp_path / "mm.gguf")
    with pytest.raises(ConvertError, match="an mmproj goes with a GGUF source"):
        convert(root / "src", tmp_path / "out", "q4_0", progress=False, mmproj=root / "mmproj-model.gguf")
    assert not (tmp_path / "out").exists()


def test_cli_takes_the_mmproj(files, tmp_path):
    from typer.testing import CliRunner

    from gemma4_mlx.cli import app

    root, _ = files
    args = ["convert", str(root / "model.gguf"), str(tmp_path / "out"), "-q", "q4_0", "--mmproj"]
    r = CliRunner().invoke(app, [*args, str(root / "mmproj-model.gguf")])
    assert r.exit_code == 0, r.output
    assert "converted: text, vision, audio" in r.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vision_config"]["pooling_kernel_size"] == 3


def test_q8_0_mmproj_decoded_exactly(files, tmp_path):
    """llama.cpp's `--outtype q8_0` quantizes an mmproj's matrices whose rows are whole
    Q8_0 blocks (the 12B's are): they import as ggml's exact float32 values, the patch
    columns still un-permuted.  Geometry here: 4-px patches merged 4 x 4 (768 inputs),
    embedder width 32, frames of 32 samples."""
    from gguf.quants import dequantize, quantize

    root, _ = files
    rng = np.random.default_rng(7)
    side, D, A = 16, 32, 32
    dense = rng.standard_normal((D, 3 * side * side)).astype(np.float32)
    proj_v, proj_a = (rng.standard_normal((TEXT["hidden_size"], n)).astype(np.float32) for n in (D, A))
    q8 = gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(tmp_path / "mm.gguf", "clip")
    w.add_uint32("clip.vision.patch_size", 4)
    w.add_string("clip.vision.projector_type", "gemma4uv")
    w.add_string("clip.audio.projector_type", "gemma4ua")
    stored = {}
    for name, v in (
        ("v.patch_embd.weight", dense[:, hwc_index_of_chw(side)]),
        ("mm.input_projection.weight", proj_v),
        ("mm.a.input_projection.weight", proj_a),
    ):
        q = quantize(np.ascontiguousarray(v), q8)
        stored[name] = dequantize(q, q8)
        w.add_tensor(name, q, raw_dtype=q8)
    for name, n in (("v.patch_norm.1", 3 * side * side), ("v.patch_norm.2", D), ("v.patch_norm.3", D)):
        w.add_tensor(f"{name}.weight", np.ones(n, np.float32))
        w.add_tensor(f"{name}.bias", np.zeros(n, np.float32))
    w.add_tensor("v.patch_embd.bias", np.zeros(D, np.float32))
    w.add_tensor("v.position_embd.weight", rng.standard_normal((2, 30, D)).astype(np.float32))
    _finish(w)
    convert(root / "model.gguf", tmp_path / "out", "q4_0", progress=False, mmproj=tmp_path / "mm.gguf")
    model, _ = gemma4_mlx.load(tmp_path / "out")
    assert model.vision.config.pooling_kernel_size == 4 and model.audio.config.audio_embed_dim == A
    inverse = np.argsort(hwc_index_of_chw(side))
    got = np.array(model.vision.vision_embedder.patch_dense.weight)
    assert got.dtype == np.float32 and np.array_equal(got, stored["v.patch_embd.weight"][:, inverse])
    assert np.abs(got - dense).max() < 0.05  # Q8_0 of N(0, 1) values: about d / 2
    assert np.array_equal(
        np.array(model.vision.embed_vision.embedding_projection.weight), stored["mm.input_projection.weight"]
    )
    assert np.array_equal(
        np.array(model.audio.embed_audio.embedding_projection.weight), stored["mm.a.input_projection.weight"]
    )
