"""The Gemma 4 GGUF -> MLX importer (docs/quantization.md §3.3-§3.4, §4.4).

read metadata (`gguf_read`: llama.cpp's gguf-py reader) -> config (`gguf_names`) ->
tokenizer (`gguf_tokenizer`) -> tensors -> write.  Per ggml type of a matrix /
embedding tensor:
- Q4_0, Q8_0, Q4_1, Q5_0, Q5_1: the blocks as stored, exact MLX affine g32
  (`gguf_blocks`: nothing re-quantized);
- Q6_K: dequantized exactly by gguf-py, rounded to fp16, then the tensor class's policy
  format (`gguf_requant`: not lossless, the deviation recorded per tensor);
- F32/F16/BF16: as stored.
Non-matrix tensors (norms, scalars) in a block type are dequantized exactly to fp32.
Other ggml types (K-quants but Q6_K, IQ*) are refused, naming the tensor.  The full
layers' partial-rotary factor comes from llama.cpp's `rope_freqs` tensor (`gguf_rope`).
Vision/audio live in a separate mmproj GGUF: the text model only, except for the 12B
unified model, whose embedders are read from its mmproj when given (`gguf_mmproj`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx.checkpoint.files import missing_tensors
from gemma4_mlx.checkpoint.keys import SHARED_KV_KEY
from gemma4_mlx.config import ConfigError, ModelConfig, parse_config
from gemma4_mlx.models.text import Model

from . import codecs, gguf_mmproj, gguf_tokenizer
from .errors import ConvertError
from .gguf_blocks import TRANSFER, dequantize, rows_map
from .gguf_names import EMBED, HEAD, IGNORED, parts, text_config
from .gguf_read import BLOCK_TYPES, GGUFFile, Tensor
from .gguf_requant import requantize
from .gguf_rope import full_rotary_factor
from .output import Progress, Report, write_index, write_shard
from .policy import Policy, classify

SHARD_BYTES = 2 << 30  # output shard size: bounds the resident set while writing
_RULE = (
    "Q4_0 blocks as stored (biases derived); Q8_0/Q4_1/Q5_0/Q5_1 blocks as stored (exact MLX affine "
    "g32, stored biases); Q6_K dequantized to float16, then the class policy (not lossless, per-tensor "
    "deviation recorded); F32/F16/BF16 as stored; block-typed norms/scalars dequantized to float32"
)


def import_gguf(path: Path, out: Path, policy: Policy, progress: bool, mmproj: Path | None = None) -> Report:
    """Write an MLX checkpoint for the GGUF at `path` into `out`; returns its Report.
    mmproj: the 12B unified model's mmproj GGUF (its embedders), or None (text only)."""
    if policy.recipe != "q4_0":
        raise ConvertError(f"{path}: GGUF import keeps the stored Q4_0 blocks; use --quant q4_0 (got {policy.recipe})")
    g = GGUFFile(path)
    raw_cfg = text_config(g)
    vocab = gguf_tokenizer.read_vocab(g, raw_cfg["vocab_size"])  # checked before any weight is read
    eos = vocab.eos_ids() if vocab is not None else []
    if eos:  # EOS and the end-of-turn ids llama.cpp stops on
        raw_cfg["eos_token_id"] = eos
    mm = GGUFFile(mmproj) if mmproj is not None else None
    full_cfg = gguf_mmproj.unified_config(mm, raw_cfg, vocab) if mm is not None else raw_cfg
    config = _parse(path, full_cfg)
    size = path.stat().st_size + (mmproj.stat().st_size if mm is not None else 0)
    run = _Tensors(g, config, policy, _Shards(out), Report(out, "q4_0", bytes_in=size, largest_shard=size))
    with Progress(progress, sum(t.nbytes for t in g.tensors.values())) as advance:
        for t in g.tensors.values():
            run.add(t)
            advance(t.nbytes)
    if mm is not None:  # a few MB: into the last shard
        arrays, entries = gguf_mmproj.embedders(mm, config)
        run.shards.add(arrays)
        run.report.tensors.update(entries)
    report = run.finish()
    report.converted = ["text"] + (["vision", "audio"] if mm is not None else [])
    if vocab is not None:
        gguf_tokenizer.write(vocab, out)
        report.converted += ["tokenizer"] + (["chat template"] if vocab.template is not None else [])
    _write_config(g, out, raw_cfg, vocab, policy, report, full_cfg if mm is not None else None, mmproj)
    return report


