"""Load an HF-format (or our own MLX-format) Gemma 4 folder into `Model`.

Errors are one line naming the file or tensor (`LoadError`).  Weights are read
with `mx.load`, which maps safetensors lazily, and assigned straight into the
module tree, so only one copy of each tensor ever exists.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gemma4_mlx.config import ConfigError, ModelConfig, read_config
from gemma4_mlx.models.layers import CLAMPS
from gemma4_mlx.models.ple_table import MappedTable
from gemma4_mlx.models.text import Model
from gemma4_mlx.formats.safetensors import read_header
from gemma4_mlx.models.audio import sanitize as audio_sanitize
from gemma4_mlx.models.quantized import KERNEL_PARAMS
from gemma4_mlx.models.layers import Linear
from gemma4_mlx.models.moe import ExpertLinear, QuantizedExpertLinear
from gemma4_mlx.models.quantized import QEmbedding, QLinear
from gemma4_mlx.config import ConfigError
from gemma4_mlx.models.assistant import AssistantConfig, Drafter, check_pair

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


# -- reading tensors --------------------------------------------------------

def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: malformed index ({e})") from None
        files = [folder / n for n in names]
        for f in files:
            if not f.exists():
                raise LoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder}: no *.safetensors files")
    return files


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Validate the header against the file size, then map the tensors lazily."""
    try:
        data_start, header = read_header(path)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        size = path.stat().st_size
        if data_start + end > size:
            raise ValueError(f"file is truncated: {size} bytes, tensors need {data_start + end}")
        return mx.load(str(path))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise LoadError(f"{path}: unreadable safetensors ({e})") from None


# -- checkpoint quirks ------------------------------------------------------

_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.", ""))
_SKIP = re.compile(r"^(model\.)?multi_modal_projector\.|rotary_emb|\.v_norm\.")
# Tower tensors in checkpoint naming (HF `model.vision_tower.*`, mlx-vlm `vision_tower.*`)
# and in ours (`vision.vision_tower.*`, what `gemma4-mlx convert` writes).
_TOWER = re.compile(r"^(?:model\.)?(vision_tower|embed_vision|audio_tower|embed_audio)\.")
_OURS = re.compile(r"^(vision|audio)\.")


def rename(key: str) -> str:
    """Checkpoint key (or module path) -> our module tree: strip the wrapper prefix;
    mlx-community stacks experts as `experts.switch_glu.*` (mlx-vlm/mlx-lm SwitchGLU)."""
    for old, new in _PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if ".experts.switch_glu." in key:
        return key.replace(".experts.switch_glu.", ".experts.")
    return key.replace(".switch_glu.", ".experts.")


def module_path(key: str) -> str:
    """A checkpoint module path (mlx-vlm per-module quantization entries) -> ours;
    tower paths gain their owner (`vision_tower.x` -> `vision.vision_tower.x`)."""
    m = _TOWER.match(key)
    if m:
        owner = "vision" if "vision" in m.group(1) else "audio"
        return f"{owner}.{key[m.start(1):]}"
    return rename(key)


