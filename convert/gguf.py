"""GGUF v3 reader and the Gemma 4 GGUF -> MLX importer (spec quantization.md §3.3-§3.4, §4.4).

Reader: header, metadata (every value type), tensor infos, `general.alignment`
(default 32); tensor bytes are views into an np.memmap, so a 14 GB file is paged in
one tensor at a time.  GGUF lists dims fastest-first (ne[0] = the contiguous input
axis), so the row-major numpy shape is the reversed list.

Importer, per ggml type of a matrix / embedding tensor:
- Q4_0: codes + the file's fp16 d as MLX affine 4-bit g32 (biases -8d derived at load);
- Q8_0, Q4_1, Q5_0, Q5_1: MLX affine 8/4/5/5-bit g32 with stored fp16 scales = d and
  biases = -128d / m / -16d / m; codes re-packed, nothing re-quantized.  Dequantized in
  fp32 these give ggml's values exactly, up to the sign of zero (d*code is exact in fp32,
  so the one rounding of d*code + bias is ggml's own; none for -128d / -16d);
- Q6_K (Google's QAT GGUF stores the tied token embedding so): 16-element sub-block
  scales have no MLX quantized form, so the blocks are dequantized exactly (ggml's fp32
  arithmetic), rounded to fp16 (what MLX's own GGUF loader does) and then handled like
  an fp16 tensor of an HF checkpoint: the tensor class's policy format (embedding:
  8-bit affine g64; PLE table / projections, router: fp16 kept; everything on the
  recipe with keep_high_precision=False).  Not lossless: each entry records it
  (`provenance`, `deviation`, `rel_rms_error` against the exact dequantization);
- F32/F16/BF16: as stored.
Non-matrix tensors (norms, scalars) in a block type are dequantized exactly to fp32.
Other ggml types (K-quants but Q6_K, IQ*) are refused, naming the tensor.
The full layers' partial-rotary factor is read from llama.cpp's `rope_freqs` tensor
(`gguf_rope`); the tokenizer and chat template are rebuilt from `tokenizer.ggml.*` and
`tokenizer.chat_template` (`gguf_tokenizer`).  Vision/audio live in a separate mmproj
GGUF: this writes the text model only.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx.checkpoint.keys import SHARED_KV_KEY
from gemma4_mlx.formats import q4_0

from . import codecs, gguf_tokenizer
from .errors import ConvertError
from .gguf_rope import check_rotary_dims, full_rotary_factor

GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
              17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
              23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
# Block types (ggml's block structs, all little-endian, fp16 d first):
#   Q4_0 {d; qs[16]}  Q4_1 {d; m; qs[16]}  Q5_0 {d; qh[4]; qs[16]}  Q5_1 {d; m; qh[4]; qs[16]}
#   Q8_0 {d; int8 qs[32]}  Q6_K {ql[128]; qh[64]; int8 scales[16]; d}  -> (elements, bytes)
_BLOCKS = {"Q4_0": (q4_0.QK, q4_0.BLOCK_BYTES), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
           "Q8_0": (32, 34), "Q6_K": (256, 210)}
_PER_BYTES = {nb: per for per, nb in _BLOCKS.values()}  # block bytes -> elements (all distinct)
# Readable types: (numpy dtype of the raw storage, elements per block, bytes per block)
_LAYOUT = {"F32": ("<f4", 1, 4), "F16": ("<f2", 1, 2), "BF16": ("<u2", 1, 2),
           **{k: (np.uint8, per, nb) for k, (per, nb) in _BLOCKS.items()}}
# Types stored exactly as MLX affine g32 with stored biases: ggml type -> bits
EXACT_AFFINE = {"Q8_0": 8, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5}
# Metadata value types: 0..12 (struct format, or None for string/array/bool)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {k: np.dtype(v) for k, v in _SCALARS.items()}
STRING, ARRAY, BOOL = 8, 9, 7


class GGUFTensor:
    def __init__(self, name, shape, type_id, offset):
        self.name, self.shape, self.type_id, self.offset = name, shape, type_id, offset
        self.type = GGML_TYPES.get(type_id, f"type {type_id}")
        self.nbytes = None  # set once the layout is known

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class GGUFFile:
    """A parsed GGUF file: `.metadata` (dict), `.tensors` (name -> GGUFTensor), `.raw(name)`."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise ConvertError(f"{self.path}: cannot map GGUF file ({e})") from None
        self._pos = 0
        if bytes(self._take(4)) != b"GGUF":
            raise ConvertError(f"{self.path}: not a GGUF file (bad magic)")
        self.version, n_tensors, n_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if self.version not in (2, 3):
            raise ConvertError(f"{self.path}: GGUF version {self.version} not supported (expected 3)")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"), key)
        self.tensors: dict[str, GGUFTensor] = {}
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            t = GGUFTensor(name, tuple(reversed(dims)), self._unpack("<I"), self._unpack("<Q"))
            self.tensors[name] = t
        self.alignment = int(self.metadata.get("general.alignment", 32))
        self.data_start = -(-self._pos // self.alignment) * self.alignment
        size = self._mm.size
        for t in self.tensors.values():
            if t.offset % self.alignment:
                raise ConvertError(f"{self.path}: tensor {t.name}: offset {t.offset} not aligned to {self.alignment}")
            if t.type in _LAYOUT:
                _, per, nb = _LAYOUT[t.type]
                if t.shape and t.shape[-1] % per:
                    raise ConvertError(f"{self.path}: tensor {t.name}: {t.type} needs a multiple of {per} "
                                       f"elements per row, got shape {t.shape}")
                t.nbytes = t.size // per * nb
                end = self.data_start + t.offset + t.nbytes
                if end > size:
                    raise ConvertError(f"{self.path}: file is truncated: tensor {t.name} needs bytes up to "
                                       f"{end}, file has {size}")

    # -- header primitives: every read is bounds-checked so a cut header fails in one line
    def _take(self, n: int) -> np.ndarray:
        if self._pos + n > self._mm.size:
            raise ConvertError(f"{self.path}: file is truncated inside the GGUF header (offset {self._pos})")
        b = self._mm[self._pos:self._pos + n]
        self._pos += n
        return b

    def _unpack(self, fmt: str):
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)).tobytes())[0]

    def _string(self) -> str:
        return self._take(self._unpack("<Q")).tobytes().decode("utf-8", errors="replace")

    def _value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])
        if vtype == BOOL:
            return bool(self._unpack("<B"))
        if vtype == STRING:
            return self._string()
        if vtype == ARRAY:
            etype, n = self._unpack("<I"), self._unpack("<Q")
            if etype in _NP:  # numeric arrays in one step (token scores: 262k floats)
                return np.frombuffer(self._take(n * _NP[etype].itemsize).tobytes(), _NP[etype]).tolist()
            return [self._value(etype, key) for _ in range(n)]
        raise ConvertError(f"{self.path}: metadata key {key}: unknown value type {vtype}")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored bytes as a memory-mapped numpy view (no copy)."""
        t = self.tensors[name]
        if t.type not in _LAYOUT:
            raise ConvertError(f"{self.path}: tensor {name}: ggml type {t.type} is not supported "
                               f"(readable: {', '.join(_LAYOUT)})")
        dt, per, nb = _LAYOUT[t.type]
        a = self._mm[self.data_start + t.offset:self.data_start + t.offset + t.nbytes]
        if t.type in _BLOCKS:
            return a.reshape(*t.shape[:-1], t.shape[-1] // per, nb)
        return a.view(dt).reshape(t.shape)


# -- names -----------------------------------------------------------------------------
# GGUF name -> our module path (after loader.sanitize).  Certain: the llama.cpp names
# shared with Gemma 2/3 (token_embd, output_norm, blk.N.attn_*, ffn_*, post_*_norm).
# From gguf-py's Gemma 3n table, assumed unchanged for gemma4 [uncertain]:
# per_layer_token_embd, per_layer_model_proj, per_layer_proj_norm, blk.N.inp_gate,
# blk.N.proj, blk.N.post_norm.  Gemma 4 names as gguf-py 0.19 lists them for the
# gemma4 architecture (and its HF map): layer_output_scale, ffn_gate_inp (router),
# fused ffn_gate_up_exps [E, 2I, H] (gate rows first, as HF's gate_up_proj),
# ffn_down_exps, pre_ffw_norm_2, post_ffw_norm_1/2, rope_freqs, output.  The router's
# scale vectors ride on tensors with a ".scale" suffix (ffn_gate_inp.scale,
# ffn_down_exps.scale) [from a third-party GGUF mapper; not checked against a real file].
# Separate ffn_gate_exps / ffn_up_exps are accepted too.
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
           "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
           "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight"}
_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
          "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
          "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "inp_gate": "per_layer_input_gate",
          "proj": "per_layer_projection", "post_norm": "post_per_layer_input_norm",
          "ffn_gate_inp": "router.proj",
          "ffn_gate_exps": "experts.gate_proj", "ffn_up_exps": "experts.up_proj",
          "ffn_down_exps": "experts.down_proj", "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
          "post_ffw_norm_1": "post_feedforward_layernorm_1", "post_ffw_norm_2": "post_feedforward_layernorm_2"}
_BLOCK_LEAF = {"layer_output_scale.weight": "layer_scalar",
               "ffn_gate_inp.scale": "router.scale",
               "ffn_down_exps.scale": "router.per_expert_scale"}
# rope_freqs: llama.cpp's proportional-RoPE divisors, read into the config's
# partial_rotary_factor (gguf_rope.py); not a weight of ours.
_IGNORED = {"rope_freqs.weight"}
_FUSED = re.compile(r"^blk\.(\d+)\.ffn_gate_up_exps\.weight$")


def parts(g: "GGUFFile", name: str):
    """(our key, shape, raw getter) for each tensor a GGUF tensor becomes: the fused
    expert gate/up tensor splits along its rows into our gate_proj and up_proj."""
    t = g.tensors[name]
    m = _FUSED.match(name)
    if not m:
        return [(hf_name(name), t.shape, lambda: g.raw(name))]
    E, rows, H = t.shape
    half = rows // 2
    base = f"model.layers.{m.group(1)}.experts."
    return [(base + "gate_proj.weight", (E, half, H), lambda: g.raw(name)[:, :half]),
            (base + "up_proj.weight", (E, half, H), lambda: g.raw(name)[:, half:])]
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
    base, dot, leaf = rest.rpartition(".")
    if leaf == "weight" and base in _BLOCK:
        return f"model.layers.{i}.{_BLOCK[base]}.weight"
    return None


# -- config ----------------------------------------------------------------------------
_REQUIRED = object()
S, F = "sliding_attention", "full_attention"


def text_config(g: GGUFFile) -> dict:
    """A gemma4_text config.json from `gemma4.*` metadata (and tensor shapes where the
    metadata has no key, e.g. vocab size, K = V full layers)."""
    md, arch = g.metadata, g.metadata.get("general.architecture")
    if arch != "gemma4":
        raise ConvertError(f"{g.path}: general.architecture is {arch!r}, expected 'gemma4'")

    def key(k, default=_REQUIRED):
        if f"gemma4.{k}" in md:
            return md[f"gemma4.{k}"]
        if default is _REQUIRED:
            raise ConvertError(f"{g.path}: metadata key gemma4.{k} is missing")
        return default

    L = int(key("block_count"))
    # llama.cpp writes the pattern per layer, True = sliding [uncertain for gemma4]
    pattern = key("attention.sliding_window_pattern")
    if not isinstance(pattern, list) or len(pattern) != L:
        raise ConvertError(f"{g.path}: metadata key gemma4.attention.sliding_window_pattern must list "
                           f"{L} booleans")
    types = [S if p else F for p in pattern]

    def of_type(v, t):  # a per-layer list (llama.cpp writes some as arrays) -> one value per type
        if not isinstance(v, list):
            return v
        idx = [i for i in range(L) if types[i] == t]
        return v[idx[0]] if idx else v[0]

    if "token_embd.weight" not in g.tensors:
        raise ConvertError(f"{g.path}: tensor token_embd.weight is missing")
    full = [i for i in range(L) if types[i] == F]
    k_eq_v = bool(full) and f"blk.{full[0]}.attn_v.weight" not in g.tensors
    kv, ff = key("attention.head_count_kv"), key("feed_forward_length")
    n_shared = int(key("attention.shared_kv_layers", 0))
    cfg = {"model_type": "gemma4_text", "vocab_size": g.tensors["token_embd.weight"].shape[0],
           "hidden_size": int(key("embedding_length")), "num_hidden_layers": L,
           "intermediate_size": int(of_type(ff, S)),
           "num_attention_heads": int(of_type(key("attention.head_count"), S)),
           "num_key_value_heads": int(of_type(kv, S)),
           "head_dim": int(key("attention.key_length_swa", key("attention.key_length"))),
           "global_head_dim": int(key("attention.key_length")),
           "sliding_window": int(key("attention.sliding_window")), "layer_types": types,
           "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
           "final_logit_softcapping": key("final_logit_softcapping", None),
           "tie_word_embeddings": True, "attention_k_eq_v": k_eq_v, "num_kv_shared_layers": n_shared,
           "rope_parameters": {S: {"rope_type": "default", "rope_theta": float(key("rope.freq_base_swa"))},
                               F: {"rope_type": "proportional", "rope_theta": float(key("rope.freq_base"))}}}
    # the full layers' partial rotation is llama.cpp's rope_freqs tensor (gguf_rope.py)
    check_rotary_dims(g, key, cfg["global_head_dim"], cfg["head_dim"])
    cfg["rope_parameters"][F]["partial_rotary_factor"] = full_rotary_factor(g, cfg["global_head_dim"])[0]
    if key("attention.value_length", cfg["global_head_dim"]) != cfg["global_head_dim"]:
        raise ConvertError(f"{g.path}: metadata key gemma4.attention.value_length differs from key_length")
    if k_eq_v:
        cfg["num_global_key_value_heads"] = int(of_type(kv, F))
    elif isinstance(kv, list) and len(set(kv)) > 1:
        cfg["per_layer_config"] = {str(i): {"num_key_value_heads": int(v)} for i, v in enumerate(kv)}
    if isinstance(ff, list) and n_shared and ff[-1] == 2 * ff[0]:
        cfg["use_double_wide_mlp"] = True
    ple = g.tensors.get("per_layer_token_embd.weight")
    cfg["hidden_size_per_layer_input"] = int(key("embedding_length_per_layer_input")) if ple else 0
    if ple:
        cfg["vocab_size_per_layer_input"] = ple.shape[0]
    if key("expert_count", 0):
        cfg.update(enable_moe_block=True, num_experts=int(key("expert_count")),
                   top_k_experts=int(key("expert_used_count")),
                   moe_intermediate_size=int(key("expert_feed_forward_length")))
    return cfg


# -- ggml blocks -----------------------------------------------------------------------
# Decoders take raw blocks uint8 [..., nblk, bytes] (as `GGUFFile.raw` returns them).

def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The little-endian fp16 at byte `at` of every block, as float32 [..., nblk]."""
    return np.ascontiguousarray(raw[..., at:at + 2]).view("<f2")[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs[16] -> 32 codes: element j in the low nibble of qs[j], element j + 16 in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def affine_blocks(ttype: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [..., nblk, 32], scales, biases float32 [..., nblk]) with
    ggml value = scales * code + biases exactly (spec §3.4) for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0."""
    raw = np.asarray(raw, dtype=np.uint8)
    d = _f16(raw, 0)
    if ttype == "Q8_0":  # int8 q -> q + 128 (sign bit flipped); d*q = d*(q+128) - 128d
        return raw[..., 2:34] ^ np.uint8(0x80), d, d * np.float32(-128)
    if ttype == "Q4_0":
        return _nibbles(raw[..., 2:18]), d, d * np.float32(-8)
    if ttype == "Q4_1":
        return _nibbles(raw[..., 4:20]), d, _f16(raw, 2)
    if ttype in ("Q5_0", "Q5_1"):
        at = 2 if ttype == "Q5_0" else 4  # qh: uint32 little-endian, bit j = bit 4 of element j
        high = np.unpackbits(raw[..., at:at + 4], axis=-1, bitorder="little")
        codes = _nibbles(raw[..., at + 4:at + 20]) | (high << 4)
        return codes, d, (d * np.float32(-16) if ttype == "Q5_0" else _f16(raw, 2))
    raise ValueError(f"{ttype} has no exact MLX affine form")


def q6_k_dequantize(raw: np.ndarray) -> np.ndarray:
    """ggml `dequantize_row_q6_K`: raw uint8 [..., nblk, 210] -> float32 [..., nblk * 256].

    Super-block of 256: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one
    per 16 elements), fp16 d.  In each half h (128 elements; ql[64h:], qh[32h:]), element
    32k + l (k = 0..3, l = 0..31) has low bits from nibble k // 2 of ql[64h + l + 32 (k % 2)]
    and high bits from bits 2k..2k+1 of qh[32h + l]; q - 32 is scaled by (d * scales[j // 16])
    in fp32, multiplied in ggml's order ((d * sc) * q), so the result is ggml's bit for bit.
    """
    raw = np.asarray(raw, dtype=np.uint8)
    lead, n = raw.shape[:-2], raw.shape[-2]
    b = raw.reshape(-1, 210)
    ql = b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    qh = b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((ql & 0x0F).reshape(-1, 2, 128) | ((qh & 0x03).reshape(-1, 2, 128) << 4)).astype(np.int8) - 32
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    ds = _f16(b, 208)[:, None] * sc  # [blocks, 16]
    y = ds[:, :, None] * q.reshape(-1, 16, 16).astype(np.float32)
    return y.reshape(*lead, n * 256)


def dequantize(ttype: str, raw: np.ndarray) -> np.ndarray:
    """ggml's float32 values of raw blocks [..., nblk, bytes] -> [..., nblk * block]."""
    if ttype == "Q6_K":
        return q6_k_dequantize(raw)
    codes, s, b = affine_blocks(ttype, raw)
    v = codes.astype(np.float32) * s[..., None] + b[..., None]  # d*code exact: one rounding
    return v.reshape(*v.shape[:-2], -1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX affine packing: codes uint8 [..., K] -> uint32 [..., K * bits / 32], a
    little-endian bit stream (element 0 in the least significant bits of word 0)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes.view("<u4")
    if bits == 4:
        return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4)).view("<u4")
    bitv = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bitv.reshape(*codes.shape[:-1], -1), axis=-1, bitorder="little").view("<u4")


