"""Per-rank loading of a sharded model (docs/distributed.md §5).

A rank reads only its slices: each planned tensor is cut out of a memory map of its
safetensors file (numpy), so the rank's memory holds its piece and never the whole
tensor; every other tensor stays a lazy `mx.load` array as in a one-process load.
Quantized tensors (packed weights, scales, biases) are cut along the same logical axis
as their float weight (`models.parallel`), which keeps quantization groups whole.

Before any weight is read the ranks compare the checkpoint's fingerprint
(`files.fingerprint`: config, file names, sizes, headers and sampled weight bytes): a rank started with another
model or quantization is refused with one line.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from gemma4_mlx import ranks
from gemma4_mlx.checkpoint.files import LoadError, fingerprint
from gemma4_mlx.checkpoint.keys import rename
from gemma4_mlx.formats.safetensors import read_header
from gemma4_mlx.models.parallel import Plan, Shard, ShardError, Slice
from gemma4_mlx.models.ple_table import STORAGE, stored_to_mlx

_SUFFIXES = (".weight", ".scales", ".biases")


def planned(plan: Plan, key: str) -> Slice | None:
    """The slice a checkpoint tensor (its name in the file) is read with, or None (whole).

    The fused expert `gate_up_proj` [E, 2I, H] is cut by expert like its two halves;
    an untied-looking `lm_head` like the tied table it must equal."""
    if not plan:
        return None
    name = rename(key)
    if name == "lm_head.weight":
        name = "model.embed_tokens.weight"
    if name.endswith(".experts.gate_up_proj"):
        return plan.get(name[: -len("gate_up_proj")] + "gate_proj")
    if name.endswith(".experts.down_proj"):
        return plan.get(name)
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return plan.get(name[: -len(suffix)])
    return None


def read_sliced(path: Path, plan: Plan) -> dict[str, mx.array]:
    """The file's tensors (lazy), the planned ones replaced by this rank's slices."""
    start, header = read_header(path)
    out = mx.load(str(path))
    for key, entry in header.items():
        sl = planned(plan, key)
        if sl is None:
            continue
        np_dtype, dtype = STORAGE.get(entry["dtype"], (None, None))
        if np_dtype is None:
            raise LoadError(f"{path}: tensor {key}: dtype {entry['dtype']} cannot be read in slices")
        a, _ = entry["data_offsets"]
        shape = tuple(entry["shape"])
        mapped = np.memmap(path, dtype=np_dtype, mode="r", offset=start + a, shape=shape) if shape else None
        try:
            piece = sl.take(mapped, f"{path}: tensor {key}")
        except ShardError as e:
            why = " (quantization groups: each rank's piece must hold whole groups)" if key.endswith(".scales") else ""
            raise LoadError(f"{e}{why}") from None
        out[key] = stored_to_mlx(piece, dtype)  # the one copy this rank keeps
        del mapped, piece
    return out


def cut_loaded(weights: dict[str, mx.array], plan: Plan, source: str) -> None:
    """Cut already-read (lazy) tensors in place: for small models (the MTP drafter)."""
    for key, value in weights.items():
        sl = planned(plan, key)
        if sl is not None:
            try:
                weights[key] = sl.take(value, f"{source}: tensor {key}")
            except ShardError as e:
                raise LoadError(str(e)) from None


def check_same_model(folder: Path, tp: Shard | None) -> None:
    """Every rank must load the same model: one LoadError naming the odd rank otherwise.
    (A collective: every rank calls it at the same point of loading.)"""
    if tp is None:
        return
    odd = ranks.odd_rank(fingerprint(folder), tp.group)
    if odd is not None:
        raise LoadError(
            f"{folder}: rank {odd} was started with a different model or quantization than rank 0 "
            f"(checkpoint fingerprints differ); start every rank with the same --model"
        )


def shard_fraction(plan: Plan):
    """key (as `needed_bytes` names it) -> how many pieces it is read in (1: whole)."""

    def parts(key: str) -> int:
        sl = planned(plan, key)
        return 1 if sl is None else sl.parts

    return parts
