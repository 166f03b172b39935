"""Vision tower, embedder and image processor against transformers 5.24 (docs/multimodal.md §2, §6, §8).

Model parity: tiny random towers ("small", "large", "union"; see mm_configs) are
written by transformers with `save_pretrained`, read back through our `sanitize`,
and compared (ours in float32, transformers in float64) on the encoder output, the tower's soft tokens and the
final embeddings in text space.  Processor parity: our processor against
transformers' PIL backend (the one that runs without torchvision), exactly.
"""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import copy
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size  # noqa: E402

import gemma4_mlx.models.vision as V  # noqa: E402
from gemma4_mlx import ops, ops_vision  # noqa: E402
from gemma4_mlx.checkpoint.load import LoadError, load_model  # noqa: E402
from gemma4_mlx.config import VisionConfig, parse_config  # noqa: E402
from gemma4_mlx.media import image as P  # noqa: E402
from gemma4_mlx.media.image import BUDGETS, ImageProcessor  # noqa: E402
from gemma4_mlx.models.text import Model  # noqa: E402
from gemma4_mlx.models.vision import VisionModel, sanitize  # noqa: E402

from helpers.mm_configs import TEXT_TINY, TOWERS, build_hf, hf_image_processor  # noqa: E402

TOL = 1e-4


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -- model parity ------------------------------------------------------------


class Tower:
    def __init__(self, name, tmp):
        self.name = name
        self.hf = build_hf(name, seed=list(TOWERS).index(name) + 1)
        self.hf.save_pretrained(tmp)
        self.model = load_model(tmp, dtype="float32")[0].vision
        # The reference runs in float64: transformers' float32 is itself ~1e-4 off on
        # long images on some CPUs (AVX-512 kernels round differently), which is the
        # whole of TOL; against float64 the error measured is ours alone.
        self.hf64 = copy.deepcopy(self.hf).double()

    def reference(self, pixel_values, position_ids):
        """transformers' encoder output (padded), tower output and per-image embeddings."""
        seen = {}
        hook = self.hf64.model.vision_tower.encoder.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("enc", out.last_hidden_state)
        )
        try:
            with torch.no_grad():
                out = self.hf64.model.get_image_features(
                    torch.tensor(pixel_values, dtype=torch.float64), torch.tensor(position_ids), return_dict=True
                )
        finally:
            hook.remove()
        return seen["enc"].numpy(), out.last_hidden_state.numpy(), [e.numpy() for e in out.pooler_output]


@pytest.fixture(scope="module", params=list(TOWERS))
def tower(request, tmp_path_factory) -> Tower:
    return Tower(request.param, tmp_path_factory.mktemp(f"vision_{request.param}"))


def errors(tower: Tower, batch) -> dict[str, float]:
    enc_ref, soft_ref, emb_ref = tower.reference(batch.pixel_values, batch.position_ids)
    emb, counts = tower.model(batch.pixel_values, batch.position_ids)
    soft, _ = tower.model.soft_tokens(batch.pixel_values, batch.position_ids)
    assert counts == batch.num_soft_tokens == [e.shape[0] for e in emb_ref]
    assert emb.shape == (sum(counts), tower.hf.config.text_config.hidden_size)
    enc = 0.0
    for i, n in enumerate(c * 9 for c in counts):
        ours = tower.model.vision_tower.encode(mx.array(batch.pixel_values[i, :n]), mx.array(batch.position_ids[i, :n]))
        enc = max(enc, max_diff(ours, enc_ref[i, :n]))
    return {
        "encoder": enc,
        "soft_tokens": max_diff(soft, soft_ref),
        "embeddings": max_diff(emb, np.concatenate(emb_ref)),
    }


def two_images(budget=70):
    """The pair of docs/multimodal.md §8: 50x80 and 120x30 -> 60 + 64 soft tokens at budget 70 (patch 4)."""
    return ImageProcessor(image_budget=budget, patch_size=4)([noise(50, 80, 1), noise(120, 30, 2)])


