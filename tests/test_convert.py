"""HF -> MLX converter (`gemma4_mlx.convert`) and loading of quantized checkpoints.

Two kinds of numerical check:
- runtime exactness: a converted model must compute exactly what its stored weights
  say, i.e. match a float32 model built from the *dequantized* weights (tight bound,
  any mode, any family: covers the module swap, gather_qmm / segment experts, Q4_0
  biases derived at load, SFP8 tensor scales, the quantized tied head);
- quantization error against the float32 original, with per-mode bounds (below).
All quantized CPU matmuls run with float32 activations (docs/quantization.md §9.1).
"""

import json
import shutil

import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx import LoadError, ops
from gemma4_mlx.checkpoint.quantized import quantization_block
from gemma4_mlx.convert import ConvertError, convert
from gemma4_mlx.convert.hub import resolve_source
from gemma4_mlx.models.moe import QuantizedExpertLinear
from gemma4_mlx.models.quantized import QEmbedding, QLinear
from gemma4_mlx.models.text import Model
from gemma4_mlx.runtime.generate import generate_tokens

from helpers import checkpoints as builders
from helpers.checkpoints import build_hf, random_ids, read_json, write_char_tokenizer
from helpers.dequantize import float_twin
from helpers.faults import convert_fails_at_second_shard

QUANTIZED = ["q8", "q4", "mxfp4", "nvfp4", "q4_0", "sfp8"]
MODES = ["bf16", "fp16"] + QUANTIZED
EXACT = 2e-4  # float32 runtime vs float32 dequantized reference; logits of order 1

# Quantization error against the float32 original: the median over positions of the
# per-position relative L2 logit error (20-token prompt, the tempered models below).
# Median, because a top-2 routing flip in one MoE layer changes a position's logits
# wholesale; that is real behaviour but says nothing about the format.  Measured
# (dense / e2b_like / moe / moe64), MLX 0.32.4 CPU, float32 activations:
#   fp16  .0014 .0024 .0018 .0012     bf16  .011 .027 .014 .011
#   q8    .024  .049  .204  .025      sfp8  .111 .251 .420 .238
#   q4    .437  .609  .742  .427      q4_0  .349 .600 .757 .464
#   mxfp4 .496  .800  .771  .572      nvfp4 .372 .769 .841 .544
# The order follows the per-weight errors of docs/quantization.md §5 (fp16 0.03% < bf16 0.2% < q8
# 0.85% < SFP8 2.7% < 4-bit 8-12%); these tiny random networks amplify weight noise
# 5-10x (dozens of matrices in series, peaked attention, routing flips: "moe" has six
# top-2 layers).  Bounds: ~1.4x the worst family.  Unrelated logits would score ~1.41,
# so the 4-bit bounds only catch garbage; test_runtime_matches_dequantized_weights
# checks exactness.
BOUNDS = {"fp16": 0.004, "bf16": 0.04, "q8": 0.3, "sfp8": 0.6, "q4": 1.0, "q4_0": 1.0, "mxfp4": 1.1, "nvfp4": 1.15}


# -- checkpoints -------------------------------------------------------------


def _save(hf, path, **kw):
    hf.save_pretrained(path, **kw)
    return path


def _temper(hf):
    """Attention runs at scale 1.0 on unit-RMS q/k times random norm weights in
    U(0.5, 1.5): softmaxes so peaked that bf16 rounding alone moves the logits by
    17%.  Trained q/k norms are smaller; x0.3 (as demo/train.py starts from) keeps
    the network smooth enough for the quantization-error bounds to mean something."""
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(("q_norm.weight", "k_norm.weight")):
                p.mul_(0.3)
    return hf


