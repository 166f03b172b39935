"""Whole-model multimodal parity against transformers 5.24 (docs/multimodal.md §3, §8).

A tiny `Gemma4ForConditionalGeneration` with the union vision tower, an audio
tower and a PLE text model (every weight, norm, layer scalar and clamp bound
random) is saved with `save_pretrained` and loaded by our loader.  One prompt
holds two images and an audio clip; we compare all logits and greedy tokens.
Configs: bidirectional image attention ("vision", 26B/31B style) with a window
shorter and longer than the image blocks, and causal (E2B/E4B style).
"""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gemma4_mlx.cache import build_mask  # noqa: E402
from gemma4_mlx.checkpoint.load import load_model  # noqa: E402
from gemma4_mlx.media.image import ImageProcessor  # noqa: E402
from gemma4_mlx.media.prepare import Audio, Image, MediaError, MediaProcessor  # noqa: E402
from gemma4_mlx.media.rows import MediaRows  # noqa: E402
from gemma4_mlx.runtime.generate import generate_tokens, prefill  # noqa: E402

from helpers.mm_configs import TOKEN_IDS, build_multimodal, text_config  # noqa: E402

TOL = 1e-4


# window 16 < image blocks (60, 64 tokens): clipping matters; 128 > blocks.
# causal_shared: E2B/E4B-style KV sharing (the last two layers read earlier K/V).
CONFIGS = {
    "bidir_w16": (16, "vision", 0),
    "bidir_w128": (128, "vision", 0),
    "causal_w16": (16, None, 0),
    "causal_shared": (16, None, 2),
}


class Case:
    def __init__(self, name, tmp):
        window, bidir, shared = CONFIGS[name]
        self.hf = build_multimodal(text_config(window, bidir, shared), "union")
        self.hf.save_pretrained(tmp)
        self.model, _ = load_model(tmp, dtype="float32")
        self.mp = MediaProcessor(self.model, ImageProcessor(70, patch_size=4))


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def images():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (50, 80, 3), dtype=np.uint8), rng.integers(0, 256, (120, 30, 3), dtype=np.uint8)]


def clip(n=7000):
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * np.random.default_rng(1).standard_normal(n)).astype(np.float32)


def prompt(mp, imgs, wave):
    """ids: text, image 1, text, audio, text, image 2, text (ids remapped below 300)."""
    prepared = [mp.prepare(Image(imgs[0])), mp.prepare(Audio(wave)), mp.prepare(Image(imgs[1]))]
    rng = np.random.default_rng(7)
    text = lambda n: rng.integers(17, 300, n).tolist()  # noqa: E731
    t = TOKEN_IDS
    run = {
        "image": lambda n: [t["boi_token_id"]] + [t["image_token_id"]] * n + [t["eoi_token_id"]],
        "audio": lambda n: [t["boa_token_id"]] + [t["audio_token_id"]] * n + [t["eoa_token_index"]],
    }
    ids = [2] + text(4)
    for p, tail in zip(prepared, (3, 3, 5)):
        ids += run[p.kind](p.counts[0]) + text(tail)
    return ids, prepared


def hf_inputs(ids, imgs, wave):
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    from helpers.mm_configs import hf_image_processor

    px = hf_image_processor(70, 4)(imgs, return_tensors="pt")
    au = Gemma4AudioFeatureExtractor()([wave], return_tensors="pt")
    t = torch.tensor([ids])
    types = torch.zeros_like(t)
    types[t == TOKEN_IDS["image_token_id"]] = 1
    types[t == TOKEN_IDS["audio_token_id"]] = 3
    return dict(
        input_ids=t,
        pixel_values=px["pixel_values"],
        image_position_ids=px["image_position_ids"],
        input_features=au["input_features"],
        input_features_mask=au["input_features_mask"],
        mm_token_type_ids=types,
    )


@pytest.fixture(scope="module")
def inputs(case):
    """ids, our prepared media, transformers' logits, and its soft-token rows in
    prompt order (image 1, audio, image 2)."""
    imgs, wave = images(), clip()
    ids, prepared = prompt(case.mp, imgs, wave)
    inp = hf_inputs(ids, imgs, wave)
    with torch.no_grad():
        ref = case.hf(**inp).logits[0].numpy()
        img = torch.cat(
            list(
                case.hf.model.get_image_features(
                    inp["pixel_values"], inp["image_position_ids"], return_dict=True
                ).pooler_output
            )
        ).numpy()
        a = case.hf.model.get_audio_features(inp["input_features"], inp["input_features_mask"], return_dict=True)
        aud = a.pooler_output[a.attention_mask].numpy()
    n = prepared[0].counts[0]
    return ids, prepared, ref, np.concatenate([img[:n], aud, img[n:]])


