"""Checkpoint files: which safetensors files a folder holds, reading them lazily,
and the one error type of checkpoint loading (one line naming the file or tensor)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx

from gemma4_mlx.formats.safetensors import read_header

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class LoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def missing_tensors(source: str, missing: list[str]) -> str:
    """The one-line message for tensors a checkpoint lacks: the first, and how many more
    (the loader, the converter and the GGUF importer raise it in their own error type)."""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return f"{source}: missing tensor {missing[0]}{more}"


# -- reading tensors --------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = [folder / n for n in _shard_names(index)]
        for f in files:
            if not f.exists():
                raise LoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LoadError(f"{folder}: no *.safetensors files")
    return files


def _shard_names(index: Path) -> list[str]:
    """The shard files an index's weight_map names (sorted, once each); LoadError
    naming the index for anything else than {"weight_map": {tensor: file name}}."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise LoadError(f"{index}: malformed index ({' '.join(str(e).split()) or type(e).__name__})") from None
    names = weight_map.values() if isinstance(weight_map, dict) else None
    if names is None or not all(isinstance(n, str) and n and "/" not in n and n != ".." for n in names):
        raise LoadError(f"{index}: malformed index (weight_map must map tensor names to shard file names)")
    return sorted(set(names))


def kind_of(dtype) -> str:
    """floating / integer / bool: what a stored tensor must share with its parameter
    (an integer or bool tensor for a float weight loaded and ran, silently)."""
    if mx.issubdtype(dtype, mx.floating):
        return "floating point"
    return "bool" if dtype == mx.bool_ else "integer"


def tensor_mismatch(key: str, value: mx.array, param: mx.array) -> str | None:
    """Why a stored tensor cannot be the parameter `key` (shape, then kind), or None;
    the loader and the converter put their source in front."""
    if tuple(value.shape) != tuple(param.shape):
        return f"tensor {key} has shape {tuple(value.shape)}, config says {tuple(param.shape)}"
    if kind_of(value.dtype) != kind_of(param.dtype):
        return f"tensor {key} is {value.dtype}, expected {kind_of(param.dtype)}"
    return None


def claim_tensors(owners: dict, path: Path, names) -> None:
    """Record the shard `path` as holding `names`; LoadError naming both files for a
    tensor stored twice (read one after the other, the later copy silently won)."""
    for name in names:
        first = owners.setdefault(name, path)
        if first != path:
            raise LoadError(f"{path}: tensor {name} is also stored in {first.name}; a checkpoint holds each once")


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """Validate the header (offsets tile the data section exactly: `read_header`), then
    map the tensors lazily."""
    try:
        read_header(path)
        return mx.load(str(path))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise LoadError(f"{path}: unreadable safetensors ({e})") from None


# -- fingerprint ------------------------------------------------------------

# A tensor of up to WHOLE bytes is hashed whole; a larger one by SAMPLE-byte reads at
# its start, middle and end, plus two more per further SPREAD bytes (docs/kv-cache.md §8).
WHOLE = 64 * 1024
SAMPLE = 4 * 1024
SPREAD = 32 * 1024 * 1024


def fingerprint(folder: str | Path) -> str:
    """A short hash (32 hex digits) of a checkpoint folder's config.json and weights:
    names a model in prompt-cache files, and tells distributed ranks started with
    different models apart (docs/kv-cache.md §8).

    Per weight file: its name, size and safetensors header, then, per tensor (its byte
    range from the header), the bytes of a tensor up to 64 KiB whole and of a larger
    one 4 KiB samples at its start, middle and end (two more per further 32 MiB).  A
    fine-tune or LoRA merge changes every tensor it touches across its whole range, so
    the samples see it; a change confined to bytes between samples is NOT detected.
    Cost: a few reads per tensor, never the weights (a 60 GB checkpoint: tens of MB).
    A file whose header is not valid safetensors is hashed by raw samples of its bytes
    the same way (the loader reports it in one line): a distributed rank with such a
    file still reaches the fingerprint comparison.  An unreadable or missing file
    raises LoadError here, before the comparison."""
    folder = Path(folder)
    config = folder / "config.json"
    try:
        h = hashlib.sha256(config.read_bytes())
    except OSError as e:
        raise LoadError(f"{config}: unreadable ({e.strerror or e})") from None
    for f in weight_files(folder):
        h.update(f"\0{f.name}\0".encode())
        h.update(_file_digest(f))
    return h.hexdigest()[:32]


def _file_digest(path: Path) -> bytes:
    """The hash of one weight file (`fingerprint`)."""
    try:
        size = path.stat().st_size
        try:
            start, entries = read_header(path)
            spans = sorted((start + b, start + e) for b, e in (v["data_offsets"] for v in entries.values()))
        except (ValueError, RecursionError):  # what read_header raises on a malformed header
            start, spans = 0, [(0, size)]  # not safetensors: the whole file as one range
        h = hashlib.sha256(f"{size}\0".encode())
        fd = os.open(path, os.O_RDONLY)
        try:
            h.update(os.pread(fd, start, 0))  # the header, as read: names, dtypes, shapes, offsets
            for begin, end in spans:
                for at, n in _samples(begin, end):
                    h.update(os.pread(fd, n, at))
        finally:
            os.close(fd)
    except OSError as e:
        raise LoadError(f"{path}: unreadable ({e.strerror or e})") from None
    return h.digest()


def _samples(begin: int, end: int) -> list[tuple[int, int]]:
    """(offset, length) of the reads that stand for the byte range [begin, end)."""
    size = end - begin
    if size <= WHOLE:
        return [(begin, size)]
    n = 3 + 2 * (size // SPREAD)  # odd: one read sits exactly at the middle
    step = (size - SAMPLE) / (n - 1)
    return [(begin + round(i * step), SAMPLE) for i in range(n)]