# -- import ----------------------------------------------------------------------------
SHARD_BYTES = 2 << 30  # output shard size: bounds the resident set while writing
ROWS_CHUNK = 1 << 20  # elements decoded per step (bounds the numpy temporaries)
FP16_MAX = 65504.0
_RULE = ("Q4_0 blocks as stored (biases derived); Q8_0/Q4_1/Q5_0/Q5_1 blocks as stored (exact MLX affine "
         "g32, stored biases); Q6_K dequantized to float16, then the class policy (not lossless, per-tensor "
         "deviation recorded); F32/F16/BF16 as stored; block-typed norms/scalars dequantized to float32")


def import_gguf(path: Path, out: Path, policy, progress: bool):
    """Write an MLX checkpoint for the GGUF at `path` into `out`; returns a core.Report."""
    from mlx.utils import tree_flatten

    from gemma4_mlx.config import ConfigError, parse_config
    from gemma4_mlx.models.text import Model

    from .core import Report, _progress, write_shard
    from .policy import classify

    if policy.recipe != "q4_0":
        raise ConvertError(f"{path}: GGUF import keeps the stored Q4_0 blocks; use --quant q4_0 "
                           f"(got {policy.recipe})")
    g = GGUFFile(path)
    raw_cfg = text_config(g)
    vocab = gguf_tokenizer.read_vocab(g, raw_cfg["vocab_size"])  # checked before any weight is read
    eos = vocab.eos_ids() if vocab is not None else []
    if eos:  # EOS and the end-of-turn ids llama.cpp stops on
        raw_cfg["eos_token_id"] = eos
    try:
        config = parse_config(raw_cfg, str(path))
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    model = Model(config.text)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    report = Report(out, "q4_0", bytes_in=path.stat().st_size, largest_shard=path.stat().st_size)
    shards, shard, seen, skipped, ignored = [], {}, set(), [0], []

    def flush():
        nonlocal shard
        name = f"model-{len(shards) + 1:05d}.safetensors"
        write_shard(out / name, shard)
        report.bytes_out += sum(a.nbytes for a in shard.values())
        shards.append((name, list(shard)))
        shard = {}

    def _put(name, t, key, shape, get_raw):
        """Check and encode one of our tensors cut from GGUF tensor `name`."""
        if key is None:
            raise ConvertError(f"{path}: tensor {name}: unknown GGUF tensor name for gemma4")
        m = SHARED_KV_KEY.match(key)
        if m and config.text.layers[int(m.group(1))].shared:
            skipped[0] += 1  # unused K/V of a KV-sharing layer (as loader.sanitize drops them)
            return
        if key not in expected:
            raise ConvertError(f"{path}: tensor {name} ({key}) is not part of this config")
        if shape != expected[key]:
            raise ConvertError(f"{path}: tensor {name} has shape {shape}, config says {expected[key]}")
        raw = get_raw()  # refuses unsupported ggml types, naming the tensor
        module = key[:-len(".weight")] if key.endswith(".weight") else key
        cls = classify(module) if key.endswith(".weight") else "other"
        try:
            if t.type in _BLOCKS and cls == "other":  # norms/scalars: exact, never quantized
                shard[key] = mx.array(_rows_map(raw, lambda r: dequantize(t.type, r)))
            elif t.type == "Q4_0":
                shard.update(_q4_0_arrays(module, raw))
                report.tensors[module] = {"class": cls, "format": "q4_0", "mode": "affine", "bits": 4,
                                          "group_size": 32, "provenance": "gguf-q4_0",
                                          "scale_dtype": "float16", "biases": "derived at load: -8 * scales"}
            elif t.type in EXACT_AFFINE:
                arrays, entry = _exact_affine(module, raw, t.type)
                shard.update(arrays)
                report.tensors[module] = {"class": cls, **entry}
            elif t.type == "Q6_K":
                arrays, entry = _dequantized(module, raw, t.type, policy)
                shard.update(arrays)
                report.tensors[module] = {"class": cls, **entry}
            else:
                a = mx.array(np.array(raw))  # copies one tensor out of the map
                shard[key] = a.view(mx.bfloat16) if t.type == "BF16" else a
                if cls != "other":
                    report.tensors[module] = {"class": cls, "format": "float", "dtype": str(shard[key].dtype)
                                              .replace("mlx.core.", ""), "reason": f"gguf {t.type}"}
        except (codecs.CodecError, ValueError) as e:
            raise ConvertError(f"{path}: tensor {name} ({t.type}): {e}") from None
        mx.eval(list(shard.values()))
        seen.add(key)

    with _progress(progress, sum(t.nbytes or 0 for t in g.tensors.values())) as advance:
        for name, t in g.tensors.items():
            if name in _IGNORED:
                ignored.append(name)
                advance(t.nbytes)
                continue
            if name == "output.weight":  # Gemma 4 ties the head: only an exact copy is accepted
                e = g.tensors.get("token_embd.weight")
                if e is None or (e.type, e.shape) != (t.type, t.shape) or \
                        not np.array_equal(g.raw(name), g.raw("token_embd.weight")):
                    raise ConvertError(f"{path}: tensor output.weight differs from token_embd.weight; "
                                       "Gemma 4 ties them")
                ignored.append(name)
                advance(t.nbytes)
                continue
            for key, shape, get_raw in parts(g, name):
                _put(name, t, key, shape, get_raw)
            advance(t.nbytes)
            if sum(a.nbytes for a in shard.values()) >= SHARD_BYTES:
                flush()
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConvertError(f"{path}: missing tensor {missing[0]}{more}")
    if shard or not shards:
        flush()
    if len(shards) == 1:
        (out / shards[0][0]).rename(out / "model.safetensors")
    else:
        index = {"metadata": {"total_size": report.bytes_out},
                 "weight_map": dict(sorted((k, n) for n, keys in shards for k in keys))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    report.skipped = {k: v for k, v in (("shared_kv", skipped[0]), ("ignored", ignored)) if v}
    report.converted = ["text"]
    if vocab is not None:
        gguf_tokenizer.write(vocab, out)
        report.converted += ["tokenizer"] + (["chat template"] if vocab.template is not None else [])
    types = sorted({t.type for t in g.tensors.values()})
    factor, factor_from = full_rotary_factor(g, raw_cfg["global_head_dim"])
    raw_cfg["gemma4_mlx_conversion"] = {
        "tool": "gemma4-mlx convert", "recipe": "q4_0", "source": "gguf", "gguf_file": path.name,
        "gguf_types": types, "text_only": True, "skipped": report.skipped,
        "partial_rotary_factor": {"full_attention": factor, "from": factor_from},
        "tokenizer": vocab.summary() if vocab is not None else "none (no tokenizer.ggml.tokens in the GGUF)"}
    described = policy.describe()
    raw_cfg["quantization"] = {"recipe": "q4_0", "mode": "affine", "bits": 4, "group_size": 32,
                               "policy": {"recipe": "q4_0", "source": "gguf", "rule": _RULE,
                                          "keep_high_precision": policy.keep_high_precision,
                                          "classes_for_dequantized": described["classes"]},
                               "tensors": dict(sorted(report.tensors.items()))}
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=2) + "\n")
    return report


