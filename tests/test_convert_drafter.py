"""`gemma4-mlx convert` on MTP drafter checkpoints (`gemma4_assistant`).

A converted drafter must load with `load_drafter`, compute exactly what its stored
weights say (against a float32 drafter holding the dequantized weights), stay close
to the float32 original (per-mode bounds below), record its precision policy (head
and layer linears quantized, centroid scorer and projections high precision), keep
`token_ordering` exact, and leave greedy speculative decoding lossless.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from gemma4_mlx.cache import Mask
from gemma4_mlx.checkpoint.load import load_drafter, load_model
from gemma4_mlx.config import FULL, SLIDING
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.models.assistant import Drafter
from gemma4_mlx.models.quantized import QEmbedding, QLinear
from gemma4_mlx.runtime.generate import generate_tokens
from gemma4_mlx.speculative.loop import speculative_batch_generate

from helpers.checkpoints import random_ids
from helpers.dequantize import float_weights, stack_like

NAMES = ["e2b_like", "dense"]  # centroid head, dense tied head
MODES = ["bf16", "q8", "q4_0", "sfp8", "mxfp4", "nvfp4"]
T, N_SLIDING, N_FULL, POS = 8, 6, 9, 11  # draft queries, target keys per type, RoPE position
EXACT = 2e-4  # float32 runtime vs float32 dequantized weights (as test_convert)

# Relative L2 error against the float32 original of h' (next carried hidden), the
# canonical-order scores of every token, and the public logits (where both finite).
# Per-weight errors (docs/quantization.md §5): bf16 0.2-0.4%, Q8 0.85%, SFP8 2.7%,
# 4-bit 8-12%; the head is Q8 in every quantized recipe (policy), bf16 also rounds
# the projections.  These random drafters amplify weight noise a few times: each
# query crosses 4 layers of 5 matrices, and unit-RMS queries and keys with random
# q_norm weights and attention scale 1.0 give peaked softmaxes (same effect as in
# test_convert's BOUNDS).  Measured, MLX 0.32 CPU float32 activations, worst of
# h' / scores / logits over dense, e2b_like:
#   bf16 .026  q8 .027  sfp8 .21  q4_0 .61  mxfp4 .63  nvfp4 .62
# Bounds ~1.5x that.  Unrelated outputs of the same norm score ~1.4, so the 4-bit
# bounds only catch garbage; test exactness against the dequantized weights
# (EXACT) is what pins the runtime down.
BOUNDS = {"bf16": 0.04, "q8": 0.04, "sfp8": 0.3, "q4_0": 0.9, "mxfp4": 0.95, "nvfp4": 0.95}


@pytest.fixture(scope="module")
def targets(checkpoints):
    return {n: load_model(checkpoints[n].path, "float32")[0] for n in NAMES}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, drafters):
    """convert() once per (drafter, recipe, keep_high_precision)."""
    root, cache = tmp_path_factory.mktemp("drafters-converted"), {}

    def get(name, quant, keep=True):
        if (name, quant, keep) not in cache:
            dst = root / f"{name}-{quant}-{int(keep)}"
            convert(drafters[name].path, dst, quant, keep_high_precision=keep, progress=False)
            cache[(name, quant, keep)] = dst
        return cache[(name, quant, keep)]

    return get


def _inputs(drafter, seed=0):
    """x0 [1, T, 2*D_t], random target K/V per layer type, masks letting every query
    see the newest W sliding keys and all full keys (as test_mtp_drafter)."""
    rng = np.random.default_rng(seed)
    kv = {}
    for typ, n in ((SLIDING, N_SLIDING), (FULL, N_FULL)):
        spec = next(s for s in drafter.config.text.layers if s.type == typ)
        kv[typ] = tuple(
            mx.array(rng.standard_normal((1, spec.kv_heads, n, spec.head_dim)), mx.float32) for _ in range(2)
        )
    W = drafter.config.text.sliding_window
    masks = {
        SLIDING: Mask(mx.array(np.arange(N_SLIDING) >= N_SLIDING - W)[None, None, None], 0, 0, None),
        FULL: Mask(mx.ones((1, 1, 1, N_FULL), mx.bool_), 0, 0, None),
    }
    x0 = mx.array(rng.standard_normal((1, T, 2 * drafter.config.backbone_hidden_size)), mx.float32)
    return x0, kv, masks


def _scores(drafter, x):
    """Head scores of every token, in canonical token order [1, T, V]: undoes the
    load-time reordering, so a wrong token_ordering shows up as a large error."""
    V = drafter.config.text.vocab_size
    s = np.array(drafter._head_rows(mx.arange(V), x))
    if not drafter.ordered:
        return s
    out = np.empty_like(s)
    out[..., np.array(drafter.masked_embedding.token_ordering)] = s
    return out


def _run(drafter):
    x0, kv, masks = _inputs(drafter)
    x, h = drafter.step(x0, kv, masks, POS)
    return np.array(h), _scores(drafter, x), np.array(drafter.logits(x)), np.array(drafter.argmax(x))


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _dequantized(drafter: Drafter) -> Drafter:
    """A float32 Drafter holding the dequantized weights of a loaded one (head rows
    in the same, possibly reordered, order)."""
    params = float_weights(drafter, keep=lambda k: k.endswith("token_ordering"))
    ref = Drafter(drafter.config)
    stack_like(ref.model.layers, drafter.model.layers)
    ref.load_weights(list(params.items()))
    ref.ordered = drafter.ordered
    return ref.eval()


@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("name", NAMES)
def test_converted_drafter_close_to_float32(drafters, targets, converted, name, quant):
    base = load_drafter(drafters[name].path, "float32", target=targets[name])
    ours = load_drafter(converted(name, quant), "float32", target=targets[name])
    assert ours.centroid_head == base.centroid_head and ours.ordered == base.ordered
    h0, s0, l0, a0 = _run(base)
    h1, s1, l1, a1 = _run(ours)
    hd, sd, ld, _ = _run(_dequantized(ours))
    assert max(np.abs(h1 - hd).max(), np.abs(s1 - sd).max()) < EXACT
    fin = np.isfinite(l1)  # centroid head: the same clusters scored, the rest -inf
    assert np.array_equal(fin, np.isfinite(ld)) and np.abs(l1[fin] - ld[fin]).max() < EXACT
    # Where both score a token (centroid head: the top clusters; the dense head
    # scores every token) the public logits must agree too.
    both = np.isfinite(l0) & np.isfinite(l1)
    err = max(_rel(h1, h0), _rel(s1, s0), _rel(l1[both], l0[both]))
    print(f"{name} {quant}: rel error {err:.4f}, argmax agreement {(a0 == a1).mean():.2f}")
    assert err < BOUNDS[quant]
    if quant == "bf16":
        assert (a0 == a1).all()  # greedy drafts survive rounding (and the reordering)


@pytest.mark.parametrize("name", NAMES)
def test_policy_recorded(drafters, converted, name):
    dst = converted(name, "q4_0")
    src_cfg = json.loads((drafters[name].path / "config.json").read_text())
    cfg = json.loads((dst / "config.json").read_text())
    for key in (
        "model_type",
        "backbone_hidden_size",
        "use_ordered_embeddings",
        "num_centroids",
        "centroid_intermediate_top_k",
        "text_config",
    ):
        assert cfg[key] == src_cfg[key], key
    q = cfg["quantization"]
    t = q["tensors"]
    assert q["recipe"] == "q4_0" and q["policy"]["keep_high_precision"] is True
    assert t["model.embed_tokens"]["format"] == "affine" and t["model.embed_tokens"]["bits"] == 8
    linears = [
        f"model.layers.{i}.{m}"
        for i in range(4)
        for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    for m in linears:
        assert t[m]["format"] == "q4_0", m
    kept = ["pre_projection", "post_projection"] + (["masked_embedding.centroids"] if name == "e2b_like" else [])
    for m in kept:
        assert t[m]["format"] == "float" and t[m]["reason"] == "policy", m
    assert set(t) == {"model.embed_tokens", *linears, *kept}  # norms/scalars: no entries
    stored = mx.load(str(dst / "model.safetensors"))
    assert not any(k.endswith(".scales") and "norm" in k for k in stored)
    d = load_drafter(dst, "float32")
    assert isinstance(d.model.embed_tokens, QEmbedding)
    assert isinstance(d.model.layers[3].mlp.down_proj, QLinear)
    assert not isinstance(d.pre_projection, QLinear) and not isinstance(d.post_projection, QLinear)


def test_bf16_rounds_floats_and_keeps_token_ordering(drafters, converted):
    dst = converted("e2b_like", "bf16")
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization" not in cfg and cfg["dtype"] == "bfloat16"
    assert cfg["gemma4_mlx_conversion"]["drafter"] is True
    stored = mx.load(str(dst / "model.safetensors"))
    src = mx.load(str(drafters["e2b_like"].path / "model.safetensors"))
    order = stored.pop("masked_embedding.token_ordering")
    assert order.dtype == src["masked_embedding.token_ordering"].dtype  # int64, never a float
    assert mx.array_equal(order, src["masked_embedding.token_ordering"]).item()
    assert {v.dtype for v in stored.values()} == {mx.bfloat16}
    base, ours = load_drafter(drafters["e2b_like"].path, "float32"), load_drafter(dst, "float32")
    assert mx.array_equal(ours.masked_embedding.token_ordering, base.masked_embedding.token_ordering).item()


def test_no_keep_high_precision_quantizes_everything(drafters, targets, converted):
    dst = converted("e2b_like", "q4_0", keep=False)
    t = json.loads((dst / "config.json").read_text())["quantization"]["tensors"]
    for m in ("model.embed_tokens", "pre_projection", "post_projection", "masked_embedding.centroids"):
        assert t[m]["format"] == "q4_0", m
    ours = load_drafter(dst, "float32", target=targets["e2b_like"])
    assert isinstance(ours.masked_embedding.centroids, QLinear) and ours.ordered
    base = load_drafter(drafters["e2b_like"].path, "float32")
    (h0, s0, *_), (h1, s1, *_) = _run(base), _run(ours)
    # every matrix 4-bit now: looser than q4_0's bound, still far from unrelated (~1.4)
    assert _rel(h1, h0) < 2 * BOUNDS["q4_0"] and _rel(s1, s0) < 2 * BOUNDS["q4_0"]


@pytest.mark.parametrize("name", NAMES)
def test_speculative_with_quantized_drafter_is_lossless(targets, converted, name):
    target = targets[name]
    drafter = load_drafter(converted(name, "q4_0"), "float32", target=target)
    prompts = [random_ids(n, seed=20 + i) for i, n in enumerate((5, 13, 3))]
    want = [list(generate_tokens(target, p, max_tokens=12)) for p in prompts]
    assert speculative_batch_generate(target, drafter, prompts, max_tokens=12, draft_tokens=3) == want


def test_corrupt_drafter_shard_leaves_nothing(drafters, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(drafters["e2b_like"].path, src)
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match=rf"{f.name}: unreadable safetensors"):
        convert(src, tmp_path / "out", "q4_0", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_drafter_tensor_named(drafters, tmp_path):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(drafters["dense"].path, src)
    f = src / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"tensor model\.layers\.2\.mlp\.up_proj\.weight: contains NaN"):
        convert(src, tmp_path / "out", "q8", progress=False)
    del tensors["model.norm.weight"]
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = 0
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"missing tensor model\.norm\.weight"):
        convert(src, tmp_path / "out", "q8", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_bad_drafter_config_and_quantized_source(drafters, converted, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(drafters["dense"].path, src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["backbone_hidden_size"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConvertError, match=r"config\.json: missing backbone_hidden_size"):
        convert(src, tmp_path / "out", "q8", progress=False)
    with pytest.raises(ConvertError, match="the source is already quantized"):
        convert(converted("dense", "q4_0"), tmp_path / "out", "q8", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
