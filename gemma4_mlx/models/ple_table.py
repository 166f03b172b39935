"""A row-gathered table kept memory-mapped in its safetensors file (docs/quantization.md §6, §10).

The per-layer-embedding table of E2B/E4B ([262144, L*256], 4.7/5.6 GB in bf16) is
only ever indexed by token id, a few rows per step.  Holding it in MLX memory would
make it the largest resident tensor (and can exceed Metal's per-buffer limit), so
it stays in the page cache: the OS pages in only the rows that are read.

`MappedTable` is a plain object, not an `nn.Module`: it is deliberately absent from
`model.parameters()`, so `mx.eval(model.parameters())` never materialises it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx.formats.safetensors import read_header

# Up to this many ids are gathered as they come; more are deduplicated first (a long
# prompt repeats tokens, and each distinct row is then read and copied once).
SMALL_GATHER = 16
# safetensors dtype -> (numpy dtype of the stored bytes, MLX dtype they are): what a
# memory map of a tensor reads (also `checkpoint.shards`' per-rank slices).  numpy has
# no bfloat16: its raw bits are read as uint16; F8 types arrive as uint8, as `mx.load`
# gives them.
STORAGE = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),
    "U32": (np.uint32, mx.uint32),
    "I32": (np.int32, mx.int32),
    "I64": (np.int64, mx.int64),
    "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
    "F8_E4M3": (np.uint8, mx.uint8),
    "F8_E8M0": (np.uint8, mx.uint8),
    "BOOL": (np.bool_, mx.bool_),
}
TABLE_DTYPES = ("F32", "F16", "BF16")  # what a mapped embedding table may hold


def stored_to_mlx(stored: np.ndarray, dtype: mx.Dtype) -> mx.array:
    """Bytes read from a map as the MLX array of `dtype` they are: copied once, bf16
    viewed from its uint16 bits (bit-exact, no float conversion)."""
    out = mx.array(np.ascontiguousarray(stored))
    return out.view(dtype) if dtype == mx.bfloat16 else out


def tensor_header(path: str | Path, name: str) -> tuple[dict, int]:
    """(header entry of `name`, byte offset where the data section starts)."""
    try:
        data_start, header = read_header(path)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if name not in header:
        raise KeyError(f"{path}: no tensor {name}")
    return header[name], data_start


class MappedTable:
    """Embedding lookup served from a read-only memory map of one safetensors tensor.

    out_dtype: dtype of the returned rows; None keeps the checkpoint's.  Casting
    per gathered row gives bit-for-bit what casting the whole table would.
    """

    def __init__(self, path: str | Path, name: str, out_dtype: mx.Dtype | None = None):
        entry, data_start = tensor_header(path, name)
        if entry["dtype"] not in TABLE_DTYPES:
            raise ValueError(
                f"{path}: {name}: dtype {entry['dtype']} cannot be mapped (expected one of {', '.join(TABLE_DTYPES)})"
            )
        np_dtype, self.stored_dtype = STORAGE[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        if len(shape) != 2:
            raise ValueError(f"{path}: {name}: expected a 2-D table, got shape {shape}")
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != shape[0] * shape[1] * np.dtype(np_dtype).itemsize:
            raise ValueError(f"{path}: {name}: data_offsets do not match shape {shape}")
        if data_start + end > Path(path).stat().st_size:
            raise ValueError(f"{path}: file is truncated")
        self.path, self.name, self.shape = str(path), name, shape
        self.out_dtype = out_dtype
        self._rows = np.memmap(path, dtype=np_dtype, mode="r", offset=data_start + begin, shape=shape)

    @property
    def dtype(self) -> mx.Dtype:
        """Dtype of the rows `__call__` returns (what the model computes with)."""
        return self.out_dtype if self.out_dtype is not None else self.stored_dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the mapped tensor on disk (none of them MLX-resident)."""
        return self._rows.nbytes

    def __call__(self, ids: mx.array) -> mx.array:
        idx = np.asarray(ids).astype(np.int64, copy=False)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.shape[0]):
            raise IndexError(f"{self.name}: token id out of range [0, {self.shape[0]})")
        if flat.size <= SMALL_GATHER:  # decode: a repeat costs less than sorting out repeats
            return self._to_mlx(self._rows[flat]).reshape(*idx.shape, self.shape[1])
        # each distinct row is read (and copied into MLX) once; repeats index into them
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = self._to_mlx(self._rows[uniq])
        return rows[mx.array(inverse.reshape(-1).astype(np.int32))].reshape(*idx.shape, self.shape[1])

    def _to_mlx(self, rows: np.ndarray) -> mx.array:
        """Gathered rows as an MLX array (`stored_to_mlx`), cast only if `out_dtype` asks."""
        out = stored_to_mlx(rows, self.stored_dtype)
        return out if self.out_dtype is None else out.astype(self.out_dtype)

    def __repr__(self) -> str:
        return f"MappedTable({self.name}, shape={self.shape}, dtype={self.dtype}, file={self.path})"