def _moe64():
    """MoE + PLE + KV sharing with every matrix input a multiple of 64, so every
    recipe quantizes every expert (the shared families have 16-wide experts)."""
    extra = dict(
        intermediate_size=64,
        moe_intermediate_size=64,
        hidden_size_per_layer_input=64,
        num_hidden_layers=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2,
        use_double_wide_mlp=False,
    )
    old = dict(builders.FAMILIES["all"])
    builders.FAMILIES["moe64"] = {**old, **extra}
    try:
        return build_hf("moe64", seed=7)
    finally:
        del builders.FAMILIES["moe64"]


@pytest.fixture(scope="module")
def tempered(tmp_path_factory):
    root = tmp_path_factory.mktemp("tempered")
    out = {
        name: _save(_temper(build_hf(name, seed=i + 10)), root / name)
        for i, name in enumerate(["dense", "e2b_like", "moe"])
    }
    out["moe64"] = _save(_temper(_moe64()), root / "moe64")
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """convert() once per (source, recipe, keep_high_precision)."""
    root, cache = tmp_path_factory.mktemp("converted"), {}

    def get(src, quant, keep=True):
        key = (str(src), quant, keep)
        if key not in cache:
            dst = root / f"{len(cache)}-{quant}"
            cache[key] = (dst, convert(src, dst, quant, keep_high_precision=keep, progress=False))
        return cache[key]

    return get


def dequantized(model: Model) -> Model:
    """A float32 Model holding the dequantized weights of a loaded (quantized) model."""
    return float_twin(model, Model(model.config))


def logits(model, ids) -> np.ndarray:
    return np.array(model(mx.array([ids]))[0])


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- every mode: runs, is exact w.r.t. its stored weights, error within bounds --


@pytest.mark.parametrize("quant", QUANTIZED)
@pytest.mark.parametrize("family", ["dense", "all"])
def test_runtime_matches_dequantized_weights(checkpoints, converted, family, quant):
    dst, _ = converted(checkpoints[family].path, quant)
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    assert any(isinstance(m, QLinear) for _, m in model.named_modules())
    ref = dequantized(model)
    ids = random_ids(40, seed=5)  # 80 (token, expert) pairs: the CPU segment path
    assert np.abs(logits(model, ids) - logits(ref, ids)).max() < EXACT
    cache, steps = model.make_cache(), []  # decode: one gather_qmm per pair
    model(mx.array([ids[:30]]), cache)
    for t in ids[30:]:
        steps.append(np.array(model(mx.array([[t]]), cache)[0, -1]))
    assert np.abs(np.stack(steps) - logits(ref, ids)[30:]).max() < EXACT


@pytest.mark.parametrize("quant", MODES)
@pytest.mark.parametrize("family", ["dense", "e2b_like", "moe", "moe64"])
def test_error_against_float32(tempered, converted, family, quant):
    src = tempered[family]
    dst, report = converted(src, quant)
    base, _ = gemma4_mlx.load(src, dtype="float32")
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    ids = random_ids(20, seed=1)
    got, want = logits(model, ids), logits(base, ids)
    per_pos = np.linalg.norm(got - want, axis=-1) / np.linalg.norm(want, axis=-1)
    err = float(np.median(per_pos))
    print(
        f"{family} {quant}: median {err:.4f} max {per_pos.max():.4f} "
        f"top-1 agreement {(got.argmax(-1) == want.argmax(-1)).mean():.2f}"
    )
    assert err < BOUNDS[quant]
    out = list(generate_tokens(model, random_ids(8, seed=2), max_tokens=4))
    assert len(out) == 4 and all(0 <= t < 256 for t in out)
    assert report.bytes_out < report.bytes_in or quant in ("fp16", "bf16")


@pytest.mark.parametrize("strategy", ["gather", "sorted", "segments"])
def test_quantized_experts_all_strategies(tempered, converted, monkeypatch, strategy):
    dst, _ = converted(tempered["moe64"], "q4")
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    experts = model.layers[0].experts
    assert isinstance(experts.down_proj, QuantizedExpertLinear)  # every expert matrix quantized
    ids = random_ids(24, seed=3)
    want = logits(dequantized(model), ids)
    monkeypatch.setattr(ops, "moe_strategy", lambda pairs, tokens=1, experts=16: strategy)
    assert np.abs(logits(model, ids) - want).max() < EXACT