def media_rows(case, ids, prepared, hf_rows=None):
    rows = case.mp.prompt(ids, prepared).rows(0)
    if hf_rows is not None:
        rows.rows = mx.array(hf_rows)
    return rows


def ours_logits(case, ids, prepared, hf_rows=None):
    return np.array(case.model(mx.array([ids]), media=media_rows(case, ids, prepared, hf_rows))[0])


def test_prompt_layout(case, inputs):
    ids, prepared, _, _ = inputs
    assert [p.counts for p in prepared] == [[60], [11], [64]]
    mprompt = case.mp.prompt(ids, prepared)
    assert [(n, k) for _, n, k in mprompt.runs] == [(60, 1), (11, 3), (64, 1)]


def test_soft_tokens_parity(case, inputs):
    """Our towers' rows, in prompt order, against transformers' image and audio features."""
    ids, prepared, _, hf_rows = inputs
    ours = np.array(media_rows(case, ids, prepared).rows)
    assert np.abs(hf_rows).max() > 1.0
    assert np.abs(ours - hf_rows).max() < 2e-5


def test_logits_parity(case, inputs):
    """The decoder with media (merge, PLE, image-block masks) given transformers' own
    soft tokens: every position's logits within 1e-4."""
    ids, prepared, ref, hf_rows = inputs
    ours = ours_logits(case, ids, prepared, hf_rows)
    assert np.abs(ref).max() > 1.0
    assert np.abs(ours - ref).max() < TOL


def test_end_to_end_parity(case, inputs):
    """Our towers and decoder end to end.  This tiny random decoder (attention scale
    1.0 with random q/k norms) amplifies input noise ~1000x: rows perturbed by 1e-6
    move its logits by ~1e-3 (measured), so the towers' float32 rounding (rows within
    ~3e-6 of transformers') is bounded at 1e-3 here; the 1e-4 checks are the tower
    test above and the decoder test with identical rows."""
    ids, prepared, ref, _ = inputs
    assert np.abs(ours_logits(case, ids, prepared) - ref).max() < 1e-3


def test_media_change_logits(case, inputs):
    """Different images must give different logits (LM Studio #2265 failure mode)."""
    ids, prepared, ref, _ = inputs
    other = case.mp.prepare(Image(images()[0][::-1].copy()))
    ours = ours_logits(case, ids, [other] + prepared[1:])
    assert np.abs(ours - ref)[-1].max() > 1e-2


def test_chunked_prefill_and_greedy(case, inputs):
    """Prefill in chunks smaller than an image (runs are never split) then decode:
    the same greedy tokens as transformers' generate."""
    ids, prepared, _, _ = inputs
    imgs, wave = images(), clip()
    with torch.no_grad():
        out = case.hf.generate(**hf_inputs(ids, imgs, wave), max_new_tokens=8, do_sample=False)
    want = out[0, len(ids) :].tolist()
    rows = case.mp.prompt(ids, prepared).rows(0)
    got = list(generate_tokens(case.model, ids, max_tokens=8, prefill_chunk=24, media=rows))
    assert got == want
    cache = case.model.make_cache()
    last = np.array(prefill(case.model, mx.array([ids]), cache, 24, rows))
    whole = ours_logits(case, ids, prepared)[-1]
    assert np.abs(last[0] - whole).max() < TOL


def test_mutation_no_blocks_breaks_bidirectional(case, inputs, monkeypatch):
    ids, prepared, ref, hf_rows = inputs
    monkeypatch.setattr(MediaRows, "block_ids", lambda self, n: None)
    err = np.abs(ours_logits(case, ids, prepared, hf_rows) - ref).max()
    if case.model.config.use_bidirectional_attention == "vision":
        assert err > 1e-2
    else:
        assert err < TOL  # causal models never use the blocks


