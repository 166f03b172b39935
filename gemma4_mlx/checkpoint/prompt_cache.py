"""Prompt caches on disk: a model's KV cache for some tokens, saved so a later run
starts from it (docs/kv-cache.md §8).

The file (`cache.disk`) names the model it was made for by a *fingerprint* of its
checkpoint folder (`files.fingerprint`): config.json, every weight file's name, size
and safetensors header, and samples of the weight bytes — small tensors whole, a few
KiB at fixed places of each large one — so two fine-tunes of one base model tell
apart, at a few reads per tensor on a 60 GB checkpoint; a change only between the
samples goes unseen (docs/kv-cache.md §8).  Beside it: the K/V dtype the model ran
in, the cache's kv_bits, and per cached slot its key: the token id, or at media
placeholders the medium's content key (`MediaPrompt.keys`).  A file made for
another model, dtype or kv_bits is refused with one line saying what differs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.cache import LayerCaches, disk
from gemma4_mlx.cache.disk import CacheFileError
from gemma4_mlx.checkpoint.files import fingerprint

__all__ = ["CacheFileError", "PromptCache", "fingerprint", "load_prompt_cache", "save_prompt_cache"]


def model_identity(model) -> tuple[str, str]:
    """(checkpoint name, fingerprint) of a model loaded from a folder (`load_model`
    records it as `model.folder`)."""
    folder = getattr(model, "folder", None)
    if folder is None:
        raise ValueError("this model was not loaded from a checkpoint folder: a prompt cache cannot name it")
    return Path(folder).name, fingerprint(folder)


def kv_dtype(model) -> str:
    """The float dtype the model's K/V are computed in (that of its activations)."""
    return str(model.embed(mx.array([[0]])).dtype).rsplit(".", 1)[-1]


@dataclass
class PromptCache:
    """A loaded prompt cache: the caches, the key of every cached slot, and what the
    saver stored beside them (a saved chat's conversation)."""

    cache: LayerCaches
    keys: list
    extra: dict = field(default_factory=dict)


def save_prompt_cache(path: str | Path, model, cache: LayerCaches, keys: Sequence, extra: dict | None = None) -> None:
    """Write `cache` (single row, holding exactly `keys`) for `model` to `path`."""
    cache = LayerCaches.of(cache)
    if len(keys) != cache.offset:
        raise ValueError(f"the cache holds {cache.offset} slots but {len(keys)} keys were given")
    name, fp = model_identity(model)
    meta = {
        "model": name,
        "fingerprint": fp,
        "model_dtype": kv_dtype(model),
        "tokens": json.dumps([list(k) if isinstance(k, tuple) else int(k) for k in keys]),
        "extra": json.dumps(extra or {}, ensure_ascii=False, default=str),
    }
    disk.save(path, cache, meta)


def load_prompt_cache(
    path: str | Path, model, *, kv_bits: int | str | None = None, max_rollback: int = 64
) -> PromptCache:
    """The prompt cache in `path`, restored into fresh caches of `model`
    (`make_cache(max_rollback=, kv_bits=)`); CacheFileError (one line) if the file
    is damaged or was made for another model, dtype or kv_bits.  kv_bits "saved":
    the file's own."""
    tensors, meta = disk.read(path)
    name, fp = model_identity(model)
    if meta.get("fingerprint") != fp:
        raise CacheFileError(
            f"{path}: made for another model ({meta.get('model')!r}, fingerprint {str(meta.get('fingerprint'))[:12]}), "
            f"not {name!r} (fingerprint {fp[:12]})"
        )
    dtype = kv_dtype(model)
    if meta.get("model_dtype") != dtype:
        raise CacheFileError(f"{path}: made with the model in {meta.get('model_dtype')}, this one runs in {dtype}")
    if kv_bits == "saved":
        kv_bits = int(meta["kv_bits"]) if meta.get("kv_bits") in ("16", "8", "4") else None
    want = 16 if kv_bits in (None, 16) else kv_bits
    if meta.get("kv_bits") != str(want):
        have = meta.get("kv_bits")
        raise CacheFileError(f"{path}: its KV cache is {have}-bit, this run uses {want}-bit (--kv-bits {have})")
    keys, extra = _keys(path, meta, model.config.vocab_size), _json(path, meta, "extra", dict)
    cache = model.make_cache(max_rollback=max_rollback, kv_bits=kv_bits)
    shapes = [None if s.shared else (s.kv_heads, s.head_dim) for s in model.config.layers]
    disk.restore(path, tensors, meta, cache, shapes)
    if cache.offset != len(keys):
        raise CacheFileError(f"{path}: {len(keys)} tokens listed for a cache of {cache.offset} slots")
    return PromptCache(cache, keys, extra)


def _json(path, meta: dict, name: str, kind: type):
    try:
        value = json.loads(meta[name])
    except (KeyError, ValueError, RecursionError):  # values are strings: mx.load refuses others
        raise CacheFileError(f"{path}: malformed cache metadata ({name})") from None
    if not isinstance(value, kind):
        raise CacheFileError(f"{path}: malformed cache metadata ({name} is not a {kind.__name__})")
    return value


def _keys(path, meta: dict, vocab_size: int) -> list:
    """The cached slots' keys: token ids, and (content hash, run, index) at media."""
    keys = []
    for k in _json(path, meta, "tokens", list):
        if isinstance(k, int) and not isinstance(k, bool) and 0 <= k < vocab_size:
            keys.append(k)
        elif (
            isinstance(k, list)
            and len(k) == 3
            and isinstance(k[0], str)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in k[1:])
        ):
            keys.append(tuple(k))
        else:
            raise CacheFileError(f"{path}: malformed cache metadata (token {k!r})")
    return keys
