"""Opening a GGUF file: llama.cpp's own reader (`gguf.GGUFReader`, memory-mapped) with
our one-line errors.

The reader parses the header, every metadata value type, the tensor infos and
`general.alignment`; tensor bytes stay views into its np.memmap, so a 14 GB file is
paged in one tensor at a time.  GGUF lists dims fastest-first (ne[0] = the contiguous
input axis); `Tensor.shape` is the row-major (numpy) shape of the values.

A bad file ends in one `ConvertError` line naming the file: the reader is hooked at
its header reads (`_get`: a read past the end is a truncated header), at each metadata
value (`_get_field_parts`: at most MAX_VALUES of them, below) and before it
cuts the tensor views (`_build_tensors`: unknown ggml type, a row length that is not a
whole number of blocks, a misaligned offset, bytes past the end, each naming the
tensor); any other exception of the reader (bad magic, version, value type, ...) is
wrapped with its message.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from .errors import ConvertError

FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q6_K")
READABLE = FLOAT_TYPES + BLOCK_TYPES  # what the importer takes (gguf.py; other types are refused)
_PSEUDO = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}  # the reader's header "fields"
# What a corrupt file can make the reader raise (besides the two checks of _Reader)
_READER_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError)


def block_size(ttype: str) -> tuple[int, int]:
    """(elements, bytes) per block of a ggml type ((1, item size) for float types)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[ttype]]


@dataclass(frozen=True, eq=False)
class Tensor:
    name: str
    type: str  # ggml type name: "Q4_0", "F32", "Q6_K", ...
    shape: tuple[int, ...]  # row-major shape of the values
    nbytes: int  # stored bytes
    data: np.ndarray  # gguf-py's memory-mapped view of the stored data


class _Truncated(Exception):
    """A header read past the end of the file (raised by the _Reader hook)."""


class _Refused(Exception):
    """A tensor info the data cannot match, or metadata past MAX_VALUES (raised by the
    _Reader hooks, message ready)."""


# The metadata values (array elements count one each) a file may declare.  gguf-py
# parses every element into its own numpy views (~700 bytes and ~9 µs each here), so a
# 4 MB file of one-byte elements would take 3 GB and 40 s, and 40 MB would exhaust the
# memory.  A Gemma 4 file has ~1.3 M (262,144 tokens, their types and scores, the
# merges); this allows three times that.
MAX_VALUES = 1 << 22


class _Reader(GGUFReader):
    """GGUFReader with bounds and tensor-info checks that name what is wrong.  Both hooks
    are reader internals (unchanged in gguf-py 0.17-0.19); the GGUF tests catch a change."""

    def __init__(self, path):
        self._values, self._depth, self._key = 0, 0, ""
        super().__init__(path)

    def _get_str(self, offset):
        parts = super()._get_str(offset)
        if self._depth == 0:  # a key (or a tensor name) rather than a value
            self._key = bytes(parts[1][:120]).decode("utf-8", "replace")
        return parts

    def _get_field_parts(self, orig_offs, raw_type):
        # The reader recurses into arrays here, once per element: an array counts its
        # declared length at once (refused before its elements are parsed), elements not again.
        self._values += self._depth == 0
        if raw_type == GGUFValueType.ARRAY:
            self._values += int(self._get(orig_offs + 4, np.uint64)[0])
        if self._values > MAX_VALUES:
            raise _Refused(
                f"metadata key {self._key!r} takes the file past {MAX_VALUES} metadata values; refusing to parse more"
            )
        self._depth += 1
        try:
            return super()._get_field_parts(orig_offs, raw_type)
        finally:
            self._depth -= 1

    def _get(self, offset, dtype, count=1, override_order=None):
        if int(offset) + np.dtype(dtype).itemsize * int(count) > self.data.size:
            raise _Truncated(f"file is truncated inside the GGUF header (offset {int(offset)})")
        return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
        for f in fields:  # parts: name length, name, n_dims, dims, ggml type, offset
            dims, raw_type, offset = f.parts[3], int(f.parts[4][0]), int(f.parts[5][0])
            _check_tensor(
                f.name,
                tuple(int(d) for d in reversed(dims)),
                raw_type,
                offset,
                int(start_offs),
                int(self.alignment),
                self.data.size,
            )
        super()._build_tensors(start_offs, fields)


def _check_tensor(name, shape, raw_type, offset, start, alignment, size) -> None:
    try:
        ttype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise _Refused(f"tensor {name}: unknown ggml type {raw_type}") from None
    per, nb = GGML_QUANT_SIZES[ttype]
    if shape and shape[-1] % per:
        raise _Refused(f"tensor {name}: {ttype.name} needs a multiple of {per} elements per row, got shape {shape}")
    if offset % alignment:
        raise _Refused(f"tensor {name}: offset {offset} not aligned to {alignment}")
    end = start + offset + math.prod(int(d) for d in shape) // per * nb
    if end > size:
        raise _Refused(f"file is truncated: tensor {name} needs bytes up to {end}, file has {size}")


def _open(path: Path) -> GGUFReader:
    try:
        reader = _Reader(path)
    except OSError as e:
        raise ConvertError(f"{path}: cannot map GGUF file ({e})") from None
    except (_Truncated, _Refused) as e:
        raise ConvertError(f"{path}: {e}") from None
    except _READER_ERRORS as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise ConvertError(f"{path}: not a readable GGUF file ({why})") from None
    if reader.byte_order != "I":
        raise ConvertError(f"{path}: GGUF file of the other byte order (big-endian) is not supported")
    return reader


class Metadata(Mapping):
    """The key/value metadata as Python values (str, int, float, bool, lists), decoded
    by gguf-py once, so that the reader's per-element parts (about 1 GB for a 262k-token
    vocabulary with its merges) are freed before any tensor is converted.  A value that
    cannot be decoded fails in one line when it is read, not before."""

    def __init__(self, path: Path, reader: GGUFReader):
        self._path, self._values, self._errors = path, {}, {}
        for key, f in reader.fields.items():
            if key in _PSEUDO:
                continue
            try:
                self._values[key] = f.contents()
            except (UnicodeDecodeError, ValueError, IndexError) as e:
                self._values[key], self._errors[key] = None, " ".join(str(e).split())

    def __getitem__(self, key: str):
        value = self._values[key]
        if key in self._errors:
            raise ConvertError(f"{self._path}: metadata key {key}: cannot decode ({self._errors[key]})")
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class GGUFFile:
    """A GGUF file: `.metadata` (Mapping), `.tensors` (name -> Tensor, in file order),
    `.raw(name)`."""

    def __init__(self, path):
        self.path = Path(path)
        reader = _open(self.path)
        self.metadata = Metadata(self.path, reader)
        self.tensors: dict[str, Tensor] = {
            t.name: Tensor(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes), t.data)
            for t in reader.tensors
        }

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored data as a memory-mapped view (no copy): float types as
        values (BF16 as its uint16 bits), block types as uint8 blocks [..., K / block, bytes]."""
        t = self.tensors[name]
        if t.type not in READABLE:
            raise ConvertError(
                f"{self.path}: tensor {name}: ggml type {t.type} is not supported (readable: {', '.join(READABLE)})"
            )
        if t.type in BLOCK_TYPES:
            per, nb = block_size(t.type)
            return t.data.reshape(*t.shape[:-1], t.shape[-1] // per, nb)
        if t.type == "BF16":  # gguf-py gives its bytes
            return t.data.view("<u2").reshape(t.shape)
        return t.data.reshape(t.shape)
