"""The Gemma 4 GGUF map: tensor names -> our parameter paths, and `gemma4.*` metadata ->
a gemma4_text config.json (docs/quantization.md §4.4).

Names.  Certain: the llama.cpp names shared with Gemma 2/3 (token_embd, output_norm,
blk.N.attn_*, ffn_*, post_*_norm).  From gguf-py's Gemma 3n table, assumed unchanged
for gemma4 [uncertain]: per_layer_token_embd, per_layer_model_proj,
per_layer_proj_norm, blk.N.inp_gate, blk.N.proj, blk.N.post_norm.  Gemma 4 names as
gguf-py 0.19 lists them for the gemma4 architecture (and its HF map):
layer_output_scale, ffn_gate_inp (router), fused ffn_gate_up_exps [E, 2I, H] (gate
rows first, as HF's gate_up_proj), ffn_down_exps, pre_ffw_norm_2, post_ffw_norm_1/2,
rope_freqs, output.  The router's scale vectors ride on tensors with a ".scale" suffix
(ffn_gate_inp.scale, ffn_down_exps.scale) [from a third-party GGUF mapper; not checked
against a real file].  Separate ffn_gate_exps / ffn_up_exps are accepted too.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .errors import ConvertError
from .gguf_read import GGUFFile
from .gguf_rope import check_rotary_dims, full_rotary_factor

_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "inp_gate": "per_layer_input_gate",
    "proj": "per_layer_projection",
    "post_norm": "post_per_layer_input_norm",
    "ffn_gate_inp": "router.proj",
    "ffn_gate_exps": "experts.gate_proj",
    "ffn_up_exps": "experts.up_proj",
    "ffn_down_exps": "experts.down_proj",
    "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
    "post_ffw_norm_1": "post_feedforward_layernorm_1",
    "post_ffw_norm_2": "post_feedforward_layernorm_2",
}
_BLOCK_LEAF = {
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
}
# rope_freqs: llama.cpp's proportional-RoPE divisors, read into the config's
# partial_rotary_factor (gguf_rope.py); not a weight of ours.
IGNORED = {"rope_freqs.weight"}
HEAD, EMBED = "output.weight", "token_embd.weight"  # Gemma 4 ties them: the head is only checked
_FUSED = re.compile(r"^blk\.(\d+)\.ffn_gate_up_exps\.weight$")
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(name: str) -> str | None:
    """Our parameter path for a GGUF tensor name, or None if unknown."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _BLK.match(name)
    if not m:
        return None
    i, rest = m.groups()
    if rest in _BLOCK_LEAF:
        return f"model.layers.{i}.{_BLOCK_LEAF[rest]}"
    base, _, leaf = rest.rpartition(".")
    if leaf == "weight" and base in _BLOCK:
        return f"model.layers.{i}.{_BLOCK[base]}.weight"
    return None


def parts(g: GGUFFile, name: str):
    """(our key, shape, raw getter) for each tensor a GGUF tensor becomes: the fused
    expert gate/up tensor splits along its rows into our gate_proj and up_proj."""
    t = g.tensors[name]
    m = _FUSED.match(name)
    if not m:
        return [(hf_name(name), t.shape, lambda: g.raw(name))]
    if len(t.shape) != 3 or t.shape[1] % 2:
        raise ConvertError(f"{g.path}: tensor {name} has shape {t.shape}, expected [experts, 2 x width, hidden]")
    E, rows, H = t.shape
    half = rows // 2
    base = f"model.layers.{m.group(1)}.experts."
    return [
        (base + "gate_proj.weight", (E, half, H), lambda: g.raw(name)[:, :half]),
        (base + "up_proj.weight", (E, half, H), lambda: g.raw(name)[:, half:]),
    ]


# -- config ------------------------------------------------------------------------------
_REQUIRED = object()
S, F = "sliding_attention", "full_attention"


def _finite(v):
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(v)
    return v


class _Keys:
    """`gemma4.*` metadata by short key; a missing required key, or a value that is
    not of the `kind` asked for (a number, or a non-empty list of numbers where
    llama.cpp writes one per layer), fails in one line naming the key."""

    def __init__(self, g: GGUFFile):
        self.g = g

    def __call__(self, k: str, default=_REQUIRED, kind=None, per_layer: bool = False):
        md, name = self.g.metadata, f"gemma4.{k}"
        if name not in md:
            if default is _REQUIRED:
                raise ConvertError(f"{self.g.path}: metadata key {name} is missing")
            return default
        value = md[name]
        if kind is None:
            return value
        try:
            if isinstance(value, list) and per_layer and value:
                return [_finite(kind(v)) for v in value]
            if isinstance(value, (list, dict)):
                raise TypeError
            return _finite(kind(value))
        except (TypeError, ValueError, OverflowError):
            shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
            want = f"{kind.__name__}{' (or one per layer)' if per_layer else ''}"
            raise ConvertError(f"{self.g.path}: metadata key {name} is {shown}, expected {want}") from None


