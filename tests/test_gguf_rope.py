"""The full layers' partial-rotary factor of a GGUF import (`convert/gguf_rope.py`).

llama.cpp keeps the factor only in `rope_freqs.weight` (1.0 for the rotated pairs,
1e30 after them).  A checkpoint written by transformers with factor f, turned into a
GGUF the way llama.cpp's converter does (test_gguf_tokenizer.llama_cpp_gguf: F32
tensors, rope_freqs from f), must import to the same logits as loading the HF
checkpoint directly, and as transformers computes; any other rope_freqs pattern is
refused in one line naming the tensor.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

import gemma4_mlx
from gemma4_mlx.convert import ConvertError, convert

from test_gguf_info import CFG
from test_gguf_tokenizer import V, hf_checkpoint, llama_cpp_gguf

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

HALF = CFG["global_head_dim"] // 2  # rope_freqs entries: 16


@pytest.fixture(scope="module", params=[0.25, 0.5, 0.75, 1.0])
def pair(request, tmp_path_factory):
    """(factor, HF folder, transformers model, imported folder)."""
    root = tmp_path_factory.mktemp(f"rope{request.param}")
    hf = hf_checkpoint(root / "hf", factor=request.param, seed=1)
    path = llama_cpp_gguf(root / "hf", root / "m.gguf", factor=request.param)
    convert(path, root / "out", "q4_0", progress=False)
    return request.param, root / "hf", hf, root / "out"


def test_factor_read_from_rope_freqs(pair):
    factor, _, _, out = pair
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["full_attention"]["partial_rotary_factor"] == factor
    assert cfg["gemma4_mlx_conversion"]["partial_rotary_factor"] == {
        "full_attention": factor,
        "from": "rope_freqs.weight",
    }


def test_logits_equal_loading_the_hf_checkpoint(pair):
    factor, hf_dir, hf, out = pair
    ids = [2] + np.random.default_rng(2).integers(5, V, 23).tolist()  # past the window of 4
    got = np.array(gemma4_mlx.load(out, dtype="float32")[0](mx.array([ids])))
    want = np.array(gemma4_mlx.load(hf_dir, dtype="float32")[0](mx.array([ids])))
    scale = np.abs(want).max()
    err = np.abs(got - want).max() / scale
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits.float().numpy()
    err_hf = np.abs(got - ref).max() / scale
    print(f"factor {factor}: vs HF folder {err:.2e}, vs transformers {err_hf:.2e} (logit scale {scale:.2f})")
    assert err < 1e-4 and err_hf < 1e-4  # as test_gguf_info (every tensor is F32 here: in fact 0)


ONE, OFF = 1.0, 1e30
BAD = {
    "zeros_after_ones": [ONE] * 4 + [0.0] * (HALF - 4),
    "no_rotated_pair": [OFF] * HALF,
    "interleaved": [ONE, OFF] * (HALF // 2),
    "ones_after_off": [ONE] * 4 + [OFF] * (HALF - 5) + [ONE],
    "scaled": [ONE] * 4 + [2.0] * 4 + [OFF] * (HALF - 8),
    "short": [ONE] * 4 + [OFF] * 4,
}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad") / "hf"
    hf_checkpoint(folder)
    return folder


@pytest.mark.parametrize("case", list(BAD))
def test_bad_rope_freqs_refused_naming_the_tensor(hf_dir, tmp_path, case):
    path = llama_cpp_gguf(hf_dir, tmp_path / "bad.gguf", freqs=np.array(BAD[case], np.float32))
    with pytest.raises(ConvertError, match=r"^\S*bad\.gguf: tensor rope_freqs\.weight ") as e:
        convert(path, tmp_path / "out", "q4_0", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_f16_rope_freqs_refused(hf_dir, tmp_path):
    freqs = np.array([ONE] * HALF, np.float16)
    path = llama_cpp_gguf(hf_dir, tmp_path / "bad.gguf", freqs=freqs)
    with pytest.raises(ConvertError, match=r"bad\.gguf: tensor rope_freqs\.weight is F16; expected F32"):
        convert(path, tmp_path / "out", "q4_0", progress=False)


@pytest.mark.parametrize("key,value", [("gemma4.rope.dimension_count", 16), ("gemma4.rope.dimension_count_swa", 8)])
def test_partial_rotary_dimension_counts_refused(hf_dir, tmp_path, key, value):
    path = llama_cpp_gguf(hf_dir, tmp_path / "bad.gguf", edit=lambda w: w.add_uint32(key, value))
    with pytest.raises(ConvertError, match=rf"bad\.gguf: metadata key {key.replace('.', r'[.]')} is {value}; "):
        convert(path, tmp_path / "out", "q4_0", progress=False)