def sanitize(weights: dict[str, mx.array], model: Model, stats: dict | None = None) -> dict[str, mx.array]:
    """Map checkpoint keys onto `Model` (text-decoder spec §8.3).

    stats, if given, counts what was left out: "skipped" (vision/audio/rotary
    tensors) and "shared_kv" (unused K/V of KV-shared layers).
    """
    cfg = model.config
    out, towers = {}, {"vision": {}, "audio": {}}
    dropped_shared = skipped = 0
    for key, value in weights.items():
        tower = _TOWER.match(key) or _OURS.match(key)
        if tower:
            name = "vision" if "vision" in tower.group(1) else "audio"
            if name not in model:  # text-only model (or a checkpoint with extra towers)
                skipped += 1
            elif _OURS.match(key):
                out[key] = value
            else:
                towers[name][key] = value
            continue
        key = rename(key)
        if _SKIP.search(key):
            skipped += 1
            continue
        if key == "lm_head.weight":
            out[key] = value  # checked against the embedding once every shard is read
            continue
        m = re.match(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.", key)
        if m and int(m.group(1)) < len(cfg.layers) and cfg.layers[int(m.group(1))].shared:
            dropped_shared += 1  # official E2B/E4B files carry unused consumer K/V
            continue
        if key.endswith(".experts.gate_up_proj"):
            gate, up = mx.split(value, 2, axis=1)
            base = key[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = gate
            out[base + "up_proj.weight"] = up
            continue
        if key.endswith(".experts.down_proj"):
            key += ".weight"
        out[key] = value
    if towers["vision"]:
        out.update(("vision." + k, v) for k, v in model.vision.sanitize(towers["vision"]).items())
    if towers["audio"]:
        out.update(("audio." + k, v) for k, v in audio_sanitize(towers["audio"]).items())
    if dropped_shared:
        log.info("dropped %d unused KV-shared-layer tensors", dropped_shared)
    if stats is not None:
        stats["skipped"] = stats.get("skipped", 0) + skipped
        stats["shared_kv"] = stats.get("shared_kv", 0) + dropped_shared
    return out


# -- quantized checkpoints --------------------------------------------------
# Two layouts are read (spec quantization.md §1, text-decoder.md §8.3 step 7):
# - ours (`gemma4-mlx convert`): config.json `quantization.tensors` names the format
#   of every matmul/embedding weight; Q4_0 stores no biases (they are -8 * scales and
#   derived here), SFP8 stores mxfp8 codes plus an fp32 `tensor_scale`;
# - mlx-lm / mlx-vlm (mlx-community): a module is quantized iff `<path>.scales`
#   exists; parameters from a per-path entry, else the block's group_size/bits/mode.

_QUANT_META = (".scales", ".biases", ".tensor_scale")


def quantization_block(raw: dict, source: str) -> dict | None:
    q = raw.get("quantization")
    if q is None:
        qc = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
        if not qc:
            return None
        if not isinstance(qc, dict) or not ("bits" in qc or "group_size" in qc):
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise LoadError(f"{source}: quantization_config (quant_method {method!r}) is not an MLX "
                            "format; convert the unquantized checkpoint with `gemma4-mlx convert`")
        q = qc
    if not isinstance(q, dict):
        raise LoadError(f"{source}: `quantization` must be an object, got {type(q).__name__}")
    return q


def _kernel_params(path: str, q: dict, overrides: dict, source: str) -> dict | None:
    """MLX kernel parameters (format, mode, bits, group_size) for module `path`."""
    entry = (q.get("tensors") or {}).get(path)
    if entry is not None:  # ours: every entry names its format
        fmt = entry.get("format")
    else:
        entry = overrides.get(path)
        if entry is False:
            return None
        if isinstance(entry, dict):  # mlx-lm passes it to to_quantized(): affine unless it says
            fmt = entry.get("mode", "affine")
        else:
            entry, fmt = q, q.get("mode", "affine")
    if fmt not in KERNEL_PARAMS:
        raise LoadError(f"{source}: {path}: unknown quantization format {fmt!r}")
    fixed = KERNEL_PARAMS[fmt]
    if fixed is not None:
        return dict(fixed, format=fmt)
    # MLX's affine defaults (group 64, 4 bits) when an entry leaves them out
    return {"mode": "affine", "bits": int(entry.get("bits") or 4),
            "group_size": int(entry.get("group_size") or 64), "format": "affine"}


def apply_quantization(model: Model, weights: dict[str, mx.array], q: dict, source: str) -> None:
    """Swap every module whose weights come quantized for its quantized variant.

    Runs before `check_and_assign`, so shapes are then checked against the
    quantized layout.
    """
    from mlx.utils import tree_map_with_path

    overrides = {module_path(k): v for k, v in q.items()
                 if isinstance(v, (dict, bool)) and k not in ("tensors", "policy")}

    def swap(path: str, m):
        if f"{path}.scales" not in weights:
            return m
        p = _kernel_params(path, q, overrides, source)
        if p is None:
            raise LoadError(f"{source}: {path}.scales present but config.json marks {path} unquantized")
        # Q4_0 stores no biases (-8 * scales): the module derives them per product,
        # so none are resident either (4.5 bits per weight, spec §1).
        derive = p["format"] == "q4_0" and f"{path}.biases" not in weights
        kw = dict(group_size=p["group_size"], bits=p["bits"], mode=p["mode"],
                  tensor_scale=f"{path}.tensor_scale" in weights, derive_biases=derive)
        try:
            if isinstance(m, ExpertLinear):
                E, out_dims, in_dims = m.weight.shape
                return QuantizedExpertLinear(E, in_dims, out_dims, **kw)
            if isinstance(m, (Linear, nn.Linear)):
                out_dims, in_dims = m.weight.shape
                return QLinear(in_dims, out_dims, **kw)
            if isinstance(m, nn.Embedding):
                return QEmbedding(*m.weight.shape, **kw)
        except ValueError as e:
            raise LoadError(f"{source}: {path}: cannot build quantized module ({e})") from None
        raise LoadError(f"{source}: {path}.scales present but {type(m).__name__} cannot be quantized")

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))