def test_float_recipes_round_weights(checkpoints, converted):
    src = checkpoints["e4b_like"].path
    base, _ = gemma4_mlx.load(src, dtype="float32")
    for quant, dt in (("bf16", mx.bfloat16), ("fp16", mx.float16)):
        dst, _ = converted(src, quant)
        cfg = json.loads((dst / "config.json").read_text())
        name = str(dt).split(".")[-1]
        assert "quantization" not in cfg
        assert cfg["dtype"] == name
        stored = mx.load(str(dst / "model.safetensors"))
        assert {v.dtype for v in stored.values()} == {dt}
        got = dict(tree_flatten(gemma4_mlx.load(dst, dtype="float32")[0].parameters()))
        for k, v in tree_flatten(base.parameters()):
            assert mx.array_equal(got[k], v.astype(dt).astype(mx.float32)).item(), k


# -- precision policy -----------------------------------------------------------


def test_policy_recorded_and_applied(checkpoints, converted):
    dst, _ = converted(checkpoints["all"].path, "q4")
    q = json.loads((dst / "config.json").read_text())["quantization"]
    t = q["tensors"]
    assert q["policy"]["keep_high_precision"] is True
    assert t["model.embed_tokens"]["bits"] == 8 and t["model.embed_tokens"]["group_size"] == 64
    for name in (
        "model.embed_tokens_per_layer",
        "model.per_layer_model_projection",
        "model.layers.0.router.proj",
        "model.layers.0.per_layer_input_gate",
        "model.layers.0.per_layer_projection",
    ):
        assert t[name]["format"] == "float" and t[name]["reason"] == "policy", name
    assert t["model.layers.0.mlp.gate_proj"] == {
        "class": "linear",
        "format": "affine",
        "mode": "affine",
        "bits": 4,
        "group_size": 64,
        "provenance": "ptq",
    }
    assert t["model.layers.0.experts.gate_proj"]["bits"] == 4
    assert "kept high precision" in t["model.layers.0.experts.down_proj"]["reason"]  # 16 inputs
    stored = mx.load(str(dst / "model.safetensors"))
    assert not any("norm" in k and k.endswith(".scales") for k in stored)
    assert stored["model.layers.0.router.proj.weight"].dtype == mx.float32
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    assert isinstance(model.model.embed_tokens, QEmbedding)
    assert not isinstance(model.model.embed_tokens_per_layer, QEmbedding)


def test_no_keep_high_precision_quantizes_everything(checkpoints, converted):
    dst, _ = converted(checkpoints["all"].path, "q4", keep=False)
    t = json.loads((dst / "config.json").read_text())["quantization"]["tensors"]
    assert t["model.embed_tokens"]["bits"] == 4
    assert t["model.layers.0.router.proj"]["bits"] == 4
    assert t["model.embed_tokens_per_layer"]["group_size"] == 32  # 96 = 6 layers x 16
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    assert isinstance(model.model.embed_tokens_per_layer, QEmbedding)
    ids = random_ids(40, seed=6)
    assert np.abs(logits(model, ids) - logits(dequantized(model), ids)).max() < EXACT


# -- QAT lattice recovery (q4_0) ------------------------------------------------


