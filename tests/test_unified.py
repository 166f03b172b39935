"""Gemma 4 12B "unified" against transformers 5.25 on a tiny random checkpoint (docs/unified.md §7).

Text: logits within 1e-4 in float32, greedy identical.  Media: our processors bit
for bit against transformers' image processor and feature extractor; our embedders'
rows against its features; the decoder with its rows against its logits under the
image mask the model was trained with (docs/unified.md §4); the whole path end to end.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

import gemma4_mlx
from gemma4_mlx.checkpoint.files import LoadError
from gemma4_mlx.config import ConfigError, parse_config
from gemma4_mlx.media.prepare import Audio, Image, MediaError, Video, media_prompt, processor_for
from gemma4_mlx.media.rows import MediaRows
from gemma4_mlx.media.unified import FrameConfig, UnifiedImageProcessor
from gemma4_mlx.models.unified import UnifiedAudio, UnifiedVision
from gemma4_mlx.runtime.generate import SamplingOptions, generate_tokens, prefill

from helpers.checkpoints import max_diff, random_ids
from helpers.unified import (
    EOS,
    IMAGE_PROMPT,
    TOKEN_IDS,
    build_hf,
    reference_image_processor,
    trained_mask_logits,
    type_ids,
)

TOL = 1e-4
IMG, AUD = TOKEN_IDS["image_token_id"], TOKEN_IDS["audio_token_id"]
BOI, EOI, BOA, EOA = 10, 11, 15, 16
# sizes at a resize fixed point (the reference resizes with torchvision, which is not
# installed here; docs/unified.md §5.1) for merged patches of 12 px
FIXED = [(84, 108, 70), (36, 264, 70), (60, 324, 140), (12 * 9, 12 * 14, 140)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    hf = build_hf(seed=3)
    path = tmp_path_factory.mktemp("unified")
    hf.save_pretrained(path)
    model, tok = gemma4_mlx.load(path, dtype="float32")
    assert tok is None
    return SimpleNamespace(hf=hf, path=path, model=model)


def text_ids(n, seed):
    return [i if i not in range(10, 17) else 30 for i in random_ids(n, seed=seed, vocab=300)]


def pixels(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def wave(n, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.3).astype(np.float32)


# -- config and loading ----------------------------------------------------------------


def test_config_reads_the_saved_checkpoint(ref):
    raw = json.loads((ref.path / "config.json").read_text())
    cfg = parse_config({**raw, "brand_new_key": 1})
    t = cfg.text
    assert cfg.unified and cfg.eos_ids == EOS
    assert cfg.media_ids["image"] == IMG and cfg.media_ids["eoa"] == EOA
    assert t.use_bidirectional_attention == "vision" and t.hidden_size_per_layer_input == 0
    full = [s for s in t.layers if s.type == "full_attention"]
    assert [(s.head_dim, s.kv_heads, s.k_eq_v) for s in full] == [(24, 1, True)] * 2
    assert isinstance(ref.model.vision, UnifiedVision) and isinstance(ref.model.audio, UnifiedAudio)
    # transformers' unified text defaults apply where the file is silent
    bare = {k: v for k, v in raw["text_config"].items() if k not in ("use_bidirectional_attention", "sliding_window")}
    t2 = parse_config({**raw, "text_config": bare}).text
    assert (t2.use_bidirectional_attention, t2.sliding_window) == ("vision", 1024)
    with pytest.raises(ConfigError, match="gemma4_unified"):
        parse_config({"model_type": "gemma4_unified"})


def test_in_memory_names_load_too(ref, tmp_path):
    """transformers' in-memory names (`embed_vision.patch_ln1`, `embed_vision.multimodal_embedder.*`),
    as a raw `state_dict()` dump has them, map like the hub names (docs/unified.md §3)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in ref.hf.state_dict().items() if k != "lm_head.weight"}
    assert "model.embed_vision.multimodal_embedder.embedding_projection.weight" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((ref.path / "config.json").read_text())
    model, _ = gemma4_mlx.load(tmp_path, dtype="float32")
    ids, img = IMAGE_PROMPT()
    a = media_prompt(model, None, ids, images=[Image(img, 70)])[1]
    b = media_prompt(ref.model, None, ids, images=[Image(img, 70)])[1]
    assert max_diff(model(mx.array([ids]), media=a), ref.model(mx.array([ids]), media=b)) == 0