def _chunks(raw: np.ndarray):
    """Yield raw block rows [r, nblk, bytes] of about ROWS_CHUNK elements each."""
    nblk = raw.shape[-2]
    flat = raw.reshape(-1, nblk, raw.shape[-1])
    step = max(1, ROWS_CHUNK // (nblk * _PER_BYTES[raw.shape[-1]]))
    for a in range(0, flat.shape[0], step):
        yield np.asarray(flat[a:a + step])


def _rows_map(raw: np.ndarray, fn) -> np.ndarray:
    """fn over row chunks of raw blocks, concatenated and shaped [..., K]."""
    out = np.concatenate([fn(c) for c in _chunks(raw)])
    return out.reshape(*raw.shape[:-2], -1)


def _q4_0_arrays(module: str, raw: np.ndarray) -> dict[str, mx.array]:
    """Q4_0 blocks [..., K/32, 18] -> MLX affine weight/scales, in row chunks so the
    unpacked uint8 codes never exist for the whole tensor at once."""
    lead = raw.shape[:-2]
    words, scales = [], []
    for c in _chunks(raw):
        d, q = q4_0.unpack(c)
        w, s, _ = q4_0.to_mlx_affine(d, q, "float16")  # the file's fp16 d, exactly
        mx.eval(w, s)
        words.append(w)
        scales.append(s)
    return {f"{module}.weight": mx.concatenate(words).reshape(*lead, -1),
            f"{module}.scales": mx.concatenate(scales).reshape(*lead, -1)}


def _fits_fp16(x: np.ndarray) -> bool:
    with np.errstate(over="ignore"):  # an overflow becomes Inf, which then differs
        return bool((x.astype(np.float16).astype(np.float32) == x).all())


def _exact_affine(module: str, raw: np.ndarray, ttype: str):
    """Q8_0/Q4_1/Q5_0/Q5_1 blocks -> MLX affine g32 weight/scales/biases (nothing
    re-quantized).  Scales are the file's fp16 d; biases (-128d, m, -16d) are fp16 too
    unless one overflows fp16 (|d| > 511 for Q8_0), then both are stored fp32."""
    bits, lead = EXACT_AFFINE[ttype], raw.shape[:-2]
    words, scales, biases = [], [], []
    for c in _chunks(raw):
        codes, s, b = affine_blocks(ttype, c)
        words.append(mx.array(pack_codes(codes.reshape(codes.shape[0], -1), bits)))
        mx.eval(words[-1])
        scales.append(s)
        biases.append(b)
    s, b = np.concatenate(scales), np.concatenate(biases)
    dt = np.float16 if _fits_fp16(s) and _fits_fp16(b) else np.float32
    arrays = {f"{module}.weight": mx.concatenate(words).reshape(*lead, -1),
              f"{module}.scales": mx.array(s.astype(dt)).reshape(*lead, -1),
              f"{module}.biases": mx.array(b.astype(dt)).reshape(*lead, -1)}
    bias_rule = {"Q8_0": "-128 * scales", "Q5_0": "-16 * scales"}.get(ttype, "m (the block minimum)")
    entry = {"format": "affine", "mode": "affine", "bits": bits, "group_size": 32,
             "provenance": f"gguf-{ttype.lower()}", "scale_dtype": np.dtype(dt).name,
             "biases": f"stored: {bias_rule}",
             "exact": "dequantized in float32: ggml's values exactly (up to the sign of zero)"}
    return arrays, entry


def _q6_k_bound(raw: np.ndarray) -> float:
    """An upper bound of |value| over Q6_K blocks: max |d * scale| * 32 (|q - 32| <= 32)."""
    bound = 0.0
    for c in _chunks(raw):
        b = c.reshape(-1, 210)
        sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
        bound = max(bound, float(np.abs(_f16(b, 208)[:, None] * sc).max(initial=0.0)) * 32)
    return bound


def _dequantized(module: str, raw: np.ndarray, ttype: str, policy):
    """A type with no exact MLX quantized form (Q6_K): ggml's values (fp32, exact),
    rounded to fp16 (as MLX's own GGUF loader does; fp32 if a value could overflow
    fp16), then the tensor class's policy format exactly as for an fp16 HF tensor.
    Returns (arrays, entry); the entry records the deviation and, for row-wise
    formats, the relative RMS error against ggml's exact values."""
    from dataclasses import replace

    fmt, note = policy.for_tensor(module, raw.shape[-2] * _BLOCKS[ttype][0])
    work = "float16" if _q6_k_bound(raw) <= FP16_MAX else "float32"
    cast = np.float16 if work == "float16" else np.float32
    lead, err = raw.shape[:-2], None
    if fmt.quantized and fmt.kind != "affine":
        # Per-tensor decisions (Q4_0's lattice fraction) need the whole tensor at once.
        x = _rows_map(raw, lambda r: dequantize(ttype, r).astype(cast))
        arrays, info = codecs.encode(mx.array(x), fmt)
    else:  # row-wise formats: one chunk of rows at a time (bounded temporaries)
        if not fmt.quantized:
            fmt = replace(fmt, dtype=work)
        parts, info, err2, ref2 = [], {}, 0.0, 0.0
        for c in _chunks(raw):
            x = dequantize(ttype, c).reshape(c.shape[0], -1)
            arrays, info = codecs.encode(mx.array(x.astype(cast)), fmt)
            mx.eval(list(arrays.values()))
            y = np.array(_decoded(arrays, fmt)).astype(np.float64)
            err2 += float(((y - x) ** 2).sum())
            ref2 += float((x.astype(np.float64) ** 2).sum())
            parts.append(arrays)
        arrays = {k: mx.concatenate([p[k] for p in parts]) for k in parts[0]}
        err = (err2 / ref2) ** 0.5 if ref2 else 0.0
    arrays = {f"{module}.{k}": a.reshape(*lead, -1) for k, a in arrays.items()}
    entry = {**fmt.entry(), **info, "source_type": ttype}
    if fmt.quantized:
        what = f"{fmt.mode} {fmt.bits}-bit g{fmt.group_size}" if fmt.kind == "affine" else fmt.kind
        entry["provenance"] = f"gguf-{ttype.lower()} dequantized, re-quantized to {what}"
        if "provenance" in info:
            entry["requantization"] = info["provenance"]
        entry["deviation"] = (f"{ttype} (16-element sub-block scales) has no exact MLX quantized form: "
                              f"dequantized exactly, rounded to {work}, re-quantized to {what} "
                              "by this tensor class's policy")
        if fmt.kind == "affine":
            entry["scale_dtype"] = work
    else:
        entry["provenance"] = f"gguf-{ttype.lower()} dequantized"
        entry["reason"] = (f"gguf {ttype}: no exact MLX quantized form; dequantized to {work} "
                           "(this class stays high precision)")
    if note:
        entry["note"] = note
    if err is not None:
        entry["rel_rms_error"] = float(f"{err:.3g}")
    return arrays, entry


def _decoded(arrays: dict, fmt) -> mx.array:
    """float32 values of one encoded chunk (float or affine)."""
    if not fmt.quantized:
        return arrays["weight"].astype(mx.float32)
    return mx.dequantize(arrays["weight"], arrays["scales"].astype(mx.float32),
                         arrays["biases"].astype(mx.float32), fmt.group_size, fmt.bits,
                         mode=fmt.mode, dtype=mx.float32)
