"""Streaming HF -> MLX conversion (the model with its vision / audio towers, or an
MTP drafter: `drafter`).

One source shard at a time: its tensors are mapped lazily, renamed onto our module
tree (`checkpoint.keys.sanitize`: towers under `vision.*` / `audio.*`, conv weights in MLX
layout), checked against the config's geometry, encoded tensor by tensor (each
evaluated at once so its source bytes can go), and written as one output shard.
Peak memory is about one output shard plus one tensor's working set.
Everything goes to `DST.partial`, renamed to DST only at the very end; any failure
removes it, so a DST that exists is always complete (a killed run's is removed by the
next: `output.staging`).

An audio model always leaves with a `feature_extractor` block in its
processor_config.json (docs/multimodal.md §6.3: mlx-vlm #903 lost it, and audio was
silently ignored).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from gemma4_mlx.checkpoint.files import (
    LoadError,
    claim_tensors,
    missing_tensors,
    read_safetensors,
    tensor_mismatch,
    weight_files,
)
from gemma4_mlx.checkpoint.keys import sanitize
from gemma4_mlx.checkpoint.quantized import quantization_block
from gemma4_mlx.config import ConfigError, read_config
from gemma4_mlx.models.assistant import Drafter
from gemma4_mlx.models.layers import CLAMPS
from gemma4_mlx.models.text import Model
from gemma4_mlx.models.unified import UnifiedAudio

from . import codecs, drafter
from .errors import ConvertError
from .gguf import import_gguf
from .hub import resolve_source
from .output import Progress, Report, check_destination, staging, write_index, write_shard
from .policy import RECIPES, Policy, classify

log = logging.getLogger(__name__)

# Never copied through: weights (in any framework's format) and the files we rewrite.
_NOT_COPIED = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".onnx", ".ckpt"}
_REWRITTEN = {"config.json", "model.safetensors.index.json"}
_TOWERS = ("vision", "audio")  # Model attributes, and the prefixes of their tensors

# transformers 5.24 `Gemma4AudioFeatureExtractor().to_dict()`, which equals the official
# E2B/E4B block (docs/multimodal.md §4.1); written when an audio model's source lacks one.
FEATURE_EXTRACTOR = {
    "feature_extractor_type": "Gemma4AudioFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "padding_value": 0.0,
    "padding_side": "right",
    "return_attention_mask": True,
    "frame_length": 320,
    "hop_length": 160,
    "fft_length": 512,
    "fft_overdrive": False,
    "min_frequency": 0.0,
    "max_frequency": 8000.0,
    "mel_floor": 0.001,
    "preemphasis": 0.0,
    "preemphasis_htk_flavor": True,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "per_bin_mean": None,
    "per_bin_stddev": None,
}


def unified_feature_extractor(samples_per_token: int) -> dict:
    """transformers 5.25 `Gemma4UnifiedAudioFeatureExtractor(feature_size=n,
    audio_samples_per_token=n).to_dict()`: the 12B's raw-frame block (docs/unified.md §8),
    n = the audio embedder's `audio_embed_dim` (640 on the 12B)."""
    return {
        "feature_size": samples_per_token,
        "sampling_rate": 16000,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": True,
        "audio_samples_per_token": samples_per_token,
        "feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor",
    }