def _parse(path: Path, raw_cfg: dict) -> ModelConfig:
    try:
        return parse_config(raw_cfg, str(path))
    except (ConfigError, ValueError) as e:  # ValueError: a 12B embedder config (from its mmproj)
        raise ConvertError(str(e)) from None


@dataclass
class _Shards:
    """Output shards of about SHARD_BYTES (model-0000N.safetensors, numbered as they fill);
    one shard ends as model.safetensors, several get an index."""

    out: Path
    written: list = field(default_factory=list)  # (file name, tensor names)
    current: dict = field(default_factory=dict)
    bytes_out: int = 0

    def add(self, arrays: dict[str, mx.array]) -> None:
        self.current.update(arrays)

    def flush_if_full(self) -> None:
        if sum(a.nbytes for a in self.current.values()) >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        name = f"model-{len(self.written) + 1:05d}.safetensors"
        write_shard(self.out / name, self.current)
        self.bytes_out += sum(a.nbytes for a in self.current.values())
        self.written.append((name, list(self.current)))
        self.current = {}

    def finish(self) -> None:
        if self.current or not self.written:
            self.flush()
        if len(self.written) == 1:
            (self.out / self.written[0][0]).rename(self.out / "model.safetensors")
        else:
            write_index(self.out, {k: n for n, keys in self.written for k in keys}, self.bytes_out)


@dataclass
class _Tensors:
    """The tensor pass: each GGUF tensor checked against the config, encoded, sharded."""

    g: GGUFFile
    config: ModelConfig
    policy: Policy
    shards: _Shards
    report: Report
    expected: dict = field(init=False)  # our key -> shape
    seen: set = field(default_factory=set)
    shared_kv: int = 0  # unused K/V of KV-sharing layers (dropped, as loader.sanitize does)
    ignored: list = field(default_factory=list)  # GGUF tensors that are not weights of ours

    def __post_init__(self):
        model = Model(self.config.text)
        self.expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}

    def add(self, t: Tensor) -> None:
        if t.name in IGNORED:
            self.ignored.append(t.name)
        elif t.name == HEAD:  # Gemma 4 ties the head: only an exact copy is accepted
            self._check_tied(t)
            self.ignored.append(t.name)
        else:
            for key, shape, get_raw in parts(self.g, t.name):
                self._put(t, key, shape, get_raw)
            self.shards.flush_if_full()

    def _check_tied(self, t: Tensor) -> None:
        e = self.g.tensors.get(EMBED)
        if (
            e is None
            or (e.type, e.shape) != (t.type, t.shape)
            or not np.array_equal(self.g.raw(HEAD), self.g.raw(EMBED))
        ):
            raise ConvertError(f"{self.g.path}: tensor {HEAD} differs from {EMBED}; Gemma 4 ties them")

    def _put(self, t: Tensor, key: str | None, shape: tuple, get_raw) -> None:
        """Check and encode one of our tensors cut from GGUF tensor `t`."""
        path = self.g.path
        if key is None:
            raise ConvertError(f"{path}: tensor {t.name}: unknown GGUF tensor name for gemma4")
        m = SHARED_KV_KEY.match(key)
        if m and self.config.text.layers[int(m.group(1))].shared:
            self.shared_kv += 1
            return
        if key not in self.expected:
            raise ConvertError(f"{path}: tensor {t.name} ({key}) is not part of this config")
        if shape != self.expected[key]:
            raise ConvertError(f"{path}: tensor {t.name} has shape {shape}, config says {self.expected[key]}")
        raw = get_raw()  # refuses unsupported ggml types, naming the tensor
        try:
            arrays, module, entry = _encode(key, t.type, raw, self.policy)
        except (codecs.CodecError, ValueError) as e:
            raise ConvertError(f"{path}: tensor {t.name} ({t.type}): {e}") from None
        mx.eval(list(arrays.values()))
        self.shards.add(arrays)
        if entry is not None:
            self.report.tensors[module] = entry
        self.seen.add(key)

    def finish(self) -> Report:
        missing = sorted(set(self.expected) - self.seen)
        if missing:
            raise ConvertError(missing_tensors(str(self.g.path), missing))
        self.shards.finish()
        self.report.bytes_out = self.shards.bytes_out
        self.report.skipped = {k: v for k, v in (("shared_kv", self.shared_kv), ("ignored", self.ignored)) if v}
        return self.report