def _lattice_checkpoint(path, dtype, embedding: bool = False):
    """dense family with every linear weight exactly on a Q4_0 lattice: per 32-block a
    scale d with 5 significant bits (d*(q-8) then has <= 8, exact in bf16) and one
    element at q = 0, the signed extremum -8d that ggml's quantizer always produces."""
    hf = build_hf("dense", seed=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("_proj.weight") or (embedding and n.endswith("embed_tokens.weight")):
                rows, k = p.shape
                # bell-shaped codes like trained weights; 7d (q = 15) would let MLX's
                # min/max grid coincide with the lattice by luck
                q = (torch.randn((rows, k // 32, 32), generator=g) * 2.5).round().clamp(-7, 6) + 8
                q[..., 0] = 0
                q = torch.gather(q, -1, torch.argsort(torch.rand(q.shape, generator=g), -1))
                e = torch.randint(-9, -5, (rows, k // 32, 1), generator=g).float()
                m = torch.randint(0, 16, (rows, k // 32, 1), generator=g).float()
                sign = torch.randint(0, 2, (rows, k // 32, 1), generator=g).float() * 2 - 1
                d = sign * (1 + m / 16) * 2.0**e
                p.copy_((d * (q - 8)).reshape(rows, k))
    hf.to(dtype).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qat_lattice_recovered_exactly(tmp_path, dtype):
    src = _lattice_checkpoint(tmp_path / "qat", dtype)
    report = convert(src, tmp_path / "q4_0", "q4_0", progress=False)
    assert report.lattice_fraction() == 1.0
    lin = {k: e for k, e in report.tensors.items() if e["class"] == "linear"}
    assert lin and all(
        e["provenance"] == "qat-lattice" and e["lattice_exact"] == 1.0 and e["scale_dtype"] == "float16"
        for e in lin.values()
    )
    stored = mx.load(str(tmp_path / "q4_0" / "model.safetensors"))
    assert not any(k.endswith(".biases") and k[:-7] in lin for k in stored)  # -8d is derived
    source = dict(tree_flatten(gemma4_mlx.load(src, dtype="float32", fuse=False)[0].parameters()))

    def exact_fraction(folder):
        deq = dict(tree_flatten(dequantized(gemma4_mlx.load(folder, dtype="float32", fuse=False)[0]).parameters()))
        return [float(mx.mean(deq[k + ".weight"] == source[k + ".weight"]).item()) for k in lin]

    assert exact_fraction(tmp_path / "q4_0") == [1.0] * len(lin)
    convert(src, tmp_path / "q4", "q4", progress=False)  # plain affine g64 re-quantization
    plain = exact_fraction(tmp_path / "q4")
    assert max(plain) < 0.8 and np.mean(plain) < 0.6  # docs/quantization.md §4.2: ~39% exact at g64


def test_qat_embedding_stored_as_q4_0(tmp_path):
    """The q4_0 recipe keeps a tied embedding that sits on the QAT lattice as Q4_0
    (its lattice values, 4.5 bits: what Google's Q4_0 figures assume); off the lattice it keeps
    the 8-bit rule (test below)."""
    src = _lattice_checkpoint(tmp_path / "qat", torch.bfloat16, embedding=True)
    report = convert(src, tmp_path / "q4_0", "q4_0", progress=False)
    e = report.tensors["model.embed_tokens"]
    assert e["format"] == "q4_0" and e["provenance"] == "qat-lattice" and "lattice values" in e["note"]
    cfg = read_json(tmp_path / "q4_0" / "config.json")["quantization"]
    assert cfg["tensors"]["model.embed_tokens"]["format"] == "q4_0"
    assert cfg["policy"]["classes"]["embedding"]["if_on_qat_lattice"]["format"] == "q4_0"
    src_emb = gemma4_mlx.load(src, dtype="float32")[0].model.embed_tokens.weight
    model = gemma4_mlx.load(tmp_path / "q4_0", dtype="float32")[0]
    deq = dequantized(model).model.embed_tokens.weight
    assert mx.array_equal(deq, src_emb).item()
    ids = mx.array([random_ids(12)])
    assert np.isfinite(np.array(model(ids))).all()


def test_q4_0_on_ordinary_weights_falls_back_to_ggml(checkpoints, converted):
    _, report = converted(checkpoints["dense"].path, "q4_0")
    e = report.tensors["model.layers.0.self_attn.q_proj"]
    assert e["provenance"] == "ptq-ggml" and e["lattice_exact"] < 0.01 and e["scale_dtype"] == "float16"
    emb = report.tensors["model.embed_tokens"]  # not on a lattice: the 8-bit embedding rule
    assert emb["format"] == "affine" and emb["bits"] == 8


# -- streaming, atomic output, errors ------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded") / "moe"
    _save(build_hf("moe", seed=2), path, max_shard_size="300KB")
    assert len(list(path.glob("*.safetensors"))) >= 3
    return path


def test_sharded_source_gives_sharded_output(sharded, tmp_path):
    report = convert(sharded, tmp_path / "out", "q8", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(list(sharded.glob("*.safetensors")))
    print(f"peak {report.peak_mlx} B, largest source shard {report.largest_shard} B, rss {report.peak_rss}")
    assert report.peak_mlx < 1.5 * report.largest_shard  # streaming: about one shard resident
    model, _ = gemma4_mlx.load(tmp_path / "out", dtype="float32")
    ids = random_ids(12, seed=8)
    assert np.abs(logits(model, ids) - logits(dequantized(model), ids)).max() < EXACT


def test_failure_half_way_leaves_nothing(sharded, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    calls = convert_fails_at_second_shard(monkeypatch, lambda: convert(sharded, dst, "q4", progress=False))
    assert not dst.exists() and not (tmp_path / "out.partial").exists()
    dst.mkdir()  # a failing --force run keeps the previous DST
    (dst / "keep.txt").write_text("old")
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        convert(sharded, dst, "q4", force=True, progress=False)
    assert (dst / "keep.txt").read_text() == "old" and not (tmp_path / "out.partial").exists()


def refused_by_loader_and_converter(src, dst, says: str) -> None:
    """Loading `src` and converting it both fail with one line matching `says`, and
    the conversion leaves nothing behind."""
    with pytest.raises(LoadError, match=says):
        gemma4_mlx.load(src)
    with pytest.raises(ConvertError, match=says):
        convert(src, dst, "q8", progress=False)
    assert not dst.exists()


@pytest.mark.parametrize(
    "index",
    ["[1, 2]", '{"weight_map": []}', '{"weight_map": {"a": 3}}', '{"weight_map": {"a": "../x.safetensors"}}', b"\xff"],
)
def test_malformed_shard_index_is_named(sharded, tmp_path, index):
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    path = src / "model.safetensors.index.json"
    path.write_bytes(index if isinstance(index, bytes) else index.encode())
    refused_by_loader_and_converter(src, tmp_path / "out", r"model\.safetensors\.index\.json: malformed index")


def test_a_tensor_in_two_shards_is_refused(sharded, tmp_path):
    """Read one shard after another, the later copy of a tensor silently won."""
    src = tmp_path / "src"
    shutil.copytree(sharded, src)
    first, second = sorted(src.glob("*.safetensors"))[:2]
    name, value = next(iter(mx.load(str(first)).items()))
    extra = dict(mx.load(str(second)))
    extra[name] = value + 1
    mx.save_safetensors(str(second), extra, metadata={"format": "pt"})
    refused_by_loader_and_converter(src, tmp_path / "out", rf"{second.name}: tensor \S+ is also stored in {first.name}")


@pytest.mark.parametrize("dtype", [mx.int32, mx.bool_])
def test_a_float_weight_stored_as_integers_is_refused(checkpoints, tmp_path, dtype):
    """Shapes alone were checked: an integer or bool tensor for a float weight loaded,
    ran, and was copied through the converter unquantized."""
    src = tmp_path / "src"
    shutil.copytree(checkpoints["dense"].path, src)
    (shard,) = src.glob("*.safetensors")
    tensors = dict(mx.load(str(shard)))
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name].astype(dtype)
    mx.save_safetensors(str(shard), tensors, metadata={"format": "pt"})
    says = rf"tensor \S*q_proj\.weight is {dtype}, expected floating point"
    refused_by_loader_and_converter(src, tmp_path / "out", says)


def test_existing_dst_refused_without_force(checkpoints, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    with pytest.raises(ConvertError, match=r"out: already exists .*force"):
        convert(checkpoints["dense"].path, dst, "q8", progress=False)
    assert (dst / "old.txt").exists()
    convert(checkpoints["dense"].path, dst, "q8", force=True, progress=False)
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()


def test_force_never_replaces_a_folder_holding_the_source(checkpoints, tmp_path):
    """--force removes the old DST at the end: a DST that is, or holds, the source is
    refused before anything is written (it removed the source once)."""
    src = tmp_path / "anc" / "src"
    shutil.copytree(checkpoints["dense"].path, src)
    (tmp_path / "anc" / "important.txt").write_text("keep")
    with pytest.raises(ConvertError, match=r"anc: destination holds the source"):
        convert(src, tmp_path / "anc", "q8", force=True, progress=False)
    with pytest.raises(ConvertError, match=r"destination is the source folder"):
        convert(src, src, "q8", force=True, progress=False)
    assert (src / "config.json").exists() and (tmp_path / "anc" / "important.txt").read_text() == "keep"


def test_bad_arguments(checkpoints, tmp_path):
    with pytest.raises(ConvertError, match=r"quant 'q3': expected one of"):
        convert(checkpoints["dense"].path, tmp_path / "o", "q3")
    with pytest.raises(ConvertError, match=r"nowhere: no such folder"):
        convert(tmp_path / "nowhere", tmp_path / "o", "q8")
    assert not (tmp_path / "o").exists()


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_named(sharded, tmp_path):
    src = _copy(sharded, tmp_path / "src")
    bad = sorted(src.glob("*.safetensors"))[1]
    bad.write_bytes(bad.read_bytes()[:-1000])
    with pytest.raises(LoadError, match=rf"{bad.name}: unreadable safetensors \(file is truncated"):
        convert(src, tmp_path / "out", "q4", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_corrupt_header_and_bad_tensor_named(checkpoints, tmp_path):
    src = _copy(checkpoints["dense"].path, tmp_path / "src")
    f = next(src.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    good = bytes(data)
    data[8:16] = b"\x00garbage"
    f.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=rf"{f.name}: unreadable safetensors"):
        convert(src, tmp_path / "out", "q8", progress=False)
    from safetensors.numpy import load_file, save_file

    f.write_bytes(good)
    tensors = load_file(f)
    key = "model.language_model.layers.1.mlp.up_proj.weight"
    tensors[key][0, 0] = np.nan
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight: contains NaN"):
        convert(src, tmp_path / "out", "q4", progress=False)
    tensors[key] = tensors[key][:, :32].copy()
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ConvertError, match=r"up_proj\.weight has shape \(96, 32\), config says \(96, 64\)"):
        convert(src, tmp_path / "out", "q4", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_tokenizer_and_templates_copied(checkpoints, tmp_path):
    src = _copy(checkpoints["e2b_like"].path, tmp_path / "src")
    write_char_tokenizer(src)
    (src / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (src / "processor_config.json").write_text("{}")
    convert(src, tmp_path / "out", "sfp8", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes(), name
    model, tok = gemma4_mlx.load(tmp_path / "out", dtype="float32")
    assert tok is not None
    assert isinstance(gemma4_mlx.generate(model, tok, "hi", max_tokens=3, chat=False), str)


def test_sfp8_tensor_scale(checkpoints, tmp_path):
    """Weights above 1.875 get a per-tensor scale s != 1, applied after the matmul."""
    from safetensors.numpy import load_file, save_file

    src = _copy(checkpoints["dense"].path, tmp_path / "src")
    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    tensors[key] = tensors[key] * 60  # max |w| ~ 12
    save_file(tensors, f, metadata={"format": "pt"})
    report = convert(src, tmp_path / "out", "sfp8", progress=False)
    assert report.tensors["model.layers.0.self_attn.q_proj"]["tensor_scale"] > 1
    model, _ = gemma4_mlx.load(tmp_path / "out", dtype="float32", fuse=False)  # addressed by checkpoint name
    base, _ = gemma4_mlx.load(src, dtype="float32", fuse=False)
    w = dict(tree_flatten(dequantized(model).parameters()))["model.layers.0.self_attn.q_proj.weight"]
    src_w = dict(tree_flatten(base.parameters()))["model.layers.0.self_attn.q_proj.weight"]
    assert rel(np.array(w), np.array(src_w)) < 0.04  # SFP8: ~2.7% (docs/quantization.md §2.3)
    ids = random_ids(16, seed=9)
    assert np.abs(logits(model, ids) - logits(dequantized(model), ids)).max() < EXACT


# -- mlx-community layout -------------------------------------------------------------


def test_loads_mlx_community_layout(checkpoints, tmp_path):
    """Written from the published conventions, not by our converter: `language_model.model.`
    prefix, experts as `experts.switch_glu.*`, affine weight/scales/biases, top-level
    `quantization` with per-path entries (mlx-lm keeps router.proj at 8 bits)."""
    src = checkpoints["moe"].path
    out = {}
    for k, v in mx.load(str(next(src.glob("*.safetensors")))).items():
        k = k.replace("model.language_model.", "language_model.model.")
        if k.endswith("experts.gate_up_proj"):
            gate, up = mx.split(v, 2, axis=1)
            parts = {"switch_glu.gate_proj.weight": gate, "switch_glu.up_proj.weight": up}
            out.update({k.replace("gate_up_proj", p): a for p, a in parts.items()})
        elif k.endswith("experts.down_proj"):
            out[k.replace("down_proj", "switch_glu.down_proj.weight")] = v
        else:
            out[k] = v
    qcfg = {"group_size": 64, "bits": 4, "mode": "affine"}
    for k in list(out):
        v = out[k]
        if not k.endswith(("proj.weight", "embed_tokens.weight")) or v.shape[-1] % 64:
            continue  # mlx-lm skips inputs not divisible by the group size
        base = k[: -len(".weight")]
        bits = 8 if base.endswith("router.proj") else 4
        if bits == 8:
            qcfg[base] = {"group_size": 64, "bits": 8}
        out[k], out[base + ".scales"], out[base + ".biases"] = mx.quantize(v, 64, bits)
    dst = tmp_path / "community"
    dst.mkdir()
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "mlx"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = cfg["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(cfg))
    model, _ = gemma4_mlx.load(dst, dtype="float32")
    layer = model.layers[0]
    assert layer.router.proj.bits == 8 and isinstance(layer.experts.gate_up_proj, QuantizedExpertLinear)
    ids = random_ids(40, seed=4)
    assert np.abs(logits(model, ids) - logits(dequantized(model), ids)).max() < EXACT


def test_hf_quantization_config_refused(checkpoints, tmp_path):
    src = _copy(checkpoints["dense"].path, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"config.json: .*compressed-tensors.* not an MLX format"):
        gemma4_mlx.load(src)
    with pytest.raises(LoadError, match=r"compressed-tensors"):
        convert(src, tmp_path / "out", "q8", progress=False)


@pytest.mark.parametrize(
    "edit",
    [
        lambda q: q.update(tensors=["x"]),
        lambda q: q["tensors"].update({k: "affine" for k in q["tensors"]}),
    ],
    ids=["tensors-a-list", "entry-a-string"],
)
def test_malformed_quantization_block_is_named(checkpoints, tmp_path, edit):
    dst = tmp_path / "q"
    convert(checkpoints["dense"].path, dst, "q8", progress=False)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization"])
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"quantization\.tensors.* must be an object"):
        gemma4_mlx.load(dst)


def test_text_config_of_the_wrong_type_is_not_read_for_quantization():
    """A text-only config may carry a stray text_config: the quantization lookup must
    not trip over it (it raised AttributeError before the config's own checks)."""
    assert quantization_block({"model_type": "gemma4_text", "text_config": "x"}, "config.json") is None


# -- command line ---------------------------------------------------------------------


def test_cli_convert(checkpoints, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gemma4_mlx.cli import app

    run = CliRunner().invoke
    src, dst = str(checkpoints["e2b_like"].path), str(tmp_path / "out")
    r = run(app, ["convert", src, dst, "--quant", "q4_0", "--no-keep-high-precision"])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and "q4_0:" in r.output
    q = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert q["policy"]["keep_high_precision"] is False and q["recipe"] == "q4_0"
    r = run(app, ["convert", src, dst, "--quant", "q8"])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"error: {dst}: already exists (replace it with --force; force=True in Python)"
    ]
    assert run(app, ["convert", src, dst, "--quant", "q8", "--force"]).exit_code == 0
    r = run(app, ["convert", src, str(tmp_path / "x"), "--quant", "int3"])
    assert r.exit_code == 1 and "quant 'int3': expected one of" in r.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = run(app, ["convert", "nobody/no-such-gemma", str(tmp_path / "y"), "--quant", "q8"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "nobody/no-such-gemma: not a local folder" in r.output and "offline" in r.output
    assert not (tmp_path / "y").exists() and not (tmp_path / "y.partial").exists()


def test_q4_0_keeps_4_5_bits_per_weight_resident(converted, checkpoints):
    """No Q4_0 biases are stored or resident: they are derived per product (docs/quantization.md §1)."""
    dst, _ = converted(checkpoints["all"].path, "q4_0")
    model = gemma4_mlx.load(dst, dtype="float32")[0]
    q = [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m, (QLinear, QuantizedExpertLinear)) and getattr(m, "derive_biases", False)
    ]
    assert q
    for path, m in q:
        assert "biases" not in m, path
        n = m["weight"].size * 32 // m.bits  # weights in the matrix
        bits = (m["weight"].nbytes + m["scales"].nbytes) * 8 / n
        assert bits == 4 + 8 * m["scales"].itemsize / 32, path  # 4.5 with fp16 scales


def test_dot_as_destination_is_the_current_folder(checkpoints, tmp_path, monkeypatch):
    """`convert SRC . --force` named a folder without a name (a raw ValueError from its
    staging path); it is the current folder, which exists, so --force is asked for."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(ConvertError, match=r"already exists .*force"):
        convert(checkpoints["dense"].path, ".", "q8", progress=False)
    report = convert(checkpoints["dense"].path, ".", "q8", force=True, progress=False)
    assert report.dst == here and (here / "config.json").exists()
    inner = here / "inner"
    inner.mkdir()
    monkeypatch.chdir(inner)  # ".." is `here`: its staging folder sits beside it, not inside
    report = convert(checkpoints["dense"].path, "..", "q8", force=True, progress=False)
    assert report.dst == here and (here / "config.json").exists() and not inner.exists()


def test_short_names_resolve_as_other_commands_read_them(checkpoints, tmp_path, monkeypatch):
    """`convert e2b-it ...` takes the short name every other command takes: its repo id,
    found in the Hugging Face cache (it used to say "no such folder")."""
    cache = tmp_path / "hf"
    snapshot = cache / "models--google--gemma-4-E2B-it" / "snapshots" / "0123abcd"
    shutil.copytree(checkpoints["dense"].path, snapshot)
    (cache / "models--google--gemma-4-E2B-it" / "refs").mkdir()
    (cache / "models--google--gemma-4-E2B-it" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_source("e2b-it") == snapshot
    with pytest.raises(ConvertError, match=r"e4b-it: not a local folder .*not in the local cache"):
        resolve_source("e4b-it")
