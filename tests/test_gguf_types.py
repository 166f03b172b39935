"""GGUF import of the non-Q4_0 ggml types (`convert/gguf.py`, docs/quantization.md §3.4, §4.4).

Reference: llama.cpp's own gguf-py (`gguf.quants`), an independent implementation
used here only.  Exact types (Q8_0, Q4_1, Q5_0, Q5_1) must dequantize to gguf-py's
values exactly; Q6_K must dequantize to them exactly before it is rounded to fp16
and handed to the class policy (embedding: 8-bit affine g64, PLE table: fp16).
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx.config import TextConfig
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.convert import gguf_blocks as G
from gemma4_mlx.convert.gguf_read import block_size
from gemma4_mlx.models.text import Model

from test_gguf_info import CFG, gguf_name, metadata, write_gguf

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize as ref_dequantize  # noqa: E402
from gguf.quants import quantize as ref_quantize  # noqa: E402

BITS = {"Q8_0": 8, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}
TYPE_ID = {"F32": 0, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q6_K": 14}


def random_q6_k(rng, n_blocks, d_scale=None):
    """Random Q6_K super-blocks: random ql/qh/int8 scales (full range), finite fp16 d."""
    raw = rng.integers(0, 256, (n_blocks, 210), dtype=np.uint8)
    if d_scale is None:  # any finite fp16, incl. subnormals and negatives
        bits = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] &= 0x83FF  # Inf/NaN exponent -> subnormal
        d = bits.view(np.float16)
    else:
        d = (rng.uniform(0.5, 1.0, n_blocks) * d_scale * rng.choice([-1, 1], n_blocks)).astype(np.float16)
    raw[:, 208:210] = d[:, None].view(np.uint8)
    return raw


def test_q6_k_dequantize_bit_exact_vs_gguf():
    rng = np.random.default_rng(0)
    raw = random_q6_k(rng, 3 * 5 * 4)
    raw[0, 192:208] = np.array([-128, 127] * 8, np.int8).view(np.uint8)  # extreme sub-scales
    raw[1, :192] = 0xFF  # q = 63 everywhere, and q = 0 below
    raw[2, :192] = 0
    ours = G.dequantize("Q6_K", raw.reshape(3, 5, 4, 210))
    want = ref_dequantize(raw.reshape(-1), T.Q6_K).reshape(3, 5, 4 * 256)
    assert ours.dtype == np.float32 and ours.shape == want.shape
    assert np.array_equal(ours.view(np.uint32), want.view(np.uint32))  # bit for bit, signed zeros too


@pytest.mark.parametrize("ttype", list(BITS))
def test_exact_types_dequantize_exactly_as_mlx_affine(ttype):
    """Blocks from gguf-py's quantizer and random bytes (every code, e.g. Q8_0's -128
    that ggml never writes) -> MLX affine g32; mx.dequantize in fp32 == gguf-py."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    _, nb = block_size(ttype)
    quantized = ref_quantize(w, getattr(T, ttype)).reshape(16, 8, nb)
    noise = rng.integers(0, 256, (16, 8, nb), dtype=np.uint8)
    d = (rng.standard_normal((16, 8)) * 1e-3).astype(np.float16)  # finite, both signs
    noise[..., 0:2] = d[..., None].view(np.uint8)
    if ttype in ("Q4_1", "Q5_1"):
        noise[..., 2:4] = (rng.standard_normal((16, 8, 1)) * 0.1).astype(np.float16).view(np.uint8)
    for raw in (quantized, noise):
        want = ref_dequantize(raw.reshape(16, -1), getattr(T, ttype))
        assert np.array_equal(G.dequantize(ttype, raw), want)  # values (-0 == +0)
        codes, s, b = G.affine_blocks(ttype, raw)
        assert np.array_equal(s.astype(np.float16).astype(np.float32), s)  # the file's fp16 d
        assert np.array_equal(b.astype(np.float16).astype(np.float32), b)  # -128d / -16d / m: exact in fp16
        wq = mx.array(G.pack_codes(codes.reshape(16, -1), BITS[ttype]))
        for dt in (mx.float16, mx.float32):  # as stored (fp16), upcast at load
            got = mx.dequantize(
                wq,
                mx.array(s).astype(dt).astype(mx.float32),
                mx.array(b).astype(dt).astype(mx.float32),
                32,
                BITS[ttype],
                dtype=mx.float32,
            )
            assert np.array_equal(np.array(got), want), ttype


