"""Video input (docs/multimodal.md §5) against transformers 5.24.

Test videos are written on the fly with PyAV (libx264 at qp 0: frame i is a solid grey
level 6*i, decoded back within +-2, so the picked frames can be identified).

- sampling: our indices equal `default_sample_indices_fn` (what `Gemma4VideoProcessor.
  sample_frames` calls) over many (total, source fps, num_frames, fps) cases, errors included;
- decoding: frames, indices and metadata equal transformers' own PyAV loader;
- pixels: equal `Gemma4VideoProcessor` itself, which needs torchvision (absent here): it is
  loaded with torchvision's `normalize` stubbed by its documented arithmetic and `resize`
  forbidden, so only frames already at a resize fixed point go through it (and already
  RGB: `do_convert_rgb=False` skips torchvision's grayscale_to_rgb); frames that
  need a resize are compared with the PIL image processor (`Gemma4ImageProcessorPil`) at
  the video budget (the torchvision resize differs slightly: docs/multimodal.md §10.1);
- prompt text: equals `Gemma4Processor.replace_video_token` on the same metadata;
- bad input: one-line `VideoError` naming the file.
"""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import importlib.util
import logging
import sys
import types

import numpy as np
import pytest
from PIL import Image

from gemma4_mlx.media import video as V

av = pytest.importorskip("av")

from helpers.media_files import LEVEL, write_video  # noqa: E402


def levels(frames) -> np.ndarray:
    return np.round(np.asarray(frames, np.float64).mean(axis=(1, 2, 3)) / LEVEL).astype(int)