def _encode(key: str, ttype: str, raw: np.ndarray, policy: Policy):
    """(output arrays, module path, report entry or None) for one of our tensors."""
    module = key[: -len(".weight")] if key.endswith(".weight") else key
    cls = classify(module) if key.endswith(".weight") else "other"
    if ttype in BLOCK_TYPES and cls == "other":  # norms/scalars: exact, never quantized
        return {key: mx.array(rows_map(raw, ttype, partial(dequantize, ttype)))}, module, None
    if ttype in TRANSFER:
        arrays, entry = TRANSFER[ttype](module, raw)
    elif ttype in BLOCK_TYPES:  # Q6_K: no exact MLX quantized form
        arrays, entry = requantize(module, raw, ttype, policy)
    else:  # F32/F16/BF16 as stored; copies one tensor out of the map
        a = mx.array(np.array(raw))
        arrays = {key: a.view(mx.bfloat16) if ttype == "BF16" else a}
        if cls == "other":
            return arrays, module, None
        entry = {"format": "float", "dtype": str(arrays[key].dtype).replace("mlx.core.", ""), "reason": f"gguf {ttype}"}
    return arrays, module, {"class": cls, **entry}


def _write_config(
    g: GGUFFile, out: Path, raw_cfg: dict, vocab, policy: Policy, report: Report, unified=None, mmproj=None
) -> None:
    """config.json: the text config (inside the 12B's `unified` wrapper when its mmproj
    was read), the conversion record and the quantization block."""
    factor, factor_from = full_rotary_factor(g, raw_cfg["global_head_dim"])
    raw_cfg["gemma4_mlx_conversion"] = {
        "tool": "gemma4-mlx convert",
        "recipe": "q4_0",
        "source": "gguf",
        "gguf_file": g.path.name,
        "gguf_types": sorted({t.type for t in g.tensors.values()}),
        "text_only": unified is None,
        **({"mmproj_file": mmproj.name} if mmproj is not None else {}),
        "skipped": report.skipped,
        "partial_rotary_factor": {"full_attention": factor, "from": factor_from},
        "tokenizer": vocab.summary() if vocab is not None else "none (no tokenizer.ggml.tokens in the GGUF)",
    }
    raw_cfg["quantization"] = {
        "recipe": "q4_0",
        "mode": "affine",
        "bits": 4,
        "group_size": 32,
        "policy": {
            "recipe": "q4_0",
            "source": "gguf",
            "rule": _RULE,
            "keep_high_precision": policy.keep_high_precision,
            "classes_for_dequantized": policy.describe()["classes"],
        },
        "tensors": dict(sorted(report.tensors.items())),
    }
    if unified is not None:  # the record and the quantization block sit at the top level
        top = ("gemma4_mlx_conversion", "quantization")
        raw_cfg = {**unified, **{k: raw_cfg.pop(k) for k in top}}
    (out / "config.json").write_text(json.dumps(raw_cfg, indent=2) + "\n")