def test_q8_0_large_d_falls_back_to_fp32_metadata():
    rng = np.random.default_rng(2)
    raw = rng.integers(0, 256, (4, 2, 34), dtype=np.uint8)
    raw[..., 0:2] = np.full((4, 2, 1), 1000.0, np.float16).view(np.uint8)  # -128d overflows fp16
    arrays, entry = G.affine_transfer("m", raw, "Q8_0")
    assert entry["scale_dtype"] == "float32" and arrays["m.biases"].dtype == mx.float32
    got = mx.dequantize(arrays["m.weight"], arrays["m.scales"], arrays["m.biases"], 32, 8, dtype=mx.float32)
    assert np.array_equal(np.array(got), ref_dequantize(raw.reshape(4, -1), T.Q8_0))


# -- end to end -------------------------------------------------------------------------
# hidden 256 so that Q6_K (256-element rows) fits token_embd and, with 4 x 64 PLE
# dims, the PLE table.  Every exact type appears on some matrix.
H, PLE = 256, 64
CFG2 = dict(CFG, hidden_size=H, hidden_size_per_layer_input=PLE)
MD2 = dict(**{"gemma4.embedding_length": H, "gemma4.embedding_length_per_layer_input": PLE})
EMBED, PLE_TABLE = "model.embed_tokens.weight", "model.embed_tokens_per_layer.weight"
BY_SUFFIX = {
    "q_proj": "Q8_0",
    "o_proj": "Q8_0",
    "up_proj": "Q8_0",
    "k_proj": "Q5_0",
    "v_proj": "Q5_1",
    "gate_proj": "Q4_1",
    "down_proj": "Q4_0",
    "per_layer_input_gate": "Q4_0",
    "per_layer_projection": "Q8_0",
    "per_layer_model_projection": "Q8_0",
}