def noise_frames(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# -- the reference ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn, load_video

    return types.SimpleNamespace(
        Processor=Gemma4Processor, Metadata=VideoMetadata, sample=default_sample_indices_fn, load_video=load_video
    )


@pytest.fixture(scope="module")
def hf_video_processor():
    """transformers' Gemma4VideoProcessor class, runnable without torchvision (see module doc)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import transformers.image_processing_backends as backends
    import transformers.models.gemma4 as pkg

    def normalize(x, mean, std, inplace=False):  # torchvision: (x - mean) / std per channel, in x's dtype
        m, s = (torch.as_tensor(v, dtype=x.dtype).view(-1, 1, 1) for v in (mean, std))
        return (x - m) / s

    def resize(*args, **kwargs):
        raise AssertionError("the reference would resize: use frames at a resize fixed point")

    patched = "tvF" not in vars(backends)
    if patched:
        backends.tvF = types.SimpleNamespace(normalize=normalize)
    name = "transformers.models.gemma4._video_processing_reference"
    try:
        spec = importlib.util.spec_from_file_location(name, pkg.__path__[0] + "/video_processing_gemma4.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # transformers' docstring decorator looks the class's module up
        mod.tvF = types.SimpleNamespace(InterpolationMode=int, resize=resize)
        spec.loader.exec_module(mod)
        error = None
    except Exception as e:  # a transformers version this shim does not fit
        error = e
    if error is None:
        yield mod.Gemma4VideoProcessor
    sys.modules.pop(name, None)
    if patched:
        del backends.tvF
    if error is not None:
        pytest.skip(f"cannot load Gemma4VideoProcessor without torchvision: {error}")


def replacement(hf, metadata, tokens):
    stub = types.SimpleNamespace(boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>")
    return hf.Processor.replace_video_token(
        stub, {"num_soft_tokens_per_video": [tokens], "video_metadata": [metadata]}, 0
    )


def assert_same_as_hf(ours: V.VideoBatch, ref) -> None:
    assert ours.pixel_values.dtype == ref["pixel_values_videos"].dtype == np.float32
    assert np.array_equal(ours.pixel_values, ref["pixel_values_videos"])
    assert np.array_equal(ours.position_ids, ref["video_position_ids"])
    assert list(ref["num_soft_tokens_per_video"]) == [ours.num_soft_tokens]
    assert list(ref["num_frames_per_video"]) == [ours.num_frames]


# -- sampling and timestamps ------------------------------------------------------------


def test_sample_indices_match_reference(hf):
    cases = 0
    for total in (1, 2, 5, 31, 32, 33, 40, 100, 299, 300, 1439, 1800):
        for src in (1.0, 10.0, 24.0, 30000 / 1001, 60.0):
            for num_frames, fps in [
                (None, None),
                (1, None),
                (7, None),
                (32, None),
                (64, None),
                (None, 0.5),
                (None, 1),
                (None, 2.0),
                (None, 3.3),
                (None, 100.0),
            ]:
                meta = hf.Metadata(total_num_frames=total, fps=src)
                try:  # the processor's default num_frames is 32
                    want = hf.sample(meta, num_frames=32 if num_frames is fps is None else num_frames, fps=fps)
                except ValueError:
                    with pytest.raises(V.VideoError, match="has .* frames but"):
                        V.sample_indices(total, num_frames, fps, src)
                    continue
                got = V.sample_indices(total, num_frames, fps, src)
                assert got.tolist() == want.tolist(), (total, src, num_frames, fps)
                cases += 1
    assert cases > 300


def test_sample_indices_errors():
    with pytest.raises(V.VideoError, match="mutually exclusive"):
        V.sample_indices(100, 8, 1.0, 10.0)
    with pytest.raises(V.VideoError, match="needs the video's own frame rate"):
        V.sample_indices(100, None, 1.0, None)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(V.VideoError, match="num_frames must be"):
            V.sample_indices(100, bad)
    for bad in (0, -1.0, float("nan"), "2"):
        with pytest.raises(V.VideoError, match="fps must be"):
            V.sample_indices(100, None, bad, 10.0)
    with pytest.raises(V.VideoError, match="no video frames"):
        V.sample_indices(0, 1)
    assert V.sample_indices(30, None, 0.01, 10.0).tolist() == [0]  # at least one frame


def test_timestamps_and_prompt_match_reference(hf):
    for total, src, n in [
        (40, 10.0, 32),
        (1800, 30.0, 32),
        (1439, 24.0, 7),
        (7200, 1.0, 5),
        (900, 30000 / 1001, 32),
        (5, 0.4, 5),
    ]:
        idx = V.sample_indices(total, n)
        meta = hf.Metadata(total_num_frames=total, fps=src, frames_indices=idx)
        stamps = V.frame_timestamps(idx, src)
        assert all(len(s) >= 5 and s[2] == ":" for s in stamps)
        for tokens in (1, 66, 70):
            assert V.video_prompt_text(stamps, tokens) == replacement(hf, meta, tokens)
    assert V.frame_timestamps([0, 59, 60, 3599, 3600, 7199], 1.0) == [
        "00:00",
        "00:59",
        "01:00",
        "59:59",
        "60:00",
        "119:59",
    ]
    assert V.format_timestamp(61.999) == "01:01"  # truncated, not rounded


def test_prompt_text_format():
    assert (
        V.video_prompt_text(["00:00", "00:02"], 2)
        == "00:00 <|image><|video|><|video|><image|> 00:02 <|image><|video|><|video|><image|>"
    )
    assert V.video_prompt_text(["00:01"], 1, boi="<b>", video_token="<v>", eoi="<e>") == "00:01 <b><v><e>"


# -- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["mp4", "mkv"])  # Matroska stores no frame count: counted by demuxing
def test_read_video_picks_frames(tmp_path, ext):
    path = write_video(tmp_path / f"clip.{ext}")
    v = V.read_video(path)
    assert (v.total_frames, v.fps, v.duration, v.path) == (40, 10.0, 4.0, str(path))
    assert v.frames.shape == (32, 64, 80, 3) and v.frames.dtype == np.uint8
    assert v.indices.tolist() == [i * 40 // 32 for i in range(32)]
    assert np.array_equal(levels(v.frames), v.indices)
    assert np.abs(v.frames.astype(int) - LEVEL * v.indices[:, None, None, None]).max() <= 2
    v2 = V.read_video(path, fps=2)
    assert v2.indices.tolist() == [0, 5, 10, 15, 20, 25, 30, 35] and np.array_equal(levels(v2.frames), v2.indices)
    assert v2.timestamps == ["00:00", "00:00", "00:01", "00:01", "00:02", "00:02", "00:03", "00:03"]
    v3 = V.read_video(path, num_frames=1)
    assert v3.indices.tolist() == [0] and levels(v3.frames).tolist() == [0]


def test_read_video_matches_transformers_loader(hf, tmp_path):
    path = write_video(tmp_path / "clip.mp4", n=30, rate=15)
    for kw in ({"num_frames": 8}, {"fps": 4}, {"num_frames": 30}):
        frames, meta = hf.load_video(str(path), backend="pyav", **kw)
        ours = V.read_video(path, **kw)
        assert np.array_equal(ours.frames, frames)
        assert ours.indices.tolist() == list(meta.frames_indices)
        assert (ours.fps, ours.total_frames, ours.duration) == (meta.fps, meta.total_num_frames, meta.duration)


# -- pixels ------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [70, 140])
def test_processor_matches_hf_image_processor(tmp_path, budget):
    transformers = pytest.importorskip("transformers")
    path = write_video(tmp_path / "clip.mp4", frames=noise_frames(40, 64, 80))
    ours = V.VideoProcessor(video_budget=budget)(path, num_frames=6)
    frames = V.read_video(path, num_frames=6).frames
    ref = transformers.Gemma4ImageProcessorPil(max_soft_tokens=budget)([Image.fromarray(f) for f in frames])
    assert np.array_equal(ours.pixel_values, ref["pixel_values"])
    assert np.array_equal(ours.position_ids, ref["image_position_ids"])
    assert list(ref["num_soft_tokens_per_image"]) == [ours.num_soft_tokens] * 6
    assert ours.pixel_values.shape == (6, 9 * budget, 768) and ours.budget == budget
    assert ours.size == ((336, 432) if budget == 70 else (480, 624))


def test_processor_matches_hf_video_processor(hf, hf_video_processor):
    clip = noise_frames(40, 336, 432)  # 336x432 is a resize fixed point at budget 70
    ref = hf_video_processor()(
        clip,
        video_metadata=hf.Metadata(total_num_frames=40, fps=10.0),
        return_metadata=True,
        return_tensors="np",
        do_convert_rgb=False,
    )
    ours = V.VideoProcessor()(clip, source_fps=10.0)
    assert ours.indices.tolist() == list(ref["video_metadata"][0].frames_indices)
    assert_same_as_hf(ours, ref)
    assert ours.num_soft_tokens == 63
    assert ours.prompt_text() == replacement(hf, ref["video_metadata"][0], ref["num_soft_tokens_per_video"][0])
    # fps sampling: the reference only applies fps when the processor's num_frames is None
    ref = hf_video_processor(num_frames=None)(
        clip,
        video_metadata=hf.Metadata(total_num_frames=40, fps=10.0),
        fps=2,
        return_metadata=True,
        return_tensors="np",
        do_convert_rgb=False,
    )
    ours = V.VideoProcessor()(clip, fps=2, source_fps=10.0)
    assert ours.indices.tolist() == list(ref["video_metadata"][0].frames_indices) == [0, 5, 10, 15, 20, 25, 30, 35]
    assert_same_as_hf(ours, ref)


def test_file_pipeline_matches_hf(hf, hf_video_processor, tmp_path):
    """File -> frames -> inputs -> prompt, against transformers' PyAV loader + video processor."""
    path = write_video(tmp_path / "big.mp4", n=12, rate=6, h=480, w=624, frames=noise_frames(12, 480, 624))
    frames, meta = hf.load_video(str(path), backend="pyav", num_frames=5)
    ref = hf_video_processor()(
        frames,
        video_metadata=meta,
        do_sample_frames=False,
        max_soft_tokens=140,
        return_metadata=True,
        return_tensors="np",
        do_convert_rgb=False,
    )
    ours = V.VideoProcessor(num_frames=5)(path, video_budget=140)
    assert_same_as_hf(ours, ref)
    assert ours.num_soft_tokens == 130 and ours.timestamps == ["00:00", "00:00", "00:00", "00:01", "00:01"]
    assert ours.prompt_text() == replacement(hf, ref["video_metadata"][0], 130)


def test_array_input_and_budgets(caplog):
    clip = noise_frames(50, 48, 96, seed=3)
    with caplog.at_level(logging.WARNING, logger=V.__name__):
        b = V.VideoProcessor()(clip, num_frames=5)
    assert "assuming 24 fps" in caplog.text  # as transformers, for timestamps only
    assert b.indices.tolist() == [0, 10, 20, 30, 40] and b.timestamps == ["00:00", "00:00", "00:00", "00:01", "00:01"]
    with pytest.raises(V.VideoError, match="needs the video's own frame rate"):
        V.VideoProcessor()(clip, fps=1)
    for budget in (70, 280, 1120):
        out = V.VideoProcessor(num_frames=2)(clip[:4], video_budget=budget, source_fps=2.0)
        assert out.pixel_values.shape == (2, 9 * budget, 768) and out.num_soft_tokens <= budget
    with pytest.raises(ValueError, match="video_budget must be one of"):
        V.VideoProcessor(video_budget=100)
    with pytest.raises(ValueError, match="video_budget must be one of"):
        V.VideoProcessor()(clip, video_budget=64)
    with pytest.raises(V.VideoError, match="uint8"):
        V.VideoProcessor()(clip.astype(np.float32))
    with pytest.raises(V.VideoError, match="at most 60 s"):
        V.VideoProcessor()(np.zeros((61, 8, 8, 3), np.uint8), source_fps=1.0)


def test_from_config():
    vp = V.VideoProcessor.from_config(
        {
            "video_processor": {
                "max_soft_tokens": 140,
                "num_frames": 16,
                "patch_size": 16,
                "pooling_kernel_size": 3,
                "do_normalize": True,
                "image_mean": [0.0] * 3,
                "image_std": [1.0] * 3,
            }
        }
    )
    assert (vp.budget, vp.num_frames) == (140, 16)
    assert (V.VideoProcessor.from_config({}).budget, V.VideoProcessor.from_config(None).num_frames) == (70, 32)


def test_soundtrack(tmp_path):
    path = write_video(tmp_path / "av.mp4", n=20, rate=10, audio=True)
    x = V.read_video_audio(path)
    assert x.dtype == np.float32 and abs(len(x) - 32000) <= 1024  # 2 s; AAC pads its last frame
    t = np.arange(16000) / 16000
    assert np.corrcoef(x[:16000], 0.3 * np.sin(2 * np.pi * 440 * t))[0, 1] > 0.99
    assert V.read_video_audio(write_video(tmp_path / "mute.mp4", n=5)) is None
    assert len(V.read_video(path, num_frames=4).frames) == 4  # the audio track does not disturb the video


# -- bad input ---------------------------------------------------------------------------


def test_bad_files(tmp_path):
    good = write_video(tmp_path / "good.mp4").read_bytes()  # index (moov) at the end
    fast = write_video(tmp_path / "fast.mp4", faststart=True).read_bytes()  # index first: damage hits decoding
    (tmp_path / "notes.mp4").write_text("just some text, not a video\n" * 20)
    (tmp_path / "cut.mp4").write_bytes(good[: len(good) // 2])
    (tmp_path / "cut_fast.mp4").write_bytes(fast[: len(fast) * 2 // 3])
    (tmp_path / "empty.mp4").write_bytes(b"")
    write_video(tmp_path / "long.mp4", n=61, rate=1, h=16, w=16)
    for name, video_stream in (("noframes.mkv", True), ("sound.m4a", False)):
        with av.open(str(tmp_path / name), "w") as c:  # sound only; in noframes.mkv a frameless video stream
            if video_stream:
                s = c.add_stream("mpeg4", rate=10)
                s.width, s.height, s.pix_fmt = 16, 16, "yuv420p"
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 4096), np.float32), format="fltp", layout="mono")
            fr.sample_rate = 16000
            for p in [*a.encode(fr), *a.encode()]:
                c.mux(p)
    cases = {
        "missing.mp4": "file not found",
        "notes.mp4": "cannot read video",
        "cut.mp4": "cannot read video",
        "cut_fast.mp4": "truncated or corrupt video",
        "empty.mp4": "cannot read video",
        "long.mp4": r"61\.0 s long .* at most 60 s",
        "noframes.mkv": "no video frames",
        "sound.m4a": "no video stream",
    }
    for name, msg in cases.items():
        with pytest.raises(V.VideoError, match=msg) as e:
            V.read_video(tmp_path / name, num_frames=8)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(V.VideoError, match="has 40 frames but num_frames=41"):
        V.read_video(tmp_path / "good.mp4", num_frames=41)
    with pytest.raises(V.VideoError, match="fps=20 gives 80 frames"):
        V.read_video(tmp_path / "good.mp4", fps=20)
    assert V.read_video(tmp_path / "long.mp4", num_frames=2, max_seconds=61).indices.tolist() == [0, 30]
    with pytest.raises(V.VideoError, match="notes.mp4: cannot read the soundtrack"):
        V.read_video_audio(tmp_path / "notes.mp4")


def test_without_pyav(tmp_path, monkeypatch):
    from gemma4_mlx.media import decode

    def missing():
        raise decode.MissingPyAV("decoding it needs PyAV (`pip install av`)")

    monkeypatch.setattr(decode, "import_av", missing)
    path = write_video(tmp_path / "clip.mp4", n=2)
    with pytest.raises(V.VideoError, match=r"clip.mp4: cannot read video \(decoding it needs PyAV"):
        V.read_video(path)
    with pytest.raises(V.VideoError, match="file not found"):
        V.read_video(tmp_path / "missing.mp4")


def test_frames_too_large_to_hold_or_decode_are_refused_from_the_header(tmp_path, monkeypatch):
    """A 52 KB file of black 4096x4096 frames held 1.5 GiB of sampled frames; the bounds
    are checked before decoding (here scaled down to a small file's frames)."""
    write_video(tmp_path / "v.mp4", n=40, h=64, w=80)
    assert len(V.read_video(tmp_path / "v.mp4", num_frames=8).frames) == 8
    monkeypatch.setattr(V, "MAX_KEPT_BYTES", 8 * 64 * 80 * 3 - 1)
    with pytest.raises(V.VideoError, match=r"v.mp4: 8 sampled frames of 80x64 \(out of 36 to decode\) is more"):
        V.read_video(tmp_path / "v.mp4", num_frames=8)
    assert len(V.read_video(tmp_path / "v.mp4", num_frames=7).frames) == 7
    monkeypatch.setattr(V, "MAX_DECODED_PIXELS", 30 * 64 * 80)
    with pytest.raises(V.VideoError, match=r"out of 35 to decode\) is more than this reader holds"):
        V.read_video(tmp_path / "v.mp4", num_frames=7)