def test_mutation_blocks_on_full_layers(case, inputs, monkeypatch):
    """mlx-vlm's mistake: the block overlay on full-attention layers too."""
    if case.model.config.use_bidirectional_attention != "vision":
        pytest.skip("causal model")
    ids, prepared, ref, hf_rows = inputs
    import gemma4_mlx.models.text as T

    real = T.build_mask
    rows = media_rows(case, ids, prepared, hf_rows)
    blocks = rows.block_ids(len(ids))
    monkeypatch.setattr(T, "build_mask", lambda o, k, n, w, v: real(o, k, n, w, v).with_blocks(blocks))
    err = np.abs(np.array(case.model(mx.array([ids]), media=rows)[0]) - ref).max()
    assert err > 1e-2


def test_mutation_scaled_soft_tokens(case, inputs):
    ids, prepared, ref, hf_rows = inputs
    rows = media_rows(case, ids, prepared, hf_rows)
    rows.rows = rows.rows * 8.0  # sqrt(64): the text embedding scale
    err = np.abs(np.array(case.model(mx.array([ids]), media=rows)[0]) - ref).max()
    assert err > 1e-2


def test_mutation_ple_ids_and_context(case, inputs, monkeypatch):
    """PLE at placeholders: token part from the pad id, context part from the merged
    soft tokens.  Using the placeholder ids, or the pad embedding as context, is caught."""
    ids, prepared, ref, hf_rows = inputs
    tm = type(case.model.model)
    real = tm.merge_media
    monkeypatch.setattr(tm, "merge_media", lambda self, i, m: (i, real(self, i, m)[1]))
    monkeypatch.setattr(tm, "without_placeholders", lambda self, i: i)
    assert np.abs(ours_logits(case, ids, prepared, hf_rows) - ref).max() > 1e-2
    monkeypatch.undo()
    real_ple = tm.per_layer_inputs
    monkeypatch.setattr(tm, "per_layer_inputs", lambda self, i, x: real_ple(self, i, self.embed(i)))
    assert np.abs(ours_logits(case, ids, prepared, hf_rows) - ref).max() > 1e-2


def test_mask_with_blocks_brute_force():
    """Mask.with_blocks against the reference rule on a chunk after cached keys."""
    W, offset, T = 5, 7, 12
    blocks = np.array([-1, 0, 0, 0, 0, 0, 0, 0, -1, 1, 1, -1])  # block 0 longer than W
    m = build_mask(offset, offset - (W - 1), T, W, None).with_blocks(blocks)
    got = np.array(m.array[0, 0])
    for qi in range(T):
        for kj in range(got.shape[1]):
            q, k = offset + qi, offset - (W - 1) + kj
            bk = blocks[k - offset] if k >= offset else -1
            same = blocks[qi] >= 0 and blocks[qi] == bk
            assert got[qi, kj] == ((q - k < W) and (k <= q or same)), (qi, kj)
    first = W - 1  # key index of the chunk's first query
    assert m.key_range(0, 1) == (0, first + 1)  # query 0 is in no block
    assert m.key_range(1, 2) == (1, first + 8)  # block 0 runs to query 7; window from key 1
    assert m.key_range(9, 10)[1] == first + 11 and m.last(3).key_range(0, 1)[1] == first + 11


def test_media_rows_cut_never_splits_runs():
    rows = MediaRows.from_runs([(3, 5, 1), (10, 4, 3), (20, 2, 1)], mx.zeros((11, 4)))
    assert rows.cut(0, 5) == 3  # inside the first run: back to its start
    assert rows.cut(3, 5) == 8  # the run starts the chunk: past its end
    assert rows.cut(0, 8) == 8 and rows.cut(0, 9) == 9  # at a boundary / in text
    w = rows.window(4, 12)
    assert w.index.tolist() == [0, 1, 2, 3, 6, 7] and w.rows.shape[0] == 6


def test_errors(case):
    mp = case.mp
    with pytest.raises(MediaError, match="1 image placeholders but 2 image"):
        mp.expand("<|image|> hi", [mp.prepare(Image(images()[0]))] * 2)
    with pytest.raises(MediaError, match="media runs"):
        mp.prompt([2, 5, 6], [mp.prepare(Image(images()[0]))])
    with pytest.raises(MediaError, match="budget"):
        mp.prepare(Image(images()[0], budget=100))
    with pytest.raises(MediaError, match="too short|empty"):
        mp.prepare(Audio(np.zeros(0, np.float32)))
    text_only = MediaProcessor(load_model(case_path(case), dtype="float32", text_only=True)[0])
    with pytest.raises(MediaError, match="no vision tower"):
        text_only.prepare(Image(images()[0]))


