"""The memory guard (docs/hardening.md §3): a checkpoint whose weights need more memory
than the machine can give is refused in one line before any tensor is read; `force`
loads anyway; the arithmetic matches what a load really holds, and `info` reports the
KV cache with the same arithmetic."""

from __future__ import annotations

import gc
import json
import math
import resource
import shutil
import struct
import time

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

import gemma4_mlx
from gemma4_mlx.checkpoint import memory
from gemma4_mlx.checkpoint.files import LoadError
from gemma4_mlx.checkpoint.info import model_info
from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.cli import app
from gemma4_mlx.config import read_config
from gemma4_mlx.models.text import Model
from gemma4_mlx.presets import PRESETS

from helpers.fuzz import one_line


def sparse_checkpoint(folder, preset: str):
    """A `preset`-shaped bf16 checkpoint whose one shard is a sparse file: the header
    lists every tensor, the data section is a hole of the full size."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma4_text", **PRESETS[preset]}))
    model = Model.from_config(read_config(folder), text_only=True)  # lazy: shapes only
    header, at = {}, 0
    for key, v in tree_flatten(model.parameters()):
        n = math.prod(v.shape) * 2
        header[key] = {"dtype": "BF16", "shape": list(v.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + at)
    return at


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def test_31b_sparse_checkpoint_refused_in_one_line(tmp_path):
    d = tmp_path / "gemma-31b-sparse"
    claimed = sparse_checkpoint(d, "31b")
    have = memory.available_bytes()
    assert claimed > 50 * 2**30  # about 57 GiB of bf16 weights
    if have is None or have[0] >= claimed:
        pytest.skip(f"this machine can give {have}: the 31B-shaped checkpoint would fit")
    rss, t0 = _rss(), time.perf_counter()
    with pytest.raises(LoadError) as e:
        gemma4_mlx.load(d)
    msg = str(e.value)
    assert one_line(msg), msg
    assert f"needs {claimed / 2**30:.1f} GiB ({claimed:,} bytes)" in msg and "can give" in msg, msg
    assert "smaller format" in msg and "--force" in msg, msg
    assert time.perf_counter() - t0 < 10 and _rss() - rss < 200 * 2**20  # refused before reading


def test_cli_refuses_and_offers_force(tmp_path):
    d = tmp_path / "big"
    sparse_checkpoint(d, "31b")
    r = CliRunner().invoke(app, ["generate", "--model", str(d), "--prompt", "hi", "--quiet"])
    have = memory.available_bytes()
    if have is not None and have[0] > 60 * 2**30:
        pytest.skip("the 31B-shaped checkpoint fits this machine")
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and lines[-1].startswith("error: ") and "--force" in lines[-1], r.output
    for command in ("generate", "chat", "serve"):
        assert "--force" in CliRunner().invoke(app, [command, "--help"]).output


@pytest.fixture
def dense(checkpoints, tmp_path):
    d = tmp_path / "dense"
    shutil.copytree(checkpoints["dense"].path, d)
    return d


def test_guard_and_force(dense, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: (1000, "test machine"))
    with pytest.raises(LoadError, match=r"needs 0\.0 GiB \([\d,]+ bytes\) .* can give 0\.0 GiB \(test machine\)"):
        gemma4_mlx.load(dense)
    model, _ = gemma4_mlx.load(dense, force=True)
    assert model.config.num_hidden_layers == 6


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
def test_needed_bytes_is_what_a_load_holds(checkpoints, dtype):
    """The header arithmetic equals the bytes of the loaded parameters, and MLX's active
    memory after the load (PLE table included here: `load_model` does not map it)."""
    folder = checkpoints["e2b_like"].path
    need = memory.needed_bytes(folder, dtype, map_ple=False)
    gc.collect()
    gc.disable()  # no earlier test's garbage may be freed inside the measured span
    try:
        before = mx.get_active_memory()
        model, _ = load_model(folder, dtype)
        mx.eval(model.parameters())
        held = mx.get_active_memory() - before
    finally:
        gc.enable()
    assert need.resident == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    del model
    # MLX's active memory also counts a few small arrays the load leaves alive (RoPE
    # tables, scalars: about 100 KB whatever the model's size, more after some other
    # tests ran in the same process), never a second copy of any weight
    assert need.resident <= held < need.resident + (256 << 10)
    if dtype is None:
        mapped = memory.needed_bytes(folder)  # the default load: PLE table memory-mapped
        assert mapped.mapped > 0 and mapped.resident == need.resident - mapped.mapped


def test_kv_cache_arithmetic_matches_the_cache(checkpoints):
    folder = checkpoints["e2b_like"].path
    model, _ = gemma4_mlx.load(folder, dtype="float32")
    n = 512  # a multiple of the cache's growth step: no slack in the buffers
    cache = model.make_cache()
    model(mx.zeros((1, n), mx.int32), cache=cache)
    arrays = [a for c in cache for a in (getattr(c, "keys", None), getattr(c, "values", None)) if a is not None]
    mx.eval(arrays)
    held = sum(a.nbytes for a in {id(a): a for a in arrays}.values())
    text = model.config
    expect = memory.kv_cache_bytes(text, n, 4)
    sliding = [s for s in text.layers if not s.shared and s.type != "full_attention"]
    step = 256 * 2 * sum(s.kv_heads * s.head_dim * 4 for s in sliding)  # one growth step of slack
    assert expect <= held <= expect + step, (expect, held)
    info = model_info(folder, load=False, max_context=n)
    assert info["memory"]["kv_cache"] == memory.kv_cache_bytes(text, n, 4)


def test_info_reports_the_kv_cache(checkpoints):
    r = CliRunner().invoke(app, ["info", str(checkpoints["e2b_like"].path), "--no-load", "--max-context", "512"])
    assert r.exit_code == 0, r.output
    kv = memory.kv_cache_bytes(read_config(checkpoints["e2b_like"].path).text, 512, 4)
    assert "KV cache for 512 tokens" in r.output and f"({kv:,} bytes)" in " ".join(r.output.split()), r.output