def convert(
    src,
    dst,
    quant: str,
    *,
    force: bool = False,
    keep_high_precision: bool = True,
    progress: bool = True,
    mmproj=None,
) -> Report:
    """Convert the HF Gemma 4 checkpoint at `src` (folder or hub id) into `dst`.

    quant: bf16, fp16, q8, q4, mxfp4, nvfp4, q4_0 or sfp8 (see `policy.RECIPES`).
    mmproj: with a GGUF `src`, the 12B unified model's mmproj GGUF (its embedders).
    """
    try:
        policy = Policy(quant, keep_high_precision)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    dst = Path(os.path.abspath(Path(dst).expanduser()))  # "." / ".." name the folder they are (staging sits beside)
    if dst.exists() and not force:
        raise ConvertError(f"{dst}: already exists (replace it with --force; force=True in Python)")
    check_destination(dst)  # a read-only parent is refused before any work
    gguf_file = Path(src).expanduser() if str(src).endswith(".gguf") else None  # GGUF import
    if gguf_file is not None and not gguf_file.is_file():
        raise ConvertError(f"{gguf_file}: no such GGUF file")
    mmproj = Path(mmproj).expanduser() if mmproj is not None else None
    if mmproj is not None and (gguf_file is None or not mmproj.is_file()):
        raise ConvertError(f"{mmproj}: " + ("no such GGUF file" if gguf_file else "an mmproj goes with a GGUF source"))
    folder = gguf_file.parent if gguf_file is not None else resolve_source(src)
    _refuse_destination_over_inputs(dst, [folder, *([mmproj] if mmproj is not None else [])])
    with staging(dst) as partial:  # DST.partial, renamed to DST at the end (docs/hardening.md §2)
        if gguf_file is not None:
            report = import_gguf(gguf_file, partial, policy, progress, mmproj)
        else:
            report = _convert(folder, partial, policy, progress)
            _copy_through(folder, partial)
    report.dst = dst
    return report


def _refuse_destination_over_inputs(dst: Path, inputs: list[Path]) -> None:
    """With --force the old DST is removed at the end: DST must neither be nor hold
    what is being converted (`convert anc/src anc --force` removed anc/src)."""
    target = dst.resolve()
    for path in inputs:
        where = path.resolve()
        if where == target:
            raise ConvertError(f"{dst}: destination is the source folder")
        if where.is_relative_to(target):
            raise ConvertError(f"{dst}: destination holds the source {path}; choose a folder outside it")


def _convert(folder: Path, out: Path, policy: Policy, progress: bool) -> Report:
    raw, model, map_keys = _source(folder)
    if quantization_block(raw, str(folder / "config.json")) is not None:
        raise ConvertError(
            f"{folder / 'config.json'}: the source is already quantized; "
            "convert from an unquantized (bf16/fp32) checkpoint"
        )
    expected = dict(tree_flatten(model.parameters()))  # parameters, lazily allocated: shapes and dtypes
    files = _checked(weight_files, folder)
    report = Report(out, policy.recipe, largest_shard=max(f.stat().st_size for f in files))
    names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    weight_map, seen, stats, owners = {}, set(), {}, {}
    head = embed_file = None
    mx.reset_peak_memory()
    in_use = mx.get_active_memory()  # the caller's arrays are not the converter's
    with Progress(progress, sum(f.stat().st_size for f in files)) as advance:
        for f, name in zip(files, names):
            shard, keys, lm_head = _encode_file(f, map_keys, expected, policy, report, stats, advance)
            _checked(lambda f, keys=keys: claim_tensors(owners, f, keys), f)  # a tensor in two shards
            head = lm_head if lm_head is not None else head
            embed_file = f if "model.embed_tokens.weight" in keys else embed_file
            seen |= keys
            write_shard(out / name, shard)
            report.bytes_out += sum(a.nbytes for a in shard.values())
            weight_map.update({k: name for k in shard})
            del shard
    report.bytes_in = sum(f.stat().st_size for f in files)
    # Clamp bounds absent from a checkpoint keep their default (+-inf), as the loader does.
    missing = sorted(k for k in set(expected) - seen if not _is_clamp(k))
    if missing:
        raise ConvertError(missing_tensors(str(folder), missing))
    if head is not None and not mx.array_equal(head, _reread(embed_file, map_keys)).item():
        raise ConvertError(f"{folder}: lm_head.weight differs from embed_tokens.weight; Gemma 4 ties them")
    report.skipped = {k: v for k, v in stats.items() if v}
    is_drafter = isinstance(model, Drafter)
    report.converted = ["drafter"] if is_drafter else ["text"] + [t for t in _TOWERS if t in model]
    if "audio" in report.converted:
        report.processor_config = _feature_extractor(folder, out, _audio_block(model))
    if len(files) > 1:
        write_index(out, weight_map, report.bytes_out)
    cfg = _config(raw, policy, report, is_drafter=is_drafter)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    report.peak_mlx = mx.get_peak_memory() - in_use
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    report.peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return report


