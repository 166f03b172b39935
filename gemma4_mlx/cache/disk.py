"""A model's caches in a safetensors file, and back (docs/kv-cache.md §8).

What is written is each cache-owning layer's *retained* K and V (`LayerCache.state`:
a float array, or the three components of a quantized buffer), plus per layer the
slot bookkeeping a cache needs to go on exactly: its offset (slots written) and,
for a sliding layer, its window.  A restored cache holds the same entries at the
same slots, so everything after the restore — attention, trim, more writes — is
what the never-saved cache would have done, bit for bit.

Only single-row, unpadded caches are saved (a prompt or a chat: batches are built
from such rows, `cache.rows`).  The caller adds its own metadata (the model's
fingerprint, the tokens); this module adds a checksum over every tensor's bytes,
so a file damaged after it was written is refused, not decoded into garbage.
Writes go to a temporary file in the same folder and are renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.cache.caches import LayerCaches

FORMAT = "gemma4-mlx-kv-cache"
VERSION = "1"
PARTS = ("codes", "scales", "biases")  # a quantized buffer's components, in `mx.quantize` order
MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on a header
_FLOATS = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class CacheFileError(ValueError):
    """A cache file that cannot be used; the message is one line naming the file."""


def _name(layer: int, which: str, part: str | None) -> str:
    return f"layers.{layer}.{which}" + (f".{part}" if part else "")


def _dtype_name(dt) -> str:
    return str(dt).rsplit(".", 1)[-1]


def _checksum(tensors: dict[str, mx.array]) -> str:
    """blake2b over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        raw = t.view(mx.uint16) if t.dtype == mx.bfloat16 else t  # numpy has no bfloat16
        h.update(np.ascontiguousarray(np.asarray(raw)).tobytes())
    return h.hexdigest()


