"""Loading details: one copy of the weights, tied head, OpenBLAS preload."""

import os
import platform
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file

import gemma4_mlx
from gemma4_mlx import LoadError
from gemma4_mlx.config import TextConfig
from gemma4_mlx.models.text import Model

from helpers.checkpoints import max_diff, random_ids


@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "unstacked"])
def test_peak_memory_is_one_copy(tmp_path, monkeypatch, stacked):
    """Loading maps the safetensors lazily and assigns them: no second copy.  Stacking
    q/k/v and gate/up frees each layer's parts as it goes (it once kept every part
    alive to the end: 1.17x the weights at 4 layers, 1.6x at 16; 12 layers here)."""
    monkeypatch.setattr(gemma4_mlx.ops, "STACK_PROJECTIONS", stacked)
    cfg = dict(
        model_type="gemma4_text",
        vocab_size=4096,
        hidden_size=512,
        num_hidden_layers=12,
        intermediate_size=2048,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        global_head_dim=128,
        sliding_window=16,
        hidden_size_per_layer_input=0,
    )
    model = Model(TextConfig.from_dict(dict(cfg)))
    params = {k: v for k, v in tree_flatten(model.parameters())}
    mx.eval(params)
    size = sum(v.nbytes for v in params.values())
    mx.save_safetensors(str(tmp_path / "model.safetensors"), params)
    import json

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    del model, params
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    loaded, _ = gemma4_mlx.load(tmp_path, dtype="float32")
    mx.eval(loaded.parameters())
    assert ("qkv_proj" in loaded.layers[0].self_attn) == stacked
    assert size > 30e6
    assert mx.get_peak_memory() - base < 1.15 * size


def test_tied_lm_head_accepted_untied_rejected(checkpoints, tmp_path):
    import shutil

    ref = checkpoints["dense"]
    d = tmp_path / "m"
    shutil.copytree(ref.path, d)
    f = next(d.glob("*.safetensors"))
    t = load_file(str(f))
    emb = t["model.language_model.embed_tokens.weight"]
    save_file({"lm_head.weight": emb.copy()}, str(d / "head.safetensors"))
    ids = mx.array([random_ids(8)])
    assert max_diff(gemma4_mlx.load(d, dtype="float32")[0](ids), ref.logits(np.array(ids))) < 1e-4
    save_file({"lm_head.weight": emb + 1}, str(d / "head.safetensors"))
    with pytest.raises(LoadError, match="lm_head.weight differs"):
        gemma4_mlx.load(d)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_openblas_kernels_follow_the_cpu_flags(tmp_path):
    from gemma4_mlx import _blas

    assert _blas.coretype_for(set(_blas.AVX512 | _blas.AVX2)) == "SkylakeX"
    assert _blas.coretype_for(set(_blas.AVX2) | {"avx512f"}) == "Haswell"  # AVX-512 only in part
    assert _blas.coretype_for({"sse3", "avx"}) is None
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma sse3\nbugs\t: none\n")
    assert _blas.cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "fma", "sse3"}
    assert _blas.cpu_flags(str(tmp_path / "absent")) == set()


def test_openblas_coretype_is_set_unless_chosen():
    """The loaded OpenBLAS runs the kernels the CPU's flags allow (its own detection
    fell back to SSE3 on an AVX-512 VM); a user's OPENBLAS_CORETYPE is kept."""
    from gemma4_mlx import _blas

    code = (
        "import ctypes, os, gemma4_mlx, gemma4_mlx._blas as b\n"
        "name = None\n"
        "if b.loaded_from:\n"
        "    f = ctypes.CDLL(b.loaded_from).openblas_get_corename\n"
        "    f.restype = ctypes.c_char_p\n"
        "    name = f().decode()\n"
        "print(os.environ.get('OPENBLAS_CORETYPE'), b.coretype_set, name)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    auto = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    chosen = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "OPENBLAS_CORETYPE": "Haswell"}
    )
    assert chosen.stdout.split()[:2] == ["Haswell", "None"], chosen.stderr
    want = _blas.coretype_for(_blas.cpu_flags()) if platform.machine() == "x86_64" else None
    env_value, ours, name = auto.stdout.split()
    assert (env_value, ours) == (str(want), str(want)), auto.stderr
    if want and name != "None":
        assert name == want  # the library took it (not its SSE3 fallback)


def test_openblas_preload_and_switch():
    from gemma4_mlx import _blas

    code = "import gemma4_mlx, gemma4_mlx._blas as b; print(b.loaded_from)"
    env = dict(os.environ)
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    env["GEMMA4_MLX_NO_OPENBLAS"] = "1"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert off.stdout.strip() == "None"
    present = next((p for p in _blas.CANDIDATES if os.path.exists(p)), None)
    if present is None:
        pytest.skip("Debian's libopenblas0-pthread is not installed")
    assert on.stdout.strip() == present
