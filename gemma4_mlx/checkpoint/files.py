"""Checkpoint files: which safetensors files a folder holds, reading them lazily,
and the one error type of checkpoint loading (one line naming the file or tensor)."""

from __future__ import annotations

import hashlib
import json
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
    """Validate the header (offsets tile the data section exactly: `read_header`), then
    map the tensors lazily."""
    try:
        read_header(path)
        return mx.load(str(path))
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise LoadError(f"{path}: unreadable safetensors ({e})") from None


def fingerprint(folder: str | Path) -> str:
    """A short hash of a checkpoint folder's config.json and weight files' names,
    sizes and safetensors headers (what a load reads before any tensor): names a
    model in prompt-cache files, and tells distributed ranks started with different
    models apart.  The weight bytes are not read (cheap on a 60 GB checkpoint)."""
    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in weight_files(folder):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = fh.read(min(n, max(size - 8, 0)))
        h.update(f"\0{f.name}\0{size}\0".encode())
        h.update(header)
    return h.hexdigest()[:32]
