"""GGUF import (`convert/gguf.py`) and `gemma4-mlx info` (`gemma4_mlx/info.py`).

The GGUF is written here from a tiny float model quantized with ggml's rule, so the
expected codes, scales and dequantized weights are known exactly.
"""

import json
import re
import struct

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx.config import TextConfig
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.formats import q4_0
from gemma4_mlx.models.text import Model

S, F = "sliding_attention", "full_attention"
CFG = dict(
    vocab_size=256,
    hidden_size=64,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    num_key_value_heads=2,
    sliding_window=4,
    final_logit_softcapping=30.0,
    rms_norm_eps=1e-6,
    num_hidden_layers=4,
    layer_types=[S, F, S, F],
    intermediate_size=96,
    hidden_size_per_layer_input=32,
    vocab_size_per_layer_input=256,
    num_kv_shared_layers=0,
    rope_parameters={
        S: {"rope_type": "default", "rope_theta": 10000.0},
        F: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
)
# Our parameter path -> GGUF name (written independently of convert/gguf.py's table)
GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "model.embed_tokens_per_layer.weight": "per_layer_token_embd.weight",
    "model.per_layer_model_projection.weight": "per_layer_model_proj.weight",
    "model.per_layer_projection_norm.weight": "per_layer_proj_norm.weight",
}
BLOCK = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "per_layer_input_gate.weight": "inp_gate.weight",
    "per_layer_projection.weight": "proj.weight",
    "post_per_layer_input_norm.weight": "post_norm.weight",
    "layer_scalar": "layer_output_scale.weight",
}
F16_TENSORS = {"model.embed_tokens_per_layer.weight"}  # exercises the F16 path
BF16_TENSORS = {"model.per_layer_model_projection.weight"}  # and BF16 (kept high precision)


def gguf_name(key):
    if key in GLOBAL:
        return GLOBAL[key]
    _, _, i, rest = key.split(".", 3)
    return f"blk.{i}.{BLOCK[rest]}"


def _s(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key, value):
    if isinstance(value, bool):
        return _s(key) + struct.pack("<IB", 7, value)
    if isinstance(value, int):
        return _s(key) + struct.pack("<II", 4, value)
    if isinstance(value, float):
        return _s(key) + struct.pack("<If", 6, value)
    if isinstance(value, str):
        return _s(key) + struct.pack("<I", 8) + _s(value)
    if isinstance(value, list) and all(isinstance(v, bool) for v in value):
        return _s(key) + struct.pack("<IIQ", 9, 7, len(value)) + bytes(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return _s(key) + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_s(v) for v in value)
    if isinstance(value, list):  # int32 array
        return _s(key) + struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i", *value)
    raise TypeError(value)