def case_path(case):
    return case.model.folder


def test_video_parity(case):
    """A 3-frame video: frames are separate bidirectional blocks ("mm:ss" text and
    image markers between them); transformers' video path gives the same logits."""
    from gemma4_mlx.media.prepare import Video
    from gemma4_mlx.media.video import VideoProcessor

    frames = np.random.default_rng(9).integers(0, 256, (6, 50, 80, 3), dtype=np.uint8)
    case.mp.video = VideoProcessor(70, num_frames=3, patch_size=4)
    p = case.mp.prepare(Video(frames))
    assert p.counts == [60, 60, 60]
    t = TOKEN_IDS
    ids = [2, 40, 41]
    for n in p.counts:  # timestamps as plain text ids: only the block structure matters here
        ids += [50, 51, t["boi_token_id"]] + [t["video_token_id"]] * n + [t["eoi_token_id"]]
    ids += [42, 43, 44]
    batch = case.mp.video(frames, num_frames=3)
    tt = torch.tensor([ids])
    types = (tt == t["video_token_id"]).long() * 2
    with torch.no_grad():
        ref = (
            case.hf(
                input_ids=tt,
                pixel_values_videos=torch.tensor(batch.pixel_values),
                video_position_ids=torch.tensor(batch.position_ids),
                num_frames_per_video=torch.tensor([3]),
                mm_token_type_ids=types,
            )
            .logits[0]
            .numpy()
        )
        feats = case.hf.model.get_video_features(
            torch.tensor(batch.pixel_values),
            torch.tensor(batch.position_ids),
            num_frames_per_video=torch.tensor([3]),
            return_dict=True,
        )
        hf_rows = torch.cat(list(feats.pooler_output)).numpy()
    mprompt = case.mp.prompt(ids, [p])
    assert [k for _, _, k in mprompt.runs] == [2, 2, 2]
    rows = mprompt.rows(0)
    assert len(set(rows.block.tolist())) == 3  # one block per frame
    assert np.abs(np.array(rows.rows) - hf_rows).max() < 2e-5
    ours_e2e = np.array(case.model(mx.array([ids]), media=rows)[0])
    rows.rows = mx.array(hf_rows)
    ours = np.array(case.model(mx.array([ids]), media=rows)[0])
    assert np.abs(ours - ref).max() < TOL
    assert np.abs(ours_e2e - ref).max() < 1e-3


SMALL = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=16,
    num_attention_heads=12,
    num_key_value_heads=12,
    head_dim=64,
    use_clipped_linears=True,
)
LARGE = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=72,
    standardize=True,
)


@pytest.mark.parametrize("name,kw,count", [("small", SMALL, 167_364_608), ("large", LARGE, 569_548_080)])
def test_real_size_vision_tower_parameters(name, kw, count):
    """Real-shape towers built lazily (nothing allocated) against transformers on the
    meta device (docs/multimodal.md §1: 167.36 M / 569.55 M); the large tower's std_bias/std_scale
    are buffers there and parameters here."""
    from mlx.utils import tree_flatten

    from gemma4_mlx.config import VisionConfig
    from gemma4_mlx.models.layers import CLAMPS
    from gemma4_mlx.models.vision import VisionTower

    with torch.device("meta"):
        hf = transformers.models.gemma4.modeling_gemma4.Gemma4VisionModel(transformers.Gemma4VisionConfig(**kw))
    assert sum(p.numel() for p in hf.parameters()) == count
    ours = sum(
        v.size
        for k, v in tree_flatten(VisionTower(VisionConfig(**kw)).parameters())
        if not k.endswith(CLAMPS + ("std_bias", "std_scale"))
    )
    assert ours == count


def test_real_size_audio_tower_parameters():
    from mlx.utils import tree_flatten

    from gemma4_mlx.config import AudioConfig
    from gemma4_mlx.models.audio import AudioEncoder
    from gemma4_mlx.models.layers import CLAMPS

    with torch.device("meta"):
        hf = transformers.models.gemma4.modeling_gemma4.Gemma4AudioModel(transformers.Gemma4AudioConfig())
    n = sum(p.numel() for p in hf.parameters())
    assert n == 304_824_608  # docs/multimodal.md §1: 304.82 M
    assert sum(v.size for k, v in tree_flatten(AudioEncoder(AudioConfig()).parameters()) if not k.endswith(CLAMPS)) == n