def test_tower_parity(tower):
    batch = two_images()
    assert batch.pixel_values.shape == (2, 630, 48) and batch.num_soft_tokens == [60, 64]
    err = errors(tower, batch)
    print(tower.name, err)
    assert max(err.values()) < TOL, err


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-branch", "gpu-branch"])
def test_tower_parity_long_image(tower, monkeypatch, gpu):
    """1,080 real patches: more than one attention query block, on either branch of
    `ops_vision.unmasked_attention` (the CPU's blocks shrunk to 100 queries here)."""
    monkeypatch.setattr(ops, "FORCE_GPU_BRANCHES", gpu)
    monkeypatch.setattr(ops_vision, "UNMASKED_BLOCK_SCORES", 100 * tower.model.config.num_attention_heads * 1080)
    blocks, real = [], ops.softmax_times
    monkeypatch.setattr(ops, "softmax_times", lambda *a: blocks.append(1) or real(*a))
    batch = ImageProcessor(image_budget=140, patch_size=4)(noise(200, 170, 3))
    assert batch.num_soft_tokens == [120] and 1080 > ops_vision.GPU_QUERY_BLOCK
    err = errors(tower, batch)
    per_forward = 11 * tower.model.config.num_hidden_layers  # 1080 queries in blocks of 100, each layer
    assert (len(blocks) == 0) if gpu else (len(blocks) > 0 and len(blocks) % per_forward == 0)
    print(tower.name, err)
    assert max(err.values()) < TOL, err


# Each re-introduced porting bug must move the output far beyond the tolerance.


@pytest.fixture(scope="module")
def union_tower(tmp_path_factory) -> Tower:
    return Tower("union", tmp_path_factory.mktemp("vision_mutations"))


@pytest.fixture
def union(union_tower):
    """The union tower, restored after each mutation."""
    cfg = union_tower.model.config
    yield union_tower
    cfg.standardize = True
    for _, m in union_tower.model.named_modules():
        if isinstance(m, V.ClippableLinear):
            m.clip = True


def embedding_error(t: Tower, batch) -> float:
    emb_ref = np.concatenate(t.reference(batch.pixel_values, batch.position_ids)[2])
    return max_diff(t.model(batch.pixel_values, batch.position_ids)[0], emb_ref)


def test_mutation_clipping_ignored(union):
    batch = two_images()
    assert embedding_error(union, batch) < TOL
    for _, m in union.model.named_modules():
        if isinstance(m, V.ClippableLinear):
            m.clip = False
    assert embedding_error(union, batch) > 100 * TOL


def test_mutation_rope_axes_swapped(union, monkeypatch):
    batch = two_images()
    real = V.axial_rope_tables
    monkeypatch.setattr(V, "axial_rope_tables", lambda pos, *a: real(pos[:, ::-1], *a))
    assert embedding_error(union, batch) > 100 * TOL


def test_mutation_positions_swapped(union):
    batch = two_images()
    emb_ref = np.concatenate(union.reference(batch.pixel_values, batch.position_ids)[2])
    swapped = np.where(batch.position_ids >= 0, batch.position_ids[..., ::-1], -1)
    emb, counts = union.model(batch.pixel_values, swapped)
    assert counts == batch.num_soft_tokens
    assert max_diff(emb, emb_ref) > 100 * TOL


def test_mutation_standardize_ignored(union):
    batch = two_images()
    union.model.vision_tower.config.standardize = False
    assert embedding_error(union, batch) > 100 * TOL


def test_bfloat16_weights(union):
    """Real checkpoints are bf16: the output stays bf16 (clamp scalars stay float32) and
    drifts from float32 no more than transformers' own bf16 run does (up to 2x)."""
    import copy

    batch = two_images()
    ref, counts = union.model(batch.pixel_values, batch.position_ids)
    hf16 = copy.deepcopy(union.hf).to(torch.bfloat16)
    with torch.no_grad():
        out = hf16.model.get_image_features(
            torch.tensor(batch.pixel_values), torch.tensor(batch.position_ids), return_dict=True
        )
    hf_drift = max_diff(torch.cat(out.pooler_output).float().numpy(), ref)
    saved = union.model.parameters()
    try:
        union.model.update(tree_map(lambda a: a.astype(mx.bfloat16) if a.ndim else a, saved))
        emb, counts16 = union.model(batch.pixel_values, batch.position_ids)
    finally:
        union.model.update(saved)
    assert emb.dtype == mx.bfloat16 and counts16 == counts
    drift = max_diff(emb.astype(mx.float32), ref)
    print(f"bf16 drift from float32: ours {drift:.3g}, transformers {hf_drift:.3g}")
    assert drift < 2 * hf_drift