def test_text_only_load_leaves_embedders_out(ref):
    model, _ = gemma4_mlx.load(ref.path, dtype="float32", text_only=True)
    assert "vision" not in model and "audio" not in model
    ids = text_ids(12, 5)
    assert max_diff(model(mx.array([ids])), ref.model(mx.array([ids]))) == 0


# -- text parity ------------------------------------------------------------------------


def test_text_logits_and_chunked_prefill(ref):
    ids = text_ids(21, 1)
    with torch.no_grad():
        want = ref.hf(input_ids=torch.tensor([ids])).logits.numpy()
    assert np.abs(want).max() > 1.0
    assert max_diff(ref.model(mx.array([ids])), want) < TOL
    cache = ref.model.make_cache()
    got = [np.array(ref.model(mx.array([ids[:7]]), cache)[0])]
    got += [np.array(ref.model(mx.array([[t]]), cache)[0]) for t in ids[7:]]  # decode past the window of 4
    assert max_diff(np.concatenate(got), want[0]) < TOL


def test_text_greedy_identical(ref):
    prompt = text_ids(9, 2)
    with torch.no_grad():
        out = ref.hf.generate(input_ids=torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=[])
    want = out[0, len(prompt) :].tolist()
    got = list(generate_tokens(ref.model, prompt, max_tokens=24, options=SamplingOptions(), prefill_chunk=4))
    assert got == want


# -- processors -------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,budget", FIXED)
def test_image_processor_bit_identical(h, w, budget):
    img = pixels(h, w, seed=h + w)
    want = reference_image_processor(img, budget, patch_size=4)
    got = UnifiedImageProcessor(budget, 4, 3)(img)
    assert got.pixel_values.shape == tuple(want["pixel_values"].shape) == (1, budget, 432)
    assert np.array_equal(got.pixel_values, want["pixel_values"].numpy())
    assert np.array_equal(got.position_ids, want["image_position_ids"].numpy())
    assert got.num_soft_tokens == want["num_soft_tokens_per_image"].tolist()


def test_image_token_counts_match_the_processor():
    from transformers.models.gemma4_unified.processing_gemma4_unified import get_aspect_ratio_preserving_size

    proc = UnifiedImageProcessor(280)
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (17, 4000), (4000, 17), (480, 640), *rng.integers(1, 3000, (40, 2)).tolist()]:
        for budget in (70, 280, 1120):
            th, tw = get_aspect_ratio_preserving_size(h, w, 16, budget * 9, 3)
            assert proc.num_soft_tokens(h, w, budget) == (th // 16) * (tw // 16) // 9, (h, w, budget)


@pytest.mark.parametrize("n", [161, 639, 640, 641, 1283, 16_000, 480_000])
def test_audio_frames_bit_identical(n):
    x = wave(n, seed=n)
    fe = transformers.Gemma4UnifiedAudioFeatureExtractor()
    want = fe(x, return_tensors="np")
    cfg = FrameConfig()
    frames, mask = cfg.frames([x])
    assert np.array_equal(frames, want["input_features"]) and np.array_equal(mask, want["input_features_mask"])
    counter = SimpleNamespace(feature_extractor=fe)
    assert cfg.num_tokens(n) == transformers.Gemma4UnifiedProcessor._compute_audio_num_tokens(counter, x, 16_000)


# -- media through the model ------------------------------------------------------------


def image_case(ref, h=84, w=108, budget=70, seed=0):
    img = pixels(h, w, seed)
    batch = UnifiedImageProcessor(budget, 4, 3)(img)
    n = batch.num_soft_tokens[0]
    ids = [2, 40, 41, BOI] + [IMG] * n + [EOI, 50, 51, 52, 53]
    _, rows = media_prompt(ref.model, None, ids, images=[Image(img, budget)])
    inputs = dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.tensor(batch.pixel_values),
        image_position_ids=torch.tensor(batch.position_ids),
    )
    with torch.no_grad():
        hf_rows = ref.hf.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    return ids, rows, inputs, hf_rows.pooler_output[0].numpy()


