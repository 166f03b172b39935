"""GGUF tensor names of the MoE model (26B-A4B), checked against llama.cpp's own gguf-py
name map for the gemma4 architecture: fused expert gate/up, router scales, layer
scalar, and the tensors the importer ignores (rope_freqs) or accepts only as an exact
copy (output = token_embd)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx.config import TextConfig
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.models.text import Model

from helpers.dequantize import stack_like
from test_gguf_info import CFG, metadata, write_gguf

gguf = pytest.importorskip("gguf")

MOE = dict(
    CFG,
    hidden_size_per_layer_input=0,
    vocab_size_per_layer_input=0,
    enable_moe_block=True,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=32,
)
# Two tensors gguf-py's map does not name; their ".scale" spelling follows llama.cpp's
# suffix convention (as a third-party GGUF mapper reads them) [not checked on a real file].
SCALES = {"router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}


def gguf_names(key: str) -> str:
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.GEMMA4, MOE["num_hidden_layers"])
    for k, v in SCALES.items():
        if key.endswith(k):
            return f"blk.{key.split('.')[2]}.{v}"
    for hf in ("model.language_model." + key.removeprefix("model."), key, key.removeprefix("model.")):
        name = names.get_name(hf, try_suffixes=(".weight",))
        if name is not None:
            return name if name.endswith(".weight") else name + ".weight"
    raise AssertionError(f"gguf-py has no gemma4 name for {key}")


def build(tmp_path, output_copy=True, flat_experts=False):
    rng = np.random.default_rng(3)
    ref = Model(TextConfig.from_dict(dict(MOE)))
    params = {}
    for key, p in tree_flatten(ref.parameters()):
        lo = "norm" in key or key.endswith(("layer_scalar", ".scale", "per_expert_scale"))
        w = rng.uniform(0.5, 1.5, p.shape) if lo else rng.standard_normal(p.shape) * 0.05
        params[key] = w.astype(np.float32)
    ref.load_weights([(k, mx.array(v)) for k, v in params.items()])
    tensors = []
    for key, w in params.items():
        if key.endswith("experts.up_proj.weight"):
            continue
        if key.endswith("experts.gate_proj.weight"):  # HF's gate_up_proj: gate rows first
            w = np.concatenate([w, params[key.replace("gate_proj", "up_proj")]], axis=1)
            w = w.reshape(-1, w.shape[-1]) if flat_experts else w
            name = gguf_names(key.replace("experts.gate_proj.weight", "experts.gate_up_proj"))
        else:
            name = gguf_names(key)
        tensors.append((name, 0, w.shape, w.tobytes()))
    emb = params["model.embed_tokens.weight"]
    # as llama.cpp writes it for partial rotary factor 0.25 on a 32-wide full-layer head:
    # ones for the 4 rotated pairs, 1e30 after
    tensors.append(("rope_freqs.weight", 0, (16,), np.array([1.0] * 4 + [1e30] * 12, np.float32).tobytes()))
    head = emb if output_copy else emb * 1.01
    tensors.append(("output.weight", 0, emb.shape, head.astype(np.float32).tobytes()))
    md = metadata(
        **{
            "gemma4.embedding_length_per_layer_input": None,
            "gemma4.expert_count": 4,
            "gemma4.expert_used_count": 2,
            "gemma4.expert_feed_forward_length": 32,
        }
    )
    path = tmp_path / "moe.gguf"
    write_gguf(path, md, tensors)
    return path, ref


def test_moe_gguf_names_import_exactly(tmp_path):
    path, ref = build(tmp_path)
    report = convert(path, tmp_path / "out", "q4_0", progress=False)
    assert report.skipped.get("ignored") == ["rope_freqs.weight", "output.weight"]
    model, _ = gemma4_mlx.load(tmp_path / "out", dtype="float32")
    stack_like(ref.layers, model.layers)  # the same products as the loaded model's, so bit for bit
    ids = mx.array([[2] + np.random.default_rng(1).integers(3, 256, 15).tolist()])
    assert np.array_equal(np.array(model(ids)), np.array(ref(ids)))  # F32 tensors kept as stored


def test_untied_output_is_refused(tmp_path):
    path, _ = build(tmp_path, output_copy=False)
    with pytest.raises(ConvertError, match="output.weight differs"):
        convert(path, tmp_path / "out", "q4_0", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_fused_expert_tensor_of_the_wrong_rank_is_named(tmp_path):
    path, _ = build(tmp_path, flat_experts=True)
    with pytest.raises(ConvertError, match=r"moe\.gguf: tensor blk\.\d+\.ffn_gate_up_exps\.weight has shape"):
        convert(path, tmp_path / "out", "q4_0", progress=False)
    assert not (tmp_path / "out").exists()