def _layer_types(g: GGUFFile, key: _Keys) -> list[str]:
    """Sliding / full per layer: llama.cpp writes the pattern per layer, True = sliding
    [uncertain for gemma4]."""
    L = key("block_count", kind=int)
    pattern = key("attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != L:
        raise ConvertError(f"{g.path}: metadata key gemma4.attention.sliding_window_pattern must list {L} booleans")
    return [S if p else F for p in pattern]


def _of_type(v, types: list[str], t: str):
    """A per-layer list (llama.cpp writes some as arrays) -> the value of layer type t."""
    if not isinstance(v, list):
        return v
    idx = [i for i, lt in enumerate(types) if lt == t]
    return v[idx[0]] if idx else v[0]


def text_config(g: GGUFFile) -> dict:
    """A gemma4_text config.json from `gemma4.*` metadata (and tensor shapes where the
    metadata has no key, e.g. vocab size, K = V full layers)."""
    arch = g.metadata.get("general.architecture")
    if arch != "gemma4":
        raise ConvertError(f"{g.path}: general.architecture is {arch!r}, expected 'gemma4'")
    key = _Keys(g)
    types = _layer_types(g, key)
    if EMBED not in g.tensors:
        raise ConvertError(f"{g.path}: tensor {EMBED} is missing")
    full = [i for i, t in enumerate(types) if t == F]
    k_eq_v = bool(full) and f"blk.{full[0]}.attn_v.weight" not in g.tensors
    kv = key("attention.head_count_kv", kind=int, per_layer=True)
    ff = key("feed_forward_length", kind=int, per_layer=True)
    n_shared = key("attention.shared_kv_layers", 0, int)
    cfg = {
        "model_type": "gemma4_text",
        "vocab_size": g.tensors[EMBED].shape[0],
        "hidden_size": key("embedding_length", kind=int),
        "num_hidden_layers": len(types),
        "intermediate_size": int(_of_type(ff, types, S)),
        **_attention(key, types, kv),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6, float),
        "final_logit_softcapping": key("final_logit_softcapping", None, float),
        "tie_word_embeddings": True,
        "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": n_shared,
        "rope_parameters": _rope(g, key, head_dim=key("attention.key_length", kind=int)),
    }
    if k_eq_v:
        cfg["num_global_key_value_heads"] = int(_of_type(kv, types, F))
    elif isinstance(kv, list) and len(set(kv)) > 1:
        cfg["per_layer_config"] = {str(i): {"num_key_value_heads": int(v)} for i, v in enumerate(kv)}
    if isinstance(ff, list) and n_shared and ff[-1] == 2 * ff[0]:
        cfg["use_double_wide_mlp"] = True
    cfg.update(_per_layer_inputs(g, key), **_experts(key))
    return cfg


def _attention(key: _Keys, types: list[str], kv) -> dict:
    """Heads (of the sliding layers where llama.cpp lists them per layer), head dims, window."""
    return {
        "num_attention_heads": int(_of_type(key("attention.head_count", kind=int, per_layer=True), types, S)),
        "num_key_value_heads": int(_of_type(kv, types, S)),
        "head_dim": key("attention.key_length_swa", key("attention.key_length", kind=int), int),
        "global_head_dim": key("attention.key_length", kind=int),
        "sliding_window": key("attention.sliding_window", kind=int),
        "layer_types": types,
    }


def _rope(g: GGUFFile, key: _Keys, head_dim: int) -> dict:
    """RoPE per layer type; the full layers' partial rotation is llama.cpp's rope_freqs
    tensor (gguf_rope.py)."""
    rope = {
        S: {"rope_type": "default", "rope_theta": key("rope.freq_base_swa", kind=float)},
        F: {"rope_type": "proportional", "rope_theta": key("rope.freq_base", kind=float)},
    }
    check_rotary_dims(g, key, head_dim, key("attention.key_length_swa", head_dim, int))
    rope[F]["partial_rotary_factor"] = full_rotary_factor(g, head_dim)[0]
    if key("attention.value_length", head_dim, int) != head_dim:
        raise ConvertError(f"{g.path}: metadata key gemma4.attention.value_length differs from key_length")
    return rope


def _per_layer_inputs(g: GGUFFile, key: _Keys) -> dict:
    ple = g.tensors.get("per_layer_token_embd.weight")
    if ple is None:
        return {"hidden_size_per_layer_input": 0}
    return {
        "hidden_size_per_layer_input": key("embedding_length_per_layer_input", kind=int),
        "vocab_size_per_layer_input": ple.shape[0],
    }


def _experts(key: _Keys) -> dict:
    if not key("expert_count", 0, int):
        return {}
    return {
        "enable_moe_block": True,
        "num_experts": key("expert_count", kind=int),
        "top_k_experts": key("expert_used_count", kind=int),
        "moe_intermediate_size": key("expert_feed_forward_length", kind=int),
    }


