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

# safetensors dtype -> (numpy storage dtype, MLX dtype of the rows returned)
_DTYPES = {
    "F32": (np.float32, mx.float32),
    "F16": (np.float16, mx.float16),
    "BF16": (np.uint16, mx.bfloat16),  # numpy has no bfloat16: read the raw bits
}


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
        if entry["dtype"] not in _DTYPES:
            raise ValueError(
                f"{path}: {name}: dtype {entry['dtype']} cannot be mapped (expected one of {', '.join(_DTYPES)})"
            )
        np_dtype, self.stored_dtype = _DTYPES[entry["dtype"]]
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
        idx = np.asarray(ids).astype(np.int64)
        # each distinct row is read (and copied into MLX) once; repeats index into them
        uniq, inverse = np.unique(idx.reshape(-1), return_inverse=True)
        if uniq.size and (uniq[0] < 0 or uniq[-1] >= self.shape[0]):
            raise IndexError(f"{self.name}: token id out of range [0, {self.shape[0]})")
        rows = np.ascontiguousarray(self._rows[uniq])
        if self.stored_dtype == mx.bfloat16:
            # bf16 is the high half of an fp32: widening is exact, and astype back is too
            rows = (rows.astype(np.uint32) << 16).view(np.float32)
        out = mx.array(rows).astype(self.stored_dtype)
        if self.out_dtype is not None:
            out = out.astype(self.out_dtype)
        return out[mx.array(inverse.reshape(-1).astype(np.int32))].reshape(*idx.shape, self.shape[1])

    def __repr__(self) -> str:
        return f"MappedTable({self.name}, shape={self.shape}, dtype={self.dtype}, file={self.path})"