def _encode_file(f: Path, map_keys, expected: dict, policy: Policy, report: Report, stats: dict, advance):
    """(encoded arrays, the source keys encoded, lm_head or None) for one source shard,
    each tensor checked against the config."""
    tensors = map_keys(_checked(read_safetensors, f), stats)
    shard, keys, head = {}, set(), None
    while tensors:  # popped, so each source tensor is released once encoded
        key, w = tensors.popitem()
        if key == "lm_head.weight":
            head = w
            continue
        if key not in expected:
            raise ConvertError(f"{f}: unexpected tensor {key} {tuple(w.shape)}")
        mismatch = tensor_mismatch(key, w, expected[key])
        if mismatch:
            raise ConvertError(f"{f}: {mismatch}")
        keys.add(key)
        try:
            arrays = _encode(key, w, policy, report)
            mx.eval(list(arrays.values()))
        except (codecs.CodecError, ValueError, RuntimeError) as e:
            raise ConvertError(f"{f}: tensor {key}: {e}") from None
        shard.update(arrays)
        advance(w.nbytes)
    return shard, keys, head


def _source(folder: Path):
    """(raw config, module tree with lazy parameters: shapes only, nothing allocated,
    key mapper onto that tree, `(weights, stats=None)`) for a target or an MTP drafter
    checkpoint."""
    if drafter.is_drafter(folder):
        return drafter.source(folder)
    try:
        config = read_config(folder)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    try:
        model = Model.from_config(config)  # with the vision / audio towers it describes
    except ValueError as e:
        raise ConvertError(f"{folder / 'config.json'}: {e}") from None
    return config.raw, model, lambda weights, stats=None: sanitize(weights, model, stats)


def _checked(read, path: Path):
    """read(path), with the loader's one-line errors raised as ConvertError."""
    try:
        return read(path)
    except ConvertError:
        raise
    except LoadError as e:
        raise ConvertError(str(e)) from None


def _reread(f: Path, map_keys) -> mx.array:
    """The source embedding again (lazily mapped), to compare with a stored lm_head."""
    return map_keys(_checked(read_safetensors, f))["model.embed_tokens.weight"]


def _is_clamp(key: str) -> bool:
    """A tower linear's clamp bound (`vision.….q_proj.input_min`)."""
    return key.startswith(_TOWERS) and key.rpartition(".")[2] in CLAMPS


def _encode(key: str, w: mx.array, policy: Policy, report: Report) -> dict[str, mx.array]:
    """Output arrays for one sanitized tensor; records its entry in the report."""
    if not mx.issubdtype(w.dtype, mx.floating):
        return {key: w}  # index arrays (drafter token_ordering): copied exactly, never cast
    if _is_clamp(key):  # float32 0-d for every recipe (docs/multimodal.md §6.3)
        return {key: w.astype(mx.float32).reshape(())}
    module, _, leaf = key.rpartition(".")
    cls = classify(module) if leaf == "weight" else "other"
    if cls == "other":  # norms, scalars, router scales: never quantized
        fmt = policy.for_class("other")
        return {key: codecs.encode(w, fmt)[0]["weight"]}
    fmt, note = policy.for_tensor(module, w.shape[-1])
    arrays = None
    if policy.qat_embedding(cls) and w.shape[-1] % 32 == 0:
        # A QAT checkpoint's tied embedding sits on the Q4_0 lattice too: storing it as
        # Q4_0 keeps the lattice's values (what the bf16 source rounds; docs/quantization.md
        # §4.3), which Google's Q4_0 memory figures assume; any other embedding keeps the
        # 8-bit rule.
        q, info = codecs.q4_0_lattice(w)
        if q is not None:
            arrays, fmt, note = q, RECIPES["q4_0"], "on the Q4_0 QAT lattice: stored as Q4_0 (its lattice values)"
    if arrays is None:
        arrays, info = codecs.encode(w, fmt)
    entry = {"class": cls, **fmt.entry(), **info}
    if not fmt.quantized:
        entry["dtype"] = str(arrays["weight"].dtype).replace("mlx.core.", "")
        entry.setdefault("reason", note or "policy")
    elif note:
        entry["note"] = note
    if note and "kept high precision" in note:
        log.warning("%s: %s", module, note)
    report.tensors[module] = entry
    return {f"{module}.{suffix}": a for suffix, a in arrays.items()}


