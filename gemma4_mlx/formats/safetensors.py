"""The one reader of safetensors headers (loader checks, `info`, the mapped PLE table)."""

from __future__ import annotations

import json
from pathlib import Path


def read_header(path: str | Path) -> tuple[int, dict]:
    """(byte offset where the data section starts, tensor entries without
    `__metadata__`).  Raises ValueError / OSError on a malformed or short file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or 8 + n > size:
            raise ValueError("header length past end of file")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, header
