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
from mlx.utils import tree_flatten

from .config import ConfigError, ModelConfig, read_config
from .models.text import Model

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
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past end of file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"file is truncated: {size} bytes, tensors need {8 + n + end}")
        return mx.load(str(path))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise LoadError(f"{path}: unreadable safetensors ({e})") from None


# -- checkpoint quirks ------------------------------------------------------

_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.", ""))
_SKIP = re.compile(r"^(model\.)?(vision_tower|embed_vision|audio_tower|embed_audio|"
                   r"multi_modal_projector)\.|rotary_emb|\.v_norm\.")


def sanitize(weights: dict[str, mx.array], model: Model) -> dict[str, mx.array]:
    """Map checkpoint keys onto `Model` (text-decoder spec §8.3)."""
    cfg = model.config
    out = {}
    dropped_shared = 0
    for key, value in weights.items():
        for old, new in _PREFIXES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        if _SKIP.search(key):
            continue
        if key == "lm_head.weight":
            out[key] = value  # checked against the embedding once every shard is read
            continue
        m = re.match(r"model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|k_norm)\.", key)
        if m and int(m.group(1)) < len(cfg.layers) and cfg.layers[int(m.group(1))].shared:
            dropped_shared += 1  # official E2B/E4B files carry unused consumer K/V
            continue
        key = key.replace(".switch_glu.", ".experts.")  # mlx-community naming
        if key.endswith(".experts.gate_up_proj"):
            gate, up = mx.split(value, 2, axis=1)
            base = key[: -len("gate_up_proj")]
            out[base + "gate_proj.weight"] = gate
            out[base + "up_proj.weight"] = up
            continue
        if key.endswith(".experts.down_proj"):
            key += ".weight"
        out[key] = value
    if dropped_shared:
        log.info("dropped %d unused KV-shared-layer tensors", dropped_shared)
    return out


def check_and_assign(model: Model, weights: dict[str, mx.array], source: str) -> None:
    expected = dict(tree_flatten(model.parameters()))
    for key, value in weights.items():
        if key not in expected:
            raise LoadError(f"{source}: unexpected tensor {key} {tuple(value.shape)}")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise LoadError(f"{source}: tensor {key} has shape {tuple(value.shape)}, "
                            f"config says {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise LoadError(f"{source}: missing tensor {missing[0]}{more}")
    model.load_weights(list(weights.items()), strict=False)


# -- public API -------------------------------------------------------------

def load_model(path: str | Path, dtype: str | None = None) -> tuple[Model, ModelConfig]:
    folder = Path(path)
    if not folder.is_dir():
        raise LoadError(f"{folder}: not a folder")
    try:
        config = read_config(folder)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    model = Model(config.text)
    if dtype is not None and dtype not in DTYPES:
        raise LoadError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    weights: dict[str, mx.array] = {}
    for f in weight_files(folder):
        weights.update(sanitize(read_safetensors(f), model))
    head = weights.pop("lm_head.weight", None)
    if head is not None:
        emb = weights.get("model.embed_tokens.weight")
        if emb is None or emb.shape != head.shape or not mx.array_equal(emb, head).item():
            raise LoadError(f"{folder}: lm_head.weight differs from embed_tokens.weight; "
                            "Gemma 4 ties them")
    if dtype is not None:
        target = DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != target
                   else v for k, v in weights.items()}
    check_and_assign(model, weights, str(folder))
    model.eval()
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


def load(path: str | Path, dtype: str | None = None):
    """Load `(model, tokenizer)` from a checkpoint folder or hub id.

    tokenizer is None when the folder ships no tokenizer files.
    dtype: None keeps the stored dtype; "float32" (or "bfloat16", "float16") casts.
    """
    folder = resolve_path(str(path))
    model, config = load_model(folder, dtype)
    return model, load_tokenizer(folder, config.eos_ids or None)