def to_tensors(caches: LayerCaches) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(tensors, metadata) of a single-row cache; ValueError for what cannot be saved."""
    tensors, layers, dtypes, bits = {}, [], set(), set()
    for i, c in enumerate(caches):
        if c is None:  # a KV-shared consumer layer owns no cache
            layers.append(None)
            continue
        if c.left_pad is not None or (c.keys is not None and kvs.batch(c.keys) != 1):
            raise ValueError("only a single unpadded row's cache can be saved (not a batch)")
        info = {"offset": c.offset, "window": c.window}
        if c.key_split is not None:  # the keys' rotated dims only (docs/kv-cache.md §7)
            info["split_keys"] = c.key_split.width
        layers.append(info)
        bits.add(c.kv_bits or 16)
        for which, buf in zip(("keys", "values"), c.state):
            if buf is None:
                continue
            parts = zip(PARTS, buf) if isinstance(buf, tuple) else [(None, buf)]
            for part, t in parts:
                tensors[_name(i, which, part)] = t
            dtypes.add(_dtype_name((buf[1] if isinstance(buf, tuple) else buf).dtype))  # scales: the float dtype
    if not tensors:
        raise ValueError("the cache is empty: nothing to save")
    if len(bits) != 1 or len(dtypes) != 1:
        raise ValueError(f"the layers' caches disagree on kv_bits {sorted(bits)} / dtype {sorted(dtypes)}")
    meta = {"layers": json.dumps(layers), "kv_bits": str(bits.pop()), "dtype": dtypes.pop()}
    return tensors, meta


def save(path: str | Path, caches: LayerCaches, metadata: dict[str, str] | None = None) -> None:
    """Write `caches` (single row) and `metadata` (str -> str) to `path`, atomically."""
    path = Path(path)
    tensors, meta = to_tensors(caches)
    mx.eval(list(tensors.values()))
    meta = {**(metadata or {}), **meta, "format": FORMAT, "version": VERSION, "checksum": _checksum(tensors)}
    # mx.save_safetensors names the file itself (it adds the suffix): give it one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), tensors, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # MLX reports a file it cannot open as RuntimeError
        raise CacheFileError(f"{path}: cannot write the cache file ({' '.join(str(e).split())})") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a cache file, from its header alone (no tensor is read)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"header length {n}")
            meta = json.loads(f.read(n)).get("__metadata__", {})
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise CacheFileError(f"{path}: unreadable or truncated cache file ({' '.join(str(e).split())})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a gemma4-mlx KV cache file (no format tag {FORMAT!r})")
    _check_strings(path, meta)
    return meta


def _check_strings(path, meta: dict) -> None:
    """Safetensors metadata maps strings to strings; a crafted header may not."""
    if bad := next((k for k, v in meta.items() if not isinstance(v, str)), None):
        raise CacheFileError(f"{path}: malformed cache metadata ({bad} is not a string)")


def read(path: str | Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """(tensors, metadata) of a cache file whose bytes are intact; CacheFileError else."""
    path = Path(path)
    if not path.is_file():
        raise CacheFileError(f"{path}: no such file")
    try:
        tensors, meta = mx.load(str(path), format="safetensors", return_metadata=True)
    except (RuntimeError, ValueError, OSError) as e:
        raise CacheFileError(f"{path}: unreadable or truncated cache file ({' '.join(str(e).split())})") from None
    if meta.get("format") != FORMAT:
        raise CacheFileError(f"{path}: not a gemma4-mlx KV cache file (no format tag {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise CacheFileError(f"{path}: cache file version {meta.get('version')!r}, this gemma4-mlx reads {VERSION}")
    if bad := next((n for n, t in tensors.items() if any(d < 0 for d in t.shape)), None):
        raise CacheFileError(f"{path}: malformed tensor {bad} (shape {list(tensors[bad].shape)})")
    try:
        intact = _checksum(tensors) == meta.get("checksum")
    except (RuntimeError, ValueError, OSError) as e:  # the tensors' bytes are read here
        raise CacheFileError(f"{path}: unreadable or truncated cache file ({' '.join(str(e).split())})") from None
    if not intact:
        raise CacheFileError(f"{path}: corrupt cache file (its tensors do not match their checksum)")
    return tensors, meta


def restore(
    path: str | Path,
    tensors: dict[str, mx.array],
    meta: dict[str, str],
    into: LayerCaches,
    shapes: Sequence[tuple[int, int] | None],
) -> None:
    """Fill the fresh caches `into` from a file's tensors; shapes: per layer the
    (kv heads, head dim) the model expects (None at KV-shared layers).  Every field
    is checked first: a refused file leaves `into` as it was."""
    try:
        layers = json.loads(meta["layers"])
        dtype = _FLOATS[meta["dtype"]]
    except (KeyError, ValueError, TypeError, RecursionError):
        raise CacheFileError(f"{path}: malformed cache metadata (layers / dtype)") from None
    if _FLOATS.get(meta.get("model_dtype"), dtype) != dtype:  # K/V are stored in the model's dtype
        raise CacheFileError(f"{path}: K/V stored as {meta['dtype']} for a {meta['model_dtype']} model")
    bits = {c.kv_bits or 16 for c in into.writers()}
    if meta.get("kv_bits") != str(min(bits)) or len(bits) != 1:
        raise CacheFileError(f"{path}: its KV cache is {meta.get('kv_bits')}-bit, these caches are {min(bits)}-bit")
    if not isinstance(layers, list) or len(layers) != len(into):
        raise CacheFileError(f"{path}: holds {_count(layers)} layers, the model has {len(into)}")
    states = []
    for i, (info, c, shape) in enumerate(zip(layers, into, shapes)):
        if (info is None) != (c is None):
            raise CacheFileError(f"{path}: layer {i}: {'no' if info is None else 'a'} cache, the model has the other")
        states.append(None if c is None else _layer_state(path, i, info, c, shape, tensors, dtype))
    offsets = sorted({s["offset"] for s in states if s is not None})
    if len(offsets) > 1:  # every layer has seen the same tokens; `cache.offset` reads one of them
        raise CacheFileError(f"{path}: its layers disagree on the tokens they hold ({offsets[0]} .. {offsets[-1]})")
    used = {_name(i, w, p) for i in range(len(into)) for w in ("keys", "values") for p in (None, *PARTS)}
    if extra := sorted(set(tensors) - used):
        raise CacheFileError(f"{path}: unexpected tensor {extra[0]}")
    for c, s in zip(into, states):
        if c is not None:
            c.restore(s)


def _count(layers) -> str:
    return str(len(layers)) if isinstance(layers, list) else "no list of"


def _layer_state(path, i: int, info, cache, shape, tensors, dtype) -> dict:
    """The snapshot `LayerCache.restore` takes for layer i, after checking it."""
    where = f"{path}: layer {i}"
    if not isinstance(info, dict) or not isinstance(info.get("offset"), int) or info["offset"] < 0:
        raise CacheFileError(f"{where}: malformed layer entry")
    if info.get("window") != cache.window:
        raise CacheFileError(f"{where}: sliding window {info.get('window')}, the model's is {cache.window}")
    # a quantized K = V layer's keys hold only the rotated dims (docs/kv-cache.md §7)
    split = None if cache.key_split is None else cache.key_split.width
    if info.get("split_keys") != split:
        have, want = (f"{n} rotated dims" if n else "whole" for n in (info.get("split_keys"), split))
        raise CacheFileError(f"{where}: keys stored {have}, this model's cache keeps them {want}")
    key_shape = shape if split is None else (shape[0], split)
    bufs = [
        _buffer(where, w, tensors, i, cache.kv_bits, s, dtype) for w, s in zip(("keys", "values"), (key_shape, shape))
    ]
    if (bufs[0] is None) != (bufs[1] is None):
        raise CacheFileError(f"{where}: keys and values must both be present or both absent")
    size = 0 if bufs[0] is None else kvs.length(bufs[0])
    if bufs[0] is not None and kvs.length(bufs[1]) != size:
        raise CacheFileError(f"{where}: keys hold {size} slots, values {kvs.length(bufs[1])}")
    offset = info["offset"]
    # a sliding layer must still hold every key the next query's window reads
    need = offset if cache.window is None else min(cache.window - 1, offset)
    if not need <= size <= offset:
        raise CacheFileError(f"{where}: {size} entries for offset {offset} (needs {need} to {offset})")
    kv = None if bufs[0] is None else tuple(bufs)
    return {"kv": kv, "offset": offset, "left_pad": None, "valid_from": None}


def _buffer(where, which, tensors, i, bits, shape, dtype):
    """One K or V buffer of layer i (array or quantized triple), its shapes checked."""
    names = [_name(i, which, None)] if bits is None else [_name(i, which, p) for p in PARTS]
    present = [n in tensors for n in names]
    if not any(present):
        return None
    if not all(present):
        raise CacheFileError(f"{where}: {names[present.index(False)]} missing")
    heads, head_dim = shape
    group, padded = kvs.layout(head_dim)
    widths = [head_dim] if bits is None else [padded * bits // 32, padded // group, padded // group]
    dtypes = [dtype] if bits is None else [mx.uint32, dtype, dtype]
    parts = [tensors[n] for n in names]
    slots = parts[0].shape[2] if parts[0].ndim == 4 else -1
    for n, t, w, dt in zip(names, parts, widths, dtypes):
        if tuple(t.shape) != (1, heads, slots, w) or t.dtype != dt:
            want = f"[1, {heads}, S, {w}] {_dtype_name(dt)}"
            raise CacheFileError(f"{where}: {n} is {list(t.shape)} {_dtype_name(t.dtype)}, expected {want}")
    return parts[0] if bits is None else tuple(parts)