def write_gguf(path, metadata, tensors):
    """GGUF v3; tensors: [(name, ggml type id, numpy shape, raw bytes)], 32-byte alignment."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_kv(k, v) for k, v in metadata.items())
    off, infos, blobs = 0, b"", b""
    for name, tid, shape, data in tensors:
        dims = list(reversed(shape))  # GGUF lists dims fastest-first
        infos += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", tid, off)
        pad = -len(data) % 32
        blobs += data + b"\0" * pad
        off += len(data) + pad
    head += infos
    head += b"\0" * (-len(head) % 32)
    path.write_bytes(head + blobs)


def metadata(**over):
    md = {
        "general.architecture": "gemma4",
        "general.alignment": 32,
        "gemma4.block_count": 4,
        "gemma4.embedding_length": 64,
        "gemma4.feed_forward_length": 96,
        "gemma4.attention.head_count": 4,
        "gemma4.attention.head_count_kv": [2, 2, 2, 2],
        "gemma4.attention.key_length": 32,
        "gemma4.attention.value_length": 32,
        "gemma4.attention.key_length_swa": 16,
        "gemma4.attention.sliding_window": 4,
        "gemma4.attention.sliding_window_pattern": [True, False, True, False],
        "gemma4.rope.freq_base": 1000000.0,
        "gemma4.rope.freq_base_swa": 10000.0,
        "gemma4.final_logit_softcapping": 30.0,
        "gemma4.attention.layer_norm_rms_epsilon": 1e-6,
        "gemma4.embedding_length_per_layer_input": 32,
        "tokenizer.ggml.model": "gemma4",
    }
    md.update(over)
    return {k: v for k, v in md.items() if v is not None}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, written Q4_0 (d, q) per key, float32 reference model)."""
    rng = np.random.default_rng(0)
    ref = Model(TextConfig.from_dict(dict(CFG)))
    params, written, tensors = {}, {}, []
    for key, p in tree_flatten(ref.parameters()):
        if "norm" in key or key.endswith("layer_scalar"):
            w = rng.uniform(0.5, 1.5, p.shape).astype(np.float32)
            tensors.append((gguf_name(key), 0, p.shape, w.tobytes()))
        elif key in F16_TENSORS:
            w = (rng.standard_normal(p.shape) * 0.05).astype(np.float16)
            tensors.append((gguf_name(key), 1, p.shape, w.tobytes()))
        elif key in BF16_TENSORS:
            w = (rng.standard_normal(p.shape) * 0.05).astype(np.float32)
            bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact in bf16
            w = (bits.astype(np.uint32) << 16).view(np.float32)
            tensors.append((gguf_name(key), 30, p.shape, bits.tobytes()))
        else:
            d, q = q4_0.quantize((rng.standard_normal(p.shape) * 0.05).astype(np.float32))
            written[key] = (d, q)
            w = q4_0.dequantize(d, q)
            tensors.append((gguf_name(key), 2, p.shape, q4_0.pack(d, q).tobytes()))
        params[key] = mx.array(np.asarray(w, np.float32))
    ref.load_weights(list(params.items()))
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, metadata(), tensors)
    return path, written, ref, tensors


