"""Broken checkpoints give one clear line naming the file or tensor."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gemma4_mlx
from gemma4_mlx import LoadError

from helpers.checkpoints import write_char_tokenizer


@pytest.fixture
def copy(checkpoints, tmp_path):
    def make(name="dense"):
        dst = tmp_path / name
        shutil.copytree(checkpoints[name].path, dst)
        return dst

    return make


def shard(folder):
    return next(folder.glob("*.safetensors"))


def test_missing_shard(copy):
    d = copy()
    f = shard(d)
    index = {
        "metadata": {},
        "weight_map": {
            "model.language_model.norm.weight": f.name,
            "model.language_model.embed_tokens.weight": "model-00002-of-00002.safetensors",
        },
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=r"model-00002-of-00002\.safetensors: shard listed .* missing"):
        gemma4_mlx.load(d)


def test_truncated_safetensors(copy):
    d = copy()
    f = shard(d)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=rf"{f.name}: unreadable safetensors \(file is truncated"):
        gemma4_mlx.load(d)


def test_garbage_header(copy):
    d = copy()
    shard(d).write_bytes(b"\xff" * 64)
    with pytest.raises(LoadError, match="unreadable safetensors"):
        gemma4_mlx.load(d)


def test_wrong_shape(copy):
    d = copy()
    f = shard(d)  # replaced in its own shard: a second copy in another file is refused as such
    tensors = load_file(str(f))
    tensors["model.language_model.layers.1.self_attn.q_proj.weight"] = np.zeros((7, 64), np.float32)
    save_file(tensors, str(f))
    with pytest.raises(
        LoadError,
        match=r"layers\.1\.self_attn\.q_proj\.weight has shape \(7, 64\), "
        r"config says \(64, 64\)",
    ):
        gemma4_mlx.load(d)


def test_missing_tensor(copy, checkpoints):
    d = copy()
    f = shard(d)
    tensors = load_file(str(f))
    tensors.pop("model.language_model.layers.2.self_attn.k_norm.weight")
    save_file(tensors, str(f))
    with pytest.raises(LoadError, match=r"missing tensor model\.layers\.2\.self_attn\.k_norm\.weight"):
        gemma4_mlx.load(d)


def test_unknown_model_type(copy):
    d = copy()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"config\.json: unknown model_type 'llama'"):
        gemma4_mlx.load(d)


def test_not_a_folder(tmp_path):
    with pytest.raises(LoadError, match="no such folder"):
        gemma4_mlx.load(tmp_path / "nope")


def cli(*args, stdin=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gemma4_mlx", *args], capture_output=True, text=True, input=stdin, timeout=300, env=env
    )


def test_cli_error_is_one_line(copy):
    d = copy()
    f = shard(d)
    f.write_bytes(f.read_bytes()[:1000])
    r = cli("generate", "--model", str(d), "--prompt", "hi", "--quiet")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f.name in lines[0], r.stderr


def test_cli_bad_setting_is_one_line(copy):
    """An invalid GEMMA4_MLX_CPU_FORM is one line where the model loads, not an import traceback."""
    d = copy()
    write_char_tokenizer(d)
    r = cli(
        "generate", "--model", str(d), "--prompt", "hi", "--quiet", env={**os.environ, "GEMMA4_MLX_CPU_FORM": "diag"}
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    said = "GEMMA4_MLX_CPU_FORM='diag': expected rows, columns, ONE,FEW (e.g. columns,rows) or auto"
    assert lines == [f"error: {said}"], r.stderr


def test_cli_generate_streams_to_stdout(copy):
    d = copy("e2b_like")
    write_char_tokenizer(d)
    r = cli("generate", "--model", str(d), "--prompt", "hello", "--max-tokens", "12", "--raw", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert "generation:" in r.stderr and "tok/s" in r.stderr
    m, tok = gemma4_mlx.load(d, dtype="float32")
    assert r.stdout == gemma4_mlx.generate(m, tok, "hello", max_tokens=12, chat=False) + "\n"
    assert len(r.stdout.strip()) > 0
    # stdin works too, and the same seed reproduces a sampled run
    a = cli("generate", "--model", str(d), "--temp", "1.0", "--seed", "3", "-n", "10", "--raw", "-q", stdin="hello")
    b = cli("generate", "--model", str(d), "--temp", "1.0", "--seed", "3", "-n", "10", "--raw", "-q", stdin="hello")
    assert a.returncode == 0 and a.stdout == b.stdout