def ggml_type(key):
    if key in (EMBED, PLE_TABLE):
        return "Q6_K"
    if key == "model.norm.weight":
        return "Q8_0"  # a block-typed norm: dequantized exactly to fp32
    if "norm" in key or key.endswith("layer_scalar"):
        return "F32"
    return BY_SUFFIX[key.rsplit(".", 2)[-2]]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """(gguf path, {key: ggml type}, {key: gguf-py's float32 values}, tensors as written)."""
    rng = np.random.default_rng(3)
    ref = Model(TextConfig.from_dict(dict(CFG2)))
    types, values, tensors = {}, {}, []
    for key, p in tree_flatten(ref.parameters()):
        tt = types[key] = ggml_type(key)
        shape = tuple(p.shape)
        if tt == "F32":
            w = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            data = w.tobytes()
        elif tt == "Q6_K":  # |value| <= 128 * 32 * d: about the size of real embeddings
            raw = random_q6_k(rng, int(np.prod(shape)) // 256, d_scale=2e-5)
            data, w = raw.tobytes(), ref_dequantize(raw.reshape(-1), T.Q6_K).reshape(shape)
        else:
            x = rng.uniform(0.5, 1.5, shape) if "norm" in key else rng.standard_normal(shape) * 0.05
            raw = ref_quantize(x.astype(np.float32), getattr(T, tt))
            data, w = raw.tobytes(), ref_dequantize(raw, getattr(T, tt)).reshape(shape)
        values[key] = np.asarray(w, np.float32)
        tensors.append((gguf_name(key), TYPE_ID[tt], shape, data))
    tensors.sort(key=lambda t: t[0] == "token_embd.weight")  # Q6_K embedding last (truncation test)
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    write_gguf(path, metadata(**MD2), tensors)
    return path, types, values, tensors


@pytest.fixture(scope="module")
def mixed_imported(mixed, tmp_path_factory):
    dst = tmp_path_factory.mktemp("out") / "mixed-q4_0"
    report = convert(mixed[0], dst, "q4_0", progress=False)
    return dst, report, json.loads((dst / "config.json").read_text())["quantization"]["tensors"]


def _float_model(values):
    m = Model(TextConfig.from_dict(dict(CFG2)))
    m.load_weights([(k, mx.array(v)) for k, v in values.items()])
    return m


def _logits(model, ids):
    return np.array(model(ids)[0]).astype(np.float64)


def test_mixed_entries_and_exact_tensors(mixed, mixed_imported):
    _, types, values, _ = mixed
    dst, report, entries = mixed_imported
    stored = mx.load(str(dst / "model.safetensors"))
    for key, tt in types.items():
        module = key[: -len(".weight")]
        if tt in BITS and "norm" not in key:
            e = entries[module]
            assert (e["format"], e["bits"], e["group_size"], e["provenance"]) == (
                "affine",
                BITS[tt],
                32,
                f"gguf-{tt.lower()}",
            ), key
            assert stored[module + ".scales"].dtype == mx.float16 == stored[module + ".biases"].dtype
            got = mx.dequantize(
                stored[module + ".weight"],
                stored[module + ".scales"].astype(mx.float32),
                stored[module + ".biases"].astype(mx.float32),
                32,
                BITS[tt],
                dtype=mx.float32,
            )
            assert np.array_equal(np.array(got), values[key]), key  # exact, not close
    assert stored["model.norm.weight"].dtype == mx.float32
    assert np.array_equal(np.array(stored["model.norm.weight"]), values["model.norm.weight"])
    emb = entries["model.embed_tokens"]
    assert (emb["format"], emb["bits"], emb["group_size"], emb["source_type"]) == ("affine", 8, 64, "Q6_K")
    assert emb["provenance"] == "gguf-q6_k dequantized, re-quantized to affine 8-bit g64"
    assert "no exact MLX quantized form" in emb["deviation"] and stored["model.embed_tokens.scales"].dtype == mx.float16
    ple = entries["model.embed_tokens_per_layer"]
    assert (ple["format"], ple["dtype"], ple["provenance"]) == ("float", "float16", "gguf-q6_k dequantized")
    assert stored[PLE_TABLE].dtype == mx.float16
    assert np.array_equal(np.array(stored[PLE_TABLE]), values[PLE_TABLE].astype(np.float16))
    assert 0 < ple["rel_rms_error"] < 2**-11  # fp16 rounding only


def test_q6_k_embedding_requantization_error_bounded(mixed, mixed_imported):
    """Each element is within one 8-bit step of ggml's value (MLX's affine grid keeps
    zero exactly representable, which can leave the far edge of a group up to a step
    off instead of half a step), plus the fp16 rounding of the input, scale and bias
    (each <= 2^-11 of the group's magnitude)."""
    values = mixed[2][EMBED]
    dst, _, entries = mixed_imported
    stored = mx.load(str(dst / "model.safetensors"))
    s = np.array(stored["model.embed_tokens.scales"].astype(mx.float32))
    b = np.array(stored["model.embed_tokens.biases"].astype(mx.float32))
    got = np.array(
        mx.dequantize(stored["model.embed_tokens.weight"], mx.array(s), mx.array(b), 64, 8, dtype=mx.float32)
    )
    err = np.abs(got - values).reshape(*s.shape, 64)
    mag = np.abs(values).reshape(*s.shape, 64).max(-1, keepdims=True)
    assert (err <= np.abs(s)[..., None] + 3 * 2**-11 * mag).all()  # MLX may pick s < 0
    rel = np.sqrt(((got - values) ** 2).sum() / (values**2).sum())
    print(f"Q6_K embedding -> affine 8-bit g64: relative RMS error {rel:.2e}")
    assert rel == pytest.approx(entries["model.embed_tokens"]["rel_rms_error"], rel=1e-2)
    assert rel < 0.01  # 8-bit g64 on Q6_K data: ~1/4 of a Q6_K step (docs/quantization.md §5: 0.8% on Gaussians)


@pytest.mark.parametrize("dtype", ["float32", None])
def test_mixed_model_logits(mixed, mixed_imported, dtype):
    """(a) With the imported embedding's own dequantized values and the fp16 PLE table
    substituted, the float32 reference must match to arithmetic noise: every other
    tensor is exact — also loaded as stored (dtype None: fp16 scales, whose prompt
    rows and embedding lookups are dequantized in float32 as the one-row kernel is).
    (b) Against gguf-py's exact values everywhere the difference is the embedding's
    re-quantization.  This random model amplifies embedding noise
    (several x in relative logit error), so the bound is relative to a control: the
    same model with Gaussian noise of the recorded relative RMS error added to the
    exact embedding must move the logits about as much (within 2x)."""
    _, _, values, _ = mixed
    dst, _, entries = mixed_imported
    model, _ = gemma4_mlx.load(dst, dtype=dtype)
    stored = mx.load(str(dst / "model.safetensors"))
    as_imported = dict(values)
    as_imported[EMBED] = np.array(
        mx.dequantize(
            stored["model.embed_tokens.weight"],
            stored["model.embed_tokens.scales"].astype(mx.float32),
            stored["model.embed_tokens.biases"].astype(mx.float32),
            64,
            8,
            dtype=mx.float32,
        )
    )
    as_imported[PLE_TABLE] = values[PLE_TABLE].astype(np.float16).astype(np.float32)
    e = entries["model.embed_tokens"]["rel_rms_error"]
    rng = np.random.default_rng(4)
    noisy = dict(values)
    emb = values[EMBED]
    noisy[EMBED] = emb + rng.standard_normal(emb.shape).astype(np.float32) * e * np.sqrt((emb**2).mean())
    ids = mx.array([[2] + rng.integers(3, 256, 19).tolist()])
    got = _logits(model, ids)
    same = _logits(_float_model(as_imported), ids)
    exact = _logits(_float_model(values), ids)
    control = _logits(_float_model(noisy), ids)
    err_same = np.abs(got - same).max() / np.abs(same).max()

    def rel(a):
        return np.linalg.norm(a - exact) / np.linalg.norm(exact)

    print(
        f"logits: vs substituted reference {err_same:.2e} (max abs, relative); vs exact gguf values "
        f"{rel(got):.2e}, control {rel(control):.2e} (relative L2; embedding error {e:.2e})"
    )
    assert err_same < 1e-4
    assert 0 < rel(got) < 2 * rel(control)


def test_keep_high_precision_off_puts_q6_k_on_the_recipe(mixed, tmp_path):
    """keep_high_precision=False: every class on the recipe (policy.py), so the Q6_K
    embedding and PLE table are re-quantized to Q4_0 with ggml's rule."""
    dst = tmp_path / "o"
    convert(mixed[0], dst, "q4_0", keep_high_precision=False, progress=False)
    entries = json.loads((dst / "config.json").read_text())["quantization"]["tensors"]
    for module in ("model.embed_tokens", "model.embed_tokens_per_layer"):
        e = entries[module]
        assert (e["format"], e["requantization"]) == ("q4_0", "ptq-ggml"), e
        assert e["provenance"] == "gguf-q6_k dequantized, re-quantized to q4_0"
    assert entries["model.layers.0.self_attn.q_proj"]["provenance"] == "gguf-q8_0"  # still as stored
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    assert np.isfinite(np.array(model(mx.array([[2, 5, 7]])))).all()


def test_truncated_q6_k_and_bad_row_length(mixed, tmp_path):
    path, _, _, tensors = mixed
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-300])  # token_embd (Q6_K) is the last tensor
    with pytest.raises(ConvertError, match=r"^\S*cut\.gguf: file is truncated: tensor token_embd\.weight needs") as e:
        convert(cut, tmp_path / "o1", "q4_0", progress=False)
    assert "\n" not in str(e.value)
    # Q6_K needs 256-element rows: a 96-wide ffn_down cannot be Q6_K
    bad = [(n, 14, s, d) if n == "blk.0.ffn_down.weight" else (n, t, s, d) for n, t, s, d in tensors]
    write_gguf(tmp_path / "rows.gguf", metadata(**MD2), bad)
    with pytest.raises(ConvertError, match=r"tensor blk\.0\.ffn_down\.weight: Q6_K needs a multiple of 256"):
        convert(tmp_path / "rows.gguf", tmp_path / "o2", "q4_0", progress=False)
    bad = [(n, 12, s, d) if n == "blk.1.ffn_up.weight" else (n, t, s, d) for n, t, s, d in tensors]
    write_gguf(tmp_path / "k.gguf", metadata(**MD2), bad)  # Q4_K: not supported
    with pytest.raises(ConvertError, match=r"k\.gguf: tensor blk\.1\.ffn_up\.weight: ggml type Q4_K is not supported"):
        convert(tmp_path / "k.gguf", tmp_path / "o3", "q4_0", progress=False)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())