@pytest.fixture(scope="module")
def imported(tiny, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "tiny-q4_0"
    report = convert(tiny[0], dst, "q4_0", progress=False)
    return dst, report


def test_import_codes_and_scales_bit_exact(tiny, imported):
    _, written, _, _ = tiny
    dst, _ = imported
    stored = mx.load(str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    for key, (d, q) in written.items():
        module = key[: -len(".weight")]
        want_w, want_s, _ = q4_0.to_mlx_affine(d, q, "float16")
        assert stored[module + ".scales"].dtype == mx.float16
        assert np.array_equal(np.array(stored[module + ".scales"]).view(np.uint16), d.view(np.uint16)), key
        assert np.array_equal(np.array(stored[module + ".weight"]), np.array(want_w)), key
        assert cfg["quantization"]["tensors"][module]["format"] == "q4_0"
    assert stored["model.embed_tokens_per_layer.weight"].dtype == mx.float16
    assert stored["model.per_layer_model_projection.weight"].dtype == mx.bfloat16
    assert stored["model.norm.weight"].dtype == mx.float32
    assert cfg["layer_types"] == [S, F, S, F] and cfg["global_head_dim"] == 32


def test_imported_model_matches_dequantized_float32(tiny, imported):
    _, _, ref, _ = tiny
    model, _ = gemma4_mlx.load(imported[0], dtype="float32")
    ids = mx.array([[2] + np.random.default_rng(1).integers(3, 256, 19).tolist()])
    got, want = np.array(model(ids)[0]), np.array(ref(ids)[0])
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    print(f"max |logit diff| / max |logit| = {err:.2e} (logit scale {scale:.2f})")
    assert err < 1e-4


def test_unsupported_type_and_truncated_file(tiny, tmp_path):
    _, _, _, tensors = tiny
    bad = [(n, 12, s, d) if n == "blk.1.ffn_up.weight" else (n, t, s, d) for n, t, s, d in tensors]
    write_gguf(tmp_path / "q4k.gguf", metadata(), bad)  # Q4_K type id, bytes irrelevant
    with pytest.raises(ConvertError, match=r"q4k\.gguf.*tensor blk\.1\.ffn_up\.weight.*Q4_K"):
        convert(tmp_path / "q4k.gguf", tmp_path / "o1", "q4_0", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o1.partial").exists()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny[0].read_bytes()[:-100])
    with pytest.raises(ConvertError, match=r"cut\.gguf: file is truncated: tensor \S+ needs"):
        convert(cut, tmp_path / "o2", "q4_0", progress=False)
    cut.write_bytes(tiny[0].read_bytes()[:200])
    with pytest.raises(ConvertError, match=r"cut\.gguf: file is truncated inside the GGUF header"):
        convert(cut, tmp_path / "o3", "q4_0", progress=False)


def test_missing_metadata_key_and_wrong_recipe(tiny, tmp_path):
    _, _, _, tensors = tiny
    write_gguf(tmp_path / "m.gguf", metadata(**{"gemma4.rope.freq_base": None}), tensors)
    with pytest.raises(ConvertError, match=r"m\.gguf: metadata key gemma4\.rope\.freq_base is missing"):
        convert(tmp_path / "m.gguf", tmp_path / "o", "q4_0", progress=False)
    with pytest.raises(ConvertError, match=r"use --quant q4_0"):
        convert(tiny[0], tmp_path / "o", "q8", progress=False)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("block_count", "four"),
        ("embedding_length", "x"),
        ("feed_forward_length", []),
        ("attention.head_count", []),
        ("rope.freq_base", "big"),
        ("attention.sliding_window", [4, 4]),
        ("block_count", float("inf")),  # int(inf) is an OverflowError
        ("rope.freq_base", float("nan")),
    ],
)
def test_metadata_values_of_the_wrong_type_are_named(tiny, tmp_path, key, value):
    """A value llama.cpp would not write (a string for a count, an empty per-layer
    list, a list for a scalar) is one line naming the key, not a traceback."""
    write_gguf(tmp_path / "m.gguf", metadata(**{f"gemma4.{key}": value}), tiny[3])
    with pytest.raises(ConvertError, match=rf"m\.gguf: metadata key gemma4\.{re.escape(key)} is .*, expected"):
        convert(tmp_path / "m.gguf", tmp_path / "o", "q4_0", progress=False)
    assert not (tmp_path / "o").exists()


def test_reader_metadata_types(tmp_path):
    from gemma4_mlx.convert.gguf_read import GGUFFile

    md = {"a.u32": 7, "a.f32": 0.5, "a.bool": True, "a.str": "x", "a.arr": [1, -2, 3], "a.tok": ["<bos>", "é"]}
    write_gguf(tmp_path / "t.gguf", md, [("t.weight", 0, (3, 2), np.arange(6, dtype=np.float32).tobytes())])
    g = GGUFFile(tmp_path / "t.gguf")
    assert g.metadata == md and g.tensors["t.weight"].shape == (3, 2)
    assert np.array_equal(g.raw("t.weight"), np.arange(6, dtype=np.float32).reshape(3, 2))


# -- info ---------------------------------------------------------------------------


def test_info_bytes_add_up_and_modes(imported):
    from gemma4_mlx.checkpoint.info import model_info

    dst, _ = imported
    info = model_info(dst, load=True)
    comps = info["components"]
    files = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
    assert sum(c["bytes"] for c in comps.values()) + info["header_bytes"] == files == info["total_bytes"]
    assert comps["attention"]["modes"] == ["q4_0"] and comps["mlp"]["modes"] == ["q4_0"]
    assert comps["per_layer_embeddings"]["modes"] == ["bfloat16", "float16", "q4_0"]
    assert comps["attention"]["params"] == sum(
        4 * 64 * (16 if i % 2 == 0 else 32)
        + 2 * 2 * 64 * (16 if i % 2 == 0 else 32)
        + 64 * 4 * (16 if i % 2 == 0 else 32)
        for i in range(4)
    )
    assert info["resident_bytes"] > 0


def test_info_cli_json(imported):
    from typer.testing import CliRunner

    from gemma4_mlx.cli import app

    r = CliRunner().invoke(app, ["info", str(imported[0]), "--json", "--no-load"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["resident_bytes"] is None and data["components"]["embedding"]["modes"] == ["q4_0"]
    r = CliRunner().invoke(app, ["info", str(imported[0]), "--no-load"])
    assert r.exit_code == 0 and "attention" in r.stdout