def _cast(key: str, v: mx.array, target) -> mx.array:
    if not mx.issubdtype(v.dtype, mx.floating) or v.dtype == target:
        return v
    if key.endswith(CLAMPS):
        return v  # the towers' clamp bounds stay float32 (multimodal spec §6.3)
    if key.endswith(_QUANT_META) and target != mx.float32:
        return v  # never narrow quantization metadata (fp16 Q4_0 scales are lossy in bf16)
    return v.astype(target)


def check_and_assign(model: Model, weights: dict[str, mx.array], source: str) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in expected:
            raise LoadError(f"{source}: unexpected tensor {key} {tuple(value.shape)}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LoadError(f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                            f"config says {tuple(expected[key].shape)}")
    # Clamp bounds absent from a checkpoint keep their default (+-inf: no clamp).
    missing = [k for k in expected if k not in weights and not k.endswith(CLAMPS)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"{source}: missing tensor {missing[0]}{more}")
    model.load_weights(list(weights.items()), strict=False)


def drop_tied_head(weights: dict[str, mx.array], folder: Path) -> None:
    """Gemma 4 models and drafters tie the head to `model.embed_tokens`: a stored
    `lm_head.weight` is dropped if it is an exact copy, refused otherwise."""
    head = weights.pop("lm_head.weight", None)
    if head is not None:
        emb = weights.get("model.embed_tokens.weight")
        if emb is None or emb.shape != head.shape or not mx.array_equal(emb, head).item():
            raise LoadError(f"{folder}: lm_head.weight differs from embed_tokens.weight; "
                            "Gemma 4 ties them")


def finish(model: nn.Module, weights: dict[str, mx.array], dtype: str | None, folder: Path) -> None:
    """Assign the checked weights, tell quantized tables the activation dtype, eval mode."""
    check_and_assign(model, weights, str(folder))
    norm = weights.get("model.norm.weight")
    act = DTYPES[dtype] if dtype is not None else (norm.dtype if norm is not None else None)
    for _, m in model.named_modules():
        if hasattr(m, "out_dtype"):
            m.out_dtype = act  # quantized tables return rows in the activation dtype
    model.eval()


# -- memory-mapped PLE table ------------------------------------------------
# E2B/E4B's per-layer-embedding table (4.7/5.6 GB bf16) is only row-gathered, so by
# default it stays mapped in its safetensors file instead of in MLX memory (spec
# quantization.md §6, §10).  A quantized table (converter asked for it) is loaded
# as usual.  Only done when the stored dtype is kept (dtype None): an explicit
# dtype asks for a resident cast copy, and the test/tooling paths that load with
# dtype="float32" and rebuild models from `parameters()` need every tensor there.
# (`MappedTable(out_dtype=...)` can cast per gathered row, exact, if wanted later.)

PLE_KEY = "model.embed_tokens_per_layer.weight"


def map_ple_table(model: Model, weights: dict[str, mx.array], src: tuple[Path, str],
                  source: str) -> bool:
    """Swap the PLE nn.Embedding for a `MappedTable`; False (nothing changed) if unmappable."""
    f, name = src
    try:
        table = MappedTable(f, name)
    except ValueError as e:  # e.g. a dtype numpy cannot map: load it the ordinary way
        log.info("PLE table not mapped: %s", e)
        return False
    want = tuple(model.model.embed_tokens_per_layer.weight.shape)
    if table.shape != want:
        raise LoadError(f"{source}: tensor {PLE_KEY} has shape {table.shape}, config says {want}")
    del weights[PLE_KEY]  # the lazy mx.load array is dropped unread
    model.model.embed_tokens_per_layer = table  # a plain attribute: not a parameter
    return True


def drop_absent_towers(model: Model, weights: dict, folder: Path) -> None:
    """A tower that config.json declares but whose tensors are all absent is left out
    with a one-line notice (mlx-lm's text-only conversions keep `audio_config` and drop
    the tower); media for it then get a clear error.  A partly present tower stays a
    missing-tensor error."""
    for name in ("vision", "audio"):
        if name in model and not any(k.startswith(name + ".") for k in weights):
            del model[name]
            log.warning("%s: config.json declares a%s %s tower but the checkpoint has none of its "
                        "tensors; loaded without it (%s input is refused)", folder,
                        "n" if name == "audio" else "", name, "image and video" if name == "vision" else name)


# -- public API -------------------------------------------------------------

def load_model(path: str | Path, dtype: str | None = None, map_ple: bool = False,
               text_only: bool = False) -> tuple[Model, ModelConfig]:
    """map_ple: keep an unquantized PLE table memory-mapped (see `map_ple_table`).
    Off here so `info.resident_bytes` and weight-level tooling see every tensor.
    text_only: leave the vision/audio towers out.  (With them, their weights stay
    lazily mapped until the first image or clip is encoded.)"""
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a folder")
    try:
        config = read_config(folder)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    try:
        model = Model.from_config(config, text_only=text_only)
    except ValueError as e:
        raise LoadError(f"{folder / 'config.json'}: {e}") from None
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    weights: dict[str, mx.array] = {}
    ple_src = None  # (file, checkpoint key) of the PLE table
    for f in weight_files(folder):
        raw = read_safetensors(f)
        ple_src = next(((f, k) for k in raw if rename(k) == PLE_KEY), ple_src)
        weights.update(sanitize(raw, model))
        del raw
    drop_tied_head(weights, folder)
    drop_absent_towers(model, weights, folder)
    q = quantization_block(config.raw, str(folder / "config.json"))
    if q is not None:
        apply_quantization(model, weights, q, str(folder))
    if (map_ple and dtype is None and ple_src is not None and PLE_KEY in weights
            and PLE_KEY.replace(".weight", ".scales") not in weights):
        map_ple_table(model, weights, ple_src, str(folder))
    if dtype is not None:
        target = DTYPES[dtype]
        weights = {k: _cast(k, v, target) for k, v in weights.items()}
    finish(model, weights, dtype, folder)
    model.folder = folder  # where processor_config.json (image budget, audio front end) lives
    return model, config


def load_tokenizer(folder: Path, eos_ids=None):
    """mlx-lm's TokenizerWrapper (streaming detokeniser), or None without tokenizer files."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        return None
    from mlx_lm.tokenizer_utils import load as load_wrapper

    return load_wrapper(folder, eos_token_ids=eos_ids)


def resolve_path(path_or_repo: str) -> Path:
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_repo):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path_or_repo, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]))
        except Exception as e:  # offline, unknown repo, gated...
            raise LoadError(f"{path_or_repo}: not a local folder and not downloadable "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise LoadError(f"{path_or_repo}: no such folder")


def load(path: str | Path, dtype: str | None = None, map_ple: bool = True,
         text_only: bool = False):
    """Load `(model, tokenizer)` from a checkpoint folder or hub id.

    tokenizer is None when the folder ships no tokenizer files.
    dtype: None keeps the stored dtype; "float32" (or "bfloat16", "float16") casts.
    map_ple: with dtype None, serve an unquantized per-layer-embedding table from a
        memory map of its safetensors file instead of MLX memory.
    text_only: do not build the vision/audio towers.
    """
    folder = resolve_path(str(path))
    model, config = load_model(folder, dtype, map_ple=map_ple, text_only=text_only)
    return model, load_tokenizer(folder, config.eos_ids or None)


# -- MTP drafters -------------------------------------------------------------

DRAFTER_UNUSED_KEYS = re.compile(r"\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.")
_HEAD = "model.embed_tokens"
TOKEN_ORDERING_KEY = "masked_embedding.token_ordering"


def load_drafter(path: str | Path, dtype: str | None = None, target: Model | None = None):
    """Load a `gemma4_assistant` checkpoint (ours or HF) as a `Drafter`.

    target: checked for compatibility (hidden size, vocabulary, window, K/V layout).
    The centroid head's table is stored in `token_ordering` order (spec §5) when
    that is a permutation of the vocabulary.
    """
    import numpy as np

    folder = resolve_path(str(path))
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
        cfg = AssistantConfig.from_dict(raw, str(cfg_file))
        if target is not None:
            check_pair(cfg, target.config, str(folder))
    except FileNotFoundError:
        raise LoadError(f"{cfg_file}: not found") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{cfg_file}: not valid JSON ({e})") from None
    except ConfigError as e:
        raise LoadError(str(e)) from None
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    weights: dict[str, mx.array] = {}
    for f in weight_files(folder):
        for k, v in read_safetensors(f).items():
            if not DRAFTER_UNUSED_KEYS.search(k):  # the reference ignores these too
                weights[k] = v
    # Trust the tensors, not the config (spec §1): some configs declare centroids
    # that the files do not carry.
    has_centroids = TOKEN_ORDERING_KEY in weights
    if has_centroids != cfg.use_ordered_embeddings:
        log.info("%s: centroid head %s by the tensors present", folder,
                 "enabled" if has_centroids else "disabled")
        cfg.use_ordered_embeddings = has_centroids
    model = Drafter(cfg)
    drop_tied_head(weights, folder)
    q = quantization_block(raw, str(cfg_file))
    if q is not None:
        apply_quantization(model, weights, q, str(folder))
    if dtype is not None:
        weights = {k: _cast(k, v, DTYPES[dtype]) for k, v in weights.items()}
    if has_centroids:
        order = weights[TOKEN_ORDERING_KEY].astype(mx.int32)
        weights[TOKEN_ORDERING_KEY] = order
        V = cfg.text.vocab_size
        o = np.array(order)
        if o.shape != (V,) or (o.size and (o.min() < 0 or o.max() >= V)):
            raise LoadError(f"{folder}: {TOKEN_ORDERING_KEY} must hold {V} token ids in "
                            f"[0, {V}), got shape {tuple(o.shape)}")
        if (np.bincount(o, minlength=V) == 1).all():
            for suffix in (".weight", ".scales", ".biases"):
                if _HEAD + suffix in weights:
                    weights[_HEAD + suffix] = weights[_HEAD + suffix][order]
            model.ordered = True
        else:
            log.warning("%s: %s is not a permutation of the vocabulary; using the slower "
                        "unordered candidate gather", folder, TOKEN_ORDERING_KEY)
    finish(model, weights, dtype, folder)
    return model


def find_drafter(model: str | Path) -> Path | None:
    """The matching MTP drafter next to a target, if one is already on this machine:
    a sibling folder `<target>-assistant` (the hub's naming, e.g.
    `gemma-4-E2B-it-assistant`; the embedded demo's drafter is named so too), or the
    same repo id in the Hugging Face cache.  Never downloads."""
    p = Path(str(model)).expanduser()
    hub = re.search(r"models--([\w.-]+?)--([\w.-]+)/snapshots/", str(p.resolve()) + "/")
    if p.exists() and hub:  # a Hugging Face cache snapshot: look the drafter up by repo id
        return find_drafter(f"{hub.group(1)}/{hub.group(2)}")
    if p.exists():
        sib = p.with_name(p.name + "-assistant")
        return sib if (sib / "config.json").exists() else None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        try:
            from huggingface_hub import snapshot_download

            found = Path(snapshot_download(f"{model}-assistant", local_files_only=True))
            return found if (found / "config.json").exists() else None
        except Exception:  # not cached (or no hub at all): no drafter
            return None
    return None