# -- config and checkpoint keys ------------------------------------------------

E2B_VISION = {  # the shape of a released vision_config block (docs/multimodal.md §2.1), with extra keys
    "model_type": "gemma4_vision",
    "_name_or_path": "",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "head_dim": 64,
    "patch_size": 16,
    "pooling_kernel_size": 3,
    "position_embedding_size": 10240,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    "use_clipped_linears": True,
    "standardize": False,
    "default_output_length": 280,
    "max_position_embeddings": 131072,
    "attention_bias": False,
    "dtype": "bfloat16",
}


def test_config_from_dict():
    cfg = VisionConfig.from_dict(E2B_VISION)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim, cfg.rope_theta) == (768, 16, 64, 100.0)
    assert cfg.use_clipped_linears and not cfg.standardize and cfg.default_output_length == 280
    large = VisionConfig.from_dict(
        {
            **E2B_VISION,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "head_dim": 72,
            "use_clipped_linears": False,
            "standardize": True,
        }
    )
    m = VisionModel(large, 5376)
    assert m.vision_tower.std_bias.shape == (1152,) and not m.vision_tower.encoder.layers[0].mlp.up_proj.clip
    assert m.embed_vision.embedding_projection.weight.shape == (5376, 1152)
    with pytest.raises(ValueError, match="rope_type"):
        VisionConfig.from_dict({**E2B_VISION, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}})
    no_tower = parse_config({"model_type": "gemma4", "text_config": TEXT_TINY, "vision_config": None})
    assert not Model.from_config(no_tower).has_vision


def test_sanitize_keys_and_layouts():
    cfg = VisionConfig.from_dict({**E2B_VISION, "hidden_size": 8, "patch_size": 2})
    w = np.arange(8 * 12, dtype=np.float32).reshape(8, 12)  # (out, (py, px, c))
    torch_conv = w.reshape(8, 2, 2, 3).transpose(0, 3, 1, 2)  # (out, c, kh, kw)
    for layout in (torch_conv, w.reshape(8, 2, 2, 3)):
        out = sanitize({"model.vision_tower.patch_embedder.input_proj.weight": mx.array(layout)}, cfg)
        assert np.array_equal(out["vision_tower.patch_embedder.input_proj.weight"], w)
    raw = {
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.input_max": mx.array(2.5, dtype=mx.bfloat16),
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": mx.zeros((8, 8)),
        "model.vision_tower.encoder.rotary_emb.inv_freq": mx.zeros((4,)),
        "model.embed_vision.embedding_projection.weight": mx.zeros((16, 8)),
        "embed_vision.embedding_projection.weight": mx.zeros((16, 8)),  # mlx-vlm style, no `model.`
        "model.language_model.embed_tokens.weight": mx.zeros((4, 16)),
        "model.audio_tower.layers.0.self_attn.q_proj.input_max": mx.array(1.0),
    }
    out = sanitize(raw, cfg)
    assert sorted(out) == [
        "embed_vision.embedding_projection.weight",
        "vision_tower.encoder.layers.0.self_attn.q_proj.input_max",
        "vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight",
    ]
    clamp = out["vision_tower.encoder.layers.0.self_attn.q_proj.input_max"]
    assert clamp.dtype == mx.float32 and clamp.shape == () and clamp.item() == 2.5
    cfg.use_clipped_linears = False
    assert not any(k.endswith("input_max") for k in sanitize(raw, cfg))