def test_image_rows_parity(ref):
    _, rows, _, hf_rows = image_case(ref)
    assert np.abs(hf_rows).max() > 1.0
    assert max_diff(rows.rows, hf_rows) < 2e-5


def test_image_logits_use_the_trained_mask(ref):
    """With transformers' own rows: within 1e-4 of its generate-time (trained) masks, and
    far from its plain forward, which opens image blocks on every layer and past the
    window (docs/unified.md §4)."""
    ids, rows, inputs, hf_rows = image_case(ref)
    rows.rows = mx.array(hf_rows)
    ours = np.array(ref.model(mx.array([ids]), media=rows))
    want = trained_mask_logits(ref.hf, **inputs)
    assert np.abs(want).max() > 1.0
    assert max_diff(ours, want) < TOL
    with torch.no_grad():
        plain = ref.hf(**inputs, mm_token_type_ids=torch.tensor([type_ids(ids)])).logits.numpy()
    assert max_diff(ours, plain) > 0.1


def test_image_end_to_end(ref):
    """Our processor, embedder and decoder.  As in tests/test_multimodal.py, this random
    decoder amplifies float32 rounding of the rows (2e-6 here) ~100x, so 1e-3 end to end;
    the 1e-4 checks are the rows and the decoder with identical rows."""
    ids, rows, inputs, _ = image_case(ref, 60, 324, 140, seed=4)
    assert max_diff(ref.model(mx.array([ids]), media=rows), trained_mask_logits(ref.hf, **inputs)) < 1e-3


def test_audio_parity(ref):
    x = wave(20 * 9 + 3)
    frames, mask = FrameConfig(samples_per_token=20).frames([x])
    ids = [2, 40, BOA] + [AUD] * frames.shape[1] + [EOA, 50, 51]
    _, rows = media_prompt(ref.model, None, ids, audio=[Audio(x)])
    inputs = dict(
        input_ids=torch.tensor([ids]), input_features=torch.tensor(frames), input_features_mask=torch.tensor(mask)
    )
    with torch.no_grad():
        want = ref.hf(**inputs).logits.numpy()
        hf_rows = ref.hf.model.get_audio_features(inputs["input_features"], inputs["input_features_mask"])
    assert max_diff(rows.rows, hf_rows.pooler_output[0].numpy()) < 2e-5
    assert max_diff(ref.model(mx.array([ids]), media=rows), want) < TOL
    assert (rows.block < 0).all()  # audio is never a bidirectional block


def test_chunked_prefill_and_greedy_with_an_image(ref):
    """Chunks of 5 never split the image run; greedy equals transformers under the trained mask."""
    ids, rows, inputs, _ = image_case(ref, 36, 264, 70, seed=2)
    cache = ref.model.make_cache()
    last = np.array(prefill(ref.model, mx.array([ids]), cache, 5, rows))
    assert max_diff(last[0], np.array(ref.model(mx.array([ids]), media=rows))[0, -1]) < TOL
    got = list(generate_tokens(ref.model, ids, max_tokens=6, prefill_chunk=5, media=rows))
    seq = list(ids)
    for _ in range(6):  # the reference, recomputed whole each step (the decode part is causal)
        step = dict(inputs, input_ids=torch.tensor([seq]))
        seq.append(int(np.argmax(trained_mask_logits(ref.hf, **step)[0, -1])))
    assert got == seq[len(ids) :]


