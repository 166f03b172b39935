"""The memory-mapped PLE table (models/ple_table.py, loader `map_ple`) must be a pure
memory optimisation: same logits bit for bit, same rows, and the table is absent
from MLX memory."""

import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

import gemma4_mlx
from gemma4_mlx import LoadError
from gemma4_mlx.convert import convert
from gemma4_mlx.models.ple_table import SMALL_GATHER, MappedTable
from gemma4_mlx.models.quantized import QEmbedding

from helpers.checkpoints import random_ids

PLE = "model.embed_tokens_per_layer.weight"


def ple_key(path) -> str:
    """The checkpoint's own (wrapper-prefixed) name of the PLE table."""
    return next(k for k in mx.load(str(path / "model.safetensors")) if k.endswith("embed_tokens_per_layer.weight"))


def decode(model, ids, steps=4):
    """Prefill, then greedy single-token steps; every step's logits."""
    cache = model.make_cache()
    out = [model(mx.array([ids]), cache)[0, -1]]
    for _ in range(steps):
        out.append(model(mx.array([[int(mx.argmax(out[-1]).item())]]), cache)[0, -1])
    return np.stack([np.array(o) for o in out])


def test_mapped_model_is_identical(checkpoints):
    path = checkpoints["e2b_like"].path
    mapped, _ = gemma4_mlx.load(path)
    plain, _ = gemma4_mlx.load(path, map_ple=False)
    table = mapped.model.embed_tokens_per_layer
    assert isinstance(table, MappedTable)
    assert PLE not in dict(tree_flatten(mapped.parameters()))
    assert PLE in dict(tree_flatten(plain.parameters()))
    assert table.shape == tuple(plain.model.embed_tokens_per_layer.weight.shape)
    assert table.dtype == mx.float32
    for seed, n in ((0, 1), (1, 13), (2, 20)):
        ids = random_ids(n, seed=seed)
        assert np.array_equal(np.array(mapped(mx.array([ids]))), np.array(plain(mx.array([ids]))))
    ids = random_ids(9, seed=3)
    assert np.array_equal(decode(mapped, ids), decode(plain, ids))
    batch = mx.array([random_ids(7, seed=4), random_ids(7, seed=5)])  # repeated ids across rows
    assert np.array_equal(np.array(mapped(batch)), np.array(plain(batch)))


_RESIDENT = """
import gc, sys
import mlx.core as mx
import gemma4_mlx

def resident(map_ple):
    gc.collect()
    before = mx.get_active_memory()
    model, _ = gemma4_mlx.load(sys.argv[1], map_ple=map_ple)
    mx.eval(model.parameters())
    used = mx.get_active_memory() - before
    del model
    gc.collect()
    return used

resident(False), resident(True)  # whatever a first load creates once is then not counted
print(resident(False), resident(True))
"""


def test_mapped_table_not_resident(checkpoints):
    """Measured in a fresh process: in the suite's own process, arrays other tests
    left alive moved the active memory by ~1 KB between loads (2 of 6 full runs)."""
    path = checkpoints["e2b_like"].path
    nbytes = MappedTable(path / "model.safetensors", ple_key(path)).nbytes
    assert nbytes == 256 * 8 * 16 * 4
    out = subprocess.run([sys.executable, "-c", _RESIDENT, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plain, mapped = map(int, out.stdout.split())
    assert plain - mapped >= nbytes, (plain, mapped, nbytes)


@pytest.fixture(scope="module")
def bf16_ckpt(checkpoints, tmp_path_factory):
    """The e2b_like checkpoint with only its PLE table stored as bf16."""
    src = checkpoints["e2b_like"].path
    dst = tmp_path_factory.mktemp("ple_bf16") / "e2b_bf16"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    key = ple_key(src)
    tensors[key] = tensors[key].bfloat16()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_bf16_rows_bit_identical(bf16_ckpt):
    f, key = bf16_ckpt / "model.safetensors", ple_key(bf16_ckpt)
    table, full = MappedTable(f, key), mx.load(str(f))[key]
    assert table.dtype == full.dtype == mx.bfloat16 and table.shape == tuple(full.shape)
    assert table.nbytes == full.nbytes
    ids = mx.array([[0, 5, 5, 255], [17, 0, 254, 5]])
    rows = table(ids)
    assert rows.dtype == mx.bfloat16 and rows.shape == (2, 4, full.shape[1])
    assert mx.array_equal(rows.view(mx.uint16), full[ids].view(mx.uint16)).item()
    # a cast per gathered row equals casting the whole table
    wide = MappedTable(f, key, out_dtype=mx.float32)(ids)
    assert wide.dtype == mx.float32 and mx.array_equal(wide, full.astype(mx.float32)[ids]).item()
    with pytest.raises(IndexError):
        table(mx.array([[256]]))
    many = mx.array([[i % 7 for i in range(40)], [255 - i for i in range(40)]])  # past SMALL_GATHER, repeats
    assert many.size > SMALL_GATHER
    assert mx.array_equal(table(many).view(mx.uint16), full[many].view(mx.uint16)).item()
    assert mx.array_equal(MappedTable(f, key, out_dtype=mx.float32)(many), full.astype(mx.float32)[many]).item()
    with pytest.raises(IndexError):
        table(mx.array([[-1] + [0] * 20]))


def test_bf16_table_model_identical(bf16_ckpt):
    mapped, _ = gemma4_mlx.load(bf16_ckpt)
    plain, _ = gemma4_mlx.load(bf16_ckpt, map_ple=False)
    assert mapped.model.embed_tokens_per_layer.dtype == mx.bfloat16
    assert plain.model.embed_tokens_per_layer.weight.dtype == mx.bfloat16
    ids = random_ids(15, seed=7)
    assert np.array_equal(np.array(mapped(mx.array([ids]))), np.array(plain(mx.array([ids]))))
    assert np.array_equal(decode(mapped, ids), decode(plain, ids))


def test_float16_table_and_explicit_dtype(checkpoints, tmp_path):
    src = checkpoints["e2b_like"].path
    tensors = load_file(str(src / "model.safetensors"))
    key = ple_key(src)
    save_file({key: tensors[key].half()}, str(tmp_path / "t.safetensors"))
    table = MappedTable(tmp_path / "t.safetensors", key)
    ids = mx.array([[3, 1, 3]])
    assert table.dtype == mx.float16
    assert mx.array_equal(table(ids), mx.load(str(tmp_path / "t.safetensors"))[key][ids]).item()
    # an explicit dtype keeps today's resident path
    model, _ = gemma4_mlx.load(src, dtype="float32")
    assert not isinstance(model.model.embed_tokens_per_layer, MappedTable)


def test_quantized_ple_not_mapped(checkpoints, tmp_path):
    dst = tmp_path / "q4"
    convert(checkpoints["e2b_like"].path, dst, "q4", keep_high_precision=False, progress=False)
    model, _ = gemma4_mlx.load(dst)
    assert isinstance(model.model.embed_tokens_per_layer, QEmbedding)


def test_mapped_shape_still_checked(checkpoints, tmp_path):
    src = checkpoints["e2b_like"].path
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    key = ple_key(src)
    tensors[key] = tensors[key][:, :-16].contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError, match="embed_tokens_per_layer.weight has shape"):
        gemma4_mlx.load(dst)