def test_load_errors(tmp_path):
    t = Tower("small", tmp_path / "src")
    weights = mx.load(str(tmp_path / "src" / "model.safetensors"))
    dropped = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj.linear" not in k}
    bad = dict(weights, **{"model.embed_vision.embedding_projection.weight": mx.zeros((3, 3))})
    for name, w, pattern in (
        ("dropped", dropped, "missing tensor vision.vision_tower.encoder.layers.1.mlp.up_proj"),
        ("bad", bad, r"vision.embed_vision.embedding_projection.weight has shape \(3, 3\)"),
    ):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "src" / "config.json", tmp_path / name)
        mx.save_safetensors(str(tmp_path / name / "model.safetensors"), w)
        with pytest.raises(LoadError, match=pattern):
            load_model(tmp_path / name, dtype="float32")
    batch = two_images()
    shuffled = batch.position_ids.copy()
    shuffled[0, :5] = -1  # padding inside the real patches
    with pytest.raises(ValueError, match="pixel_position_ids"):
        t.model(batch.pixel_values, shuffled)


# -- processor parity ------------------------------------------------------------

SIZES = [  # (height, width): tiny, odd, square, fixed points, photos, very wide/tall, huge
    (1, 1),
    (2, 3),
    (7, 5),
    (16, 16),
    (47, 49),
    (224, 224),
    (333, 517),
    (336, 432),
    (480, 640),
    (1000, 100),
    (1080, 1920),
    (12, 3000),
    (4000, 9),
    (1, 2000),
    (2000, 1),
    (3000, 2200),
]


@pytest.fixture(scope="module")
def hf_processor():
    return transformers.Gemma4ImageProcessorPil()


def assert_same(ours, ref):
    assert np.array_equal(ours.pixel_values, ref["pixel_values"]), max_diff(ours.pixel_values, ref["pixel_values"])
    assert ours.pixel_values.dtype == ref["pixel_values"].dtype == np.float32
    assert np.array_equal(ours.position_ids, ref["image_position_ids"])
    assert ours.num_soft_tokens == list(ref["num_soft_tokens_per_image"])


def test_backend_without_torchvision():
    """What `Gemma4ImageProcessor` means here: the PIL backend (no torchvision installed)."""
    assert type(transformers.Gemma4ImageProcessor()).__name__ == "Gemma4ImageProcessorPil"


@pytest.mark.parametrize("budget", BUDGETS)
def test_processor_parity_sweep(hf_processor, budget):
    images = [Image.fromarray(noise(h, w, seed=i)) for i, (h, w) in enumerate(SIZES)]
    ours = ImageProcessor()(images, image_budget=budget)
    assert ours.pixel_values.shape == (len(SIZES), 9 * budget, 768)
    assert_same(ours, hf_processor(images, max_soft_tokens=budget))
    for (h, w), n, (rh, rw) in zip(SIZES, ours.num_soft_tokens, ours.sizes):
        assert n == (rh // 48) * (rw // 48) <= budget
        assert (rh, rw) == get_aspect_ratio_preserving_size(h, w, 16, 9 * budget, 3)


def test_processor_parity_tiny_patch():
    """The tiny towers' inputs (patch 4) are what transformers would feed them."""
    images = [noise(50, 80, 1), noise(120, 30, 2), noise(200, 170, 3)]
    for budget in (70, 140):
        assert_same(
            ImageProcessor(image_budget=budget, patch_size=4)(images), hf_image_processor(budget, patch_size=4)(images)
        )


def test_resize_rule_sweep():
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in np.exp(rng.uniform(0, np.log(20000), (600, 2))).astype(int) + 1]
    for budget in BUDGETS:
        for h, w in sizes:
            assert P.resized_size(h, w, budget) == get_aspect_ratio_preserving_size(h, w, 16, 9 * budget, 3)


SPEC_TABLE = {  # docs/multimodal.md §2.2
    (224, 224): [64, 121, 256, 529, 1089],
    (480, 640): [63, 130, 266, 540, 1064],
    (1080, 1920): [66, 120, 264, 527, 1100],
    (1000, 100): [52, 111, 260, 518, 1050],
}