def test_video_frames_parity(ref):
    """Two frames, each its own bidirectional block, with transformers' video path
    given our merged frame patches (its video processor needs torchvision: §5.1)."""
    frames = np.stack([pixels(84, 108, seed=s) for s in (5, 6)])
    batch = processor_for(ref.model).video(frames, num_frames=2, source_fps=1.0)
    assert batch.pixel_values.shape == (2, 70, 432) and batch.num_soft_tokens == 63
    per_frame = UnifiedImageProcessor(70, 4, 3, video=True)(list(frames))
    assert np.array_equal(batch.pixel_values, per_frame.pixel_values)
    assert np.array_equal(
        per_frame.pixel_values[0, :63].reshape(-1),
        (frames[0] / np.float32(255)).reshape(7, 12, 9, 12, 3).transpose(0, 2, 1, 3, 4).reshape(-1),
    )
    vid = TOKEN_IDS["video_token_id"]
    ids = [2, 30, BOI] + [vid] * 63 + [EOI, 31, BOI] + [vid] * 63 + [EOI, 50, 51]
    _, rows = media_prompt(ref.model, None, ids, videos=[Video(frames, num_frames=2)])
    assert sorted(set(rows.block.tolist())) == [0, 1]
    inputs = dict(
        input_ids=torch.tensor([ids]),
        pixel_values_videos=torch.tensor(batch.pixel_values, dtype=torch.float64),
        video_position_ids=torch.tensor(batch.position_ids),
        num_frames_per_video=torch.tensor([2]),
    )
    # transformers in float64: its float32 logits are ~6e-5 off on some CPUs (AVX-512
    # kernels round differently), over half of TOL; against float64 the error is ours.
    hf64 = copy.deepcopy(ref.hf).double()
    want = trained_mask_logits(hf64, **inputs)
    with torch.no_grad():
        hf_rows = hf64.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_position_ids"], num_frames_per_video=torch.tensor([2])
        ).pooler_output[0]
    assert max_diff(rows.rows, hf_rows.numpy()) < 2e-5
    rows.rows = mx.array(hf_rows.numpy().astype(np.float32))
    assert max_diff(ref.model(mx.array([ids]), media=rows), want) < TOL


def test_bad_config_is_one_line_error(ref, tmp_path):
    raw = json.loads((ref.path / "config.json").read_text())
    for vision, match in (({"mm_embed_dim": 30}, "output_proj_dims 24 must equal mm_embed_dim 30"),
                          ({"patch_size": "4"}, "patch_size must be int")):  # fmt: skip
        (tmp_path / "config.json").write_text(json.dumps({**raw, "vision_config": {**raw["vision_config"], **vision}}))
        for f in ref.path.glob("*.safetensors"):
            (tmp_path / f.name).unlink(missing_ok=True)
            (tmp_path / f.name).symlink_to(f)
        with pytest.raises(LoadError, match=f"config.json: vision_config: {match}"):
            gemma4_mlx.load(tmp_path)


def test_bad_media_are_one_line_errors(ref):
    strip = pixels(12, 12 * 40)  # one row of merged patches: past the tiny 30-entry position table
    n = UnifiedImageProcessor(70, 4, 3).num_soft_tokens(12, 12 * 40)
    with pytest.raises(MediaError, match=f"patch position {n - 1} outside the position table"):
        media_prompt(ref.model, None, [2, BOI] + [IMG] * n + [EOI], images=[Image(strip, 70)])
    with pytest.raises(MediaError, match="the media need"):
        media_prompt(ref.model, None, [2, BOI, IMG, EOI], images=[Image(pixels(84, 108), 70)])


# -- mutations: each must break parity --------------------------------------------------


def test_mutation_no_image_blocks(ref, monkeypatch):
    ids, rows, inputs, hf_rows = image_case(ref)
    rows.rows = mx.array(hf_rows)
    monkeypatch.setattr(MediaRows, "block_ids", lambda self, n: None)
    assert max_diff(ref.model(mx.array([ids]), media=rows), trained_mask_logits(ref.hf, **inputs)) > 1e-2


def test_mutation_blocks_on_full_layers(ref, monkeypatch):
    import gemma4_mlx.models.text as T

    ids, rows, inputs, hf_rows = image_case(ref)
    rows.rows = mx.array(hf_rows)
    real, blocks = T.build_mask, rows.block_ids(len(ids))
    monkeypatch.setattr(T, "build_mask", lambda o, k, n, w, v: real(o, k, n, w, v).with_blocks(blocks))
    assert max_diff(ref.model(mx.array([ids]), media=rows), trained_mask_logits(ref.hf, **inputs)) > 1e-2


def test_mutation_audio_frame_size():
    x = wave(20 * 9 + 3)
    want = transformers.Gemma4UnifiedAudioFeatureExtractor(feature_size=20, audio_samples_per_token=20)(x)
    frames, _ = FrameConfig(samples_per_token=21).frames([x])
    assert frames.shape != want["input_features"].shape