# -- the 12B unified model's mmproj GGUF (docs/unified.md §9) ------------------------------
# llama.cpp writes the 12B's decoder as an ordinary `gemma4` GGUF (the names above) and its
# embedders into a separate `clip` mmproj GGUF with projector types gemma4uv / gemma4ua
# (convert_hf_to_gguf.py `Gemma4UnifiedVisionAudioModel`, gguf-py's tensor map).  Three of
# them are rearranged there: patch_dense's columns and patch_ln1 in CHW order (for ggml's
# im2col), the position table as [axis, position, D]; pos_norm is stored as patch_norm.3.
MMPROJ_TYPES = {"clip.vision.projector_type": "gemma4uv", "clip.audio.projector_type": "gemma4ua"}
_V, _A = "vision.vision_embedder.", "vision.embed_vision."
MMPROJ = {
    "v.patch_norm.1.weight": _V + "patch_ln1.weight",
    "v.patch_norm.1.bias": _V + "patch_ln1.bias",
    "v.patch_embd.weight": _V + "patch_dense.weight",
    "v.patch_embd.bias": _V + "patch_dense.bias",
    "v.patch_norm.2.weight": _V + "patch_ln2.weight",
    "v.patch_norm.2.bias": _V + "patch_ln2.bias",
    "v.position_embd.weight": _V + "pos_embedding",
    "v.patch_norm.3.weight": _V + "pos_norm.weight",
    "v.patch_norm.3.bias": _V + "pos_norm.bias",
    "mm.input_projection.weight": _A + "embedding_projection.weight",
    "mm.a.input_projection.weight": "audio.embed_audio.embedding_projection.weight",
}


def chw_to_hwc(side: int) -> np.ndarray:
    """perm with perm[i] = the (row, column, channel) index of the (channel, row, column)
    position i of a side x side x 3 patch: llama.cpp stores hf[..., perm]."""
    i = np.arange(side * side * 3)
    ch, row, col = i // (side * side), (i % (side * side)) // side, i % side
    return row * side * 3 + col * 3 + ch


def mmproj_tensor(name: str, values: np.ndarray, side: int) -> tuple[str | None, np.ndarray]:
    """(our key or None if unknown, the values in our layout) for one mmproj tensor;
    side: the merged patch's side in pixels (48 on the 12B)."""
    key = MMPROJ.get(name)
    if name in ("v.patch_embd.weight", "v.patch_norm.1.weight", "v.patch_norm.1.bias"):
        out = np.empty_like(values)
        out[..., chw_to_hwc(side)] = values  # undo hf[..., perm]
        return key, out
    if name == "v.position_embd.weight":
        return key, np.ascontiguousarray(values.transpose(1, 0, 2))  # [axis, pos, D] -> [pos, axis, D]
    return key, values


def mmproj_config(mm: GGUFFile, text_hidden: int) -> dict:
    """`vision_config` and `audio_config` of a gemma4_unified config.json from the mmproj's
    metadata and tensor shapes (llama.cpp writes no pooling size: the merged patch's side
    over `clip.vision.patch_size` gives it)."""
    for k, want in MMPROJ_TYPES.items():
        if mm.metadata.get(k) != want:
            raise ConvertError(f"{mm.path}: {k} is {mm.metadata.get(k)!r}, expected {want!r} (a Gemma 4 12B mmproj)")
    need = [n for n in MMPROJ if n not in mm.tensors]
    if need:
        raise ConvertError(f"{mm.path}: tensor {need[0]} is missing")
    D, pixels = mm.tensors["v.patch_embd.weight"].shape
    side, p = math.isqrt(pixels // 3), int(mm.metadata.get("clip.vision.patch_size", 0))
    if 3 * side * side != pixels or p <= 0 or side % p:
        raise ConvertError(f"{mm.path}: v.patch_embd.weight has {pixels} inputs, not 3 x (k x patch_size {p})^2")
    eps = float(mm.metadata.get("clip.vision.attention.layer_norm_epsilon", 1e-6))
    vision = {
        "patch_size": p,
        "pooling_kernel_size": side // p,
        "mm_embed_dim": D,
        "mm_posemb_size": mm.tensors["v.position_embd.weight"].shape[1],
        "output_proj_dims": D,
        "rms_norm_eps": eps,
    }
    audio = {"audio_embed_dim": mm.tensors["mm.a.input_projection.weight"].shape[1], "rms_norm_eps": eps}
    for n in ("mm.input_projection.weight", "mm.a.input_projection.weight"):
        if mm.tensors[n].shape[0] != text_hidden:
            raise ConvertError(f"{mm.path}: {n} projects to {mm.tensors[n].shape[0]}, the text model is {text_hidden}")
    return {"vision_config": vision, "audio_config": audio}