def test_spec_token_table():
    for (h, w), counts in SPEC_TABLE.items():
        assert [P.num_soft_tokens(h, w, b) for b in BUDGETS] == counts
    assert P.resized_size(480, 640, 70) == (336, 432) and P.resized_size(1000, 100, 280) == (2496, 240)


def test_processor_input_kinds(hf_processor, tmp_path):
    rgba = noise(61, 90, 3, channels=4)
    la = Image.fromarray(noise(40, 70, 4, channels=4)).convert("LA")
    pal = Image.fromarray(noise(50, 50, 5)).convert("P")
    pal.info["transparency"] = 7
    chw = np.moveaxis(noise(50, 80, 9), -1, 0).astype(np.float32)
    cases = [  # (ours, transformers' input)
        (Image.fromarray(rgba), Image.fromarray(rgba)),
        (la, la),
        (pal, pal),
        (Image.fromarray(noise(30, 90, 6, 1)), Image.fromarray(noise(30, 90, 6, 1))),
        (Image.fromarray(noise(60, 40, 7)).convert("CMYK"), Image.fromarray(noise(60, 40, 7)).convert("CMYK")),
        (noise(45, 45, 8), noise(45, 45, 8)),
        (rgba, rgba),
        (noise(33, 70, 9)[..., :1], noise(33, 70, 9)[..., :1]),
        (chw, chw),  # (C, H, W), integer-valued float32
        (noise(3, 50, 13), noise(3, 50, 13)),  # ambiguous (3, 50, 3): channels first, as transformers
        (noise(35, 47, 10, 1), Image.fromarray(noise(35, 47, 10, 1))),  # 2-D: transformers wants PIL "L"
    ]
    for ours_in, ref_in in cases:
        assert_same(ImageProcessor()(ours_in, image_budget=70), hf_processor(ref_in, max_soft_tokens=70))

    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.fromarray(rgba).save(png)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the upright image is 90 x 61
    Image.fromarray(noise(61, 90, 11)).save(jpg, exif=exif)
    for path in (png, str(jpg)):
        ours = ImageProcessor()([path, path], image_budget=140)
        assert_same(ours, hf_processor([transformers.image_utils.load_image(str(path))] * 2, max_soft_tokens=140))
    assert P.load_image(jpg).size == (61, 90)


def test_bad_inputs(tmp_path):
    proc = ImageProcessor()
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt.png"):
        proc(corrupt)
    for ext in ("png", "jpg"):
        whole = tmp_path / f"whole.{ext}"
        Image.fromarray(noise(200, 300, 12)).save(whole)
        cut = tmp_path / f"truncated.{ext}"
        cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
        with pytest.raises(ValueError, match=f"truncated.{ext}") as e:
            proc([whole, cut])
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not found: .*missing.png"):
        proc(tmp_path / "missing.png")
    for empty in (Image.new("RGB", (0, 10)), np.zeros((0, 10, 3), np.uint8), np.zeros((10, 0), np.uint8)):
        with pytest.raises(ValueError, match="zero size"):
            proc(empty)
    with pytest.raises(ValueError, match="0-255"):
        proc(np.random.default_rng(0).random((20, 20, 3)))
    with pytest.raises(ValueError, match="unsupported image type"):
        proc(12)
    for budget in (300, 0, 256, True, "280", 280.0):
        with pytest.raises(ValueError, match="image_budget must be one of 70, 140, 280, 560, 1120"):
            ImageProcessor(image_budget=budget)
        with pytest.raises(ValueError, match="image_budget"):
            proc(noise(10, 10), image_budget=budget)
    with pytest.raises(ValueError, match="max_soft_tokens"):
        ImageProcessor.from_config({"image_processor": {"max_soft_tokens": 100}})


def test_from_config():
    pc = {
        "image_processor": {
            "patch_size": 16,
            "pooling_kernel_size": 3,
            "max_soft_tokens": 560,
            "resample": 3,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": False,
            "image_mean": [0, 0, 0],
            "image_std": [1, 1, 1],
        }
    }
    assert ImageProcessor.from_config(pc).budget == 560
    assert ImageProcessor.from_config(None, {"default_output_length": 1120}).budget == 1120
    assert ImageProcessor.from_config().budget == 280
