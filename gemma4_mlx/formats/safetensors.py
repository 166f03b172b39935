"""The one reader of safetensors headers (loader checks, `info`, the mapped PLE table).

The header is validated as strictly as the format requires (docs/hardening.md §1):
the 8-byte length is exact, the JSON is UTF-8 and an object without duplicate keys,
every entry has a known dtype, a shape of non-negative integers and integer
`data_offsets` whose length matches the shape, and the entries cover the data
section contiguously from byte 0 to the end of the file: no holes, no overlaps, no
aliases, nothing after the last tensor.  A file that passes cannot make a reader
allocate more than its own size or read bytes another tensor also owns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# safetensors dtype -> bytes per element: what MLX's reader maps (F8 types load as uint8)
ITEM_SIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "C64": 8,
}
# The reference implementation refuses larger headers; so do we, before reading one.
MAX_HEADER = 100_000_000


class HeaderError(ValueError):
    """A safetensors header that breaks the format; the message says which entry."""


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise HeaderError(f"key {dup!r} appears twice in the header")
    return dict(pairs)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(name: str, e) -> tuple[int, int]:
    """(begin, end) of a well-formed entry."""
    if not isinstance(e, dict):
        raise HeaderError(f"tensor {name}: entry is not an object")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in ITEM_SIZE:
        raise HeaderError(f"tensor {name}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise HeaderError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise HeaderError(f"tensor {name}: data_offsets {offsets!r} is not two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise HeaderError(f"tensor {name}: data_offsets {offsets} out of order")
    need = math.prod(shape) * ITEM_SIZE[dtype]
    if end - begin != need:
        raise HeaderError(f"tensor {name}: data_offsets span {end - begin} bytes, shape {shape} {dtype} needs {need}")
    return begin, end


def _coverage(spans: list[tuple[int, int, str]], data_bytes: int) -> None:
    """The tensors tile [0, data_bytes) exactly, in any order."""
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            why = "overlaps the previous tensor" if begin < at else f"leaves a hole at byte {at}"
            raise HeaderError(f"tensor {name}: data_offsets [{begin}, {end}] {why}")
        at = end
    if at != data_bytes:
        raise HeaderError(
            f"file is truncated: {data_bytes} data bytes, tensors need {at}"
            if at > data_bytes
            else f"{data_bytes - at} bytes after the last tensor (header length or offsets are wrong)"
        )


def read_header(path: str | Path) -> tuple[int, dict]:
    """(byte offset where the data section starts, tensor entries without
    `__metadata__`), validated (module docstring).  Raises ValueError (`HeaderError`,
    `UnicodeDecodeError`) on a malformed file, OSError on an unreadable one."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"file is truncated: {size} bytes, no header length")
        n = int.from_bytes(head, "little")
        if n < 2 or 8 + n > size:
            raise HeaderError(f"header length {n} past end of file ({size} bytes)")
        if n > MAX_HEADER:
            raise HeaderError(f"header length {n} over the format's limit of {MAX_HEADER} bytes")
        raw = f.read(n)
    text = raw.decode("utf-8")  # the format says UTF-8 (json.loads would guess UTF-16/32)
    if not text.startswith("{"):
        raise HeaderError("header does not start with '{'")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise HeaderError(f"header is not valid JSON ({e})") from None
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise HeaderError("__metadata__ is not an object")
    spans = [(*_entry(k, v), k) for k, v in header.items()]
    _coverage(spans, size - 8 - n)
    return 8 + n, header


def _no_constant(name: str):
    raise HeaderError(f"header holds {name}, which is not JSON")