def _audio_block(model) -> dict:
    """The `feature_extractor` block an audio model without one gets: the 12B's raw frames
    of its embedder's width, or the log-mel extractor of the tower-based models."""
    if isinstance(model.audio, UnifiedAudio):
        return unified_feature_extractor(model.audio.config.audio_embed_dim)
    return dict(FEATURE_EXTRACTOR)


def _feature_extractor(src: Path, out: Path, block: dict) -> str | None:
    """Write out/processor_config.json with the `feature_extractor` `block` if the
    source's (or the source itself) lacks one; the rest of the file is kept.  A source
    block is never touched (copied through).  Returns what was done, for the conversion
    record."""
    f = src / "processor_config.json"
    pc = {}
    if f.is_file():
        try:
            pc = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ConvertError(f"{f}: not valid JSON ({e})") from None
        if not isinstance(pc, dict):
            raise ConvertError(f"{f}: expected a JSON object, got {type(pc).__name__}")
        if isinstance(pc.get("feature_extractor"), dict):
            return None
    pc["feature_extractor"] = block
    (out / "processor_config.json").write_text(json.dumps(pc, indent=2) + "\n")
    where = "its processor_config.json had none" if f.is_file() else "it had no processor_config.json"
    kind = block["feature_extractor_type"]
    log.warning("%s: audio model without a feature_extractor block (%s): writing %s's defaults", src, where, kind)
    return f"feature_extractor block written with {kind} defaults (the source: {where})"


def _config(raw: dict, policy: Policy, report: Report, is_drafter: bool = False) -> dict:
    cfg = dict(raw)
    conversion = {"tool": "gemma4-mlx convert", "recipe": policy.recipe}
    if is_drafter:
        conversion["drafter"] = True
    else:
        conversion["converted"] = report.converted
    conversion["skipped"] = report.skipped
    if report.skipped.get("skipped"):
        conversion["note"] = (
            f"{report.skipped['skipped']} checkpoint tensors have no place in this "
            "model and were left out (vision/audio tensors without a vision_config / "
            "audio_config, multi_modal_projector, rotary buffers)"
        )
    if report.processor_config:
        conversion["processor_config"] = report.processor_config
    cfg["gemma4_mlx_conversion"] = conversion
    if policy.base.quantized:
        base = policy.base
        towers = any(t in report.converted for t in _TOWERS)
        cfg["quantization"] = {
            "recipe": policy.recipe,
            "mode": base.mode,
            "bits": base.bits,
            "group_size": base.group_size,
            "policy": policy.describe(is_drafter, towers=towers),
            "tensors": dict(sorted(report.tensors.items())),
        }
    else:
        # transformers 5 writes `dtype`, older versions `torch_dtype`: update what is there
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[k] = policy.base.dtype
        text = cfg.get("text_config")
        if isinstance(text, dict):
            cfg["text_config"] = {**text, **{k: policy.base.dtype for k in ("dtype", "torch_dtype") if k in text}}
    return cfg


def _copy_through(src: Path, dst: Path) -> None:
    """Tokenizer, chat template, processor and generation configs, README, licence;
    not over a file the conversion wrote itself (processor_config.json)."""
    for f in sorted(src.iterdir()):
        if (
            f.is_file()
            and not f.name.startswith(".")
            and f.suffix not in _NOT_COPIED
            and f.name not in _REWRITTEN
            and not (dst / f.name).exists()
        ):
            shutil.copy2(f, dst / f.name)
