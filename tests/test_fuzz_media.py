"""Truncated and bit-flipped media files (docs/hardening.md §4): image, audio (WAV,
FLAC, through PyAV) and video readers end in one ValueError line naming the file (the
media layer's `MediaError` wraps exactly these), in bounded time and memory."""

from __future__ import annotations

import io
import resource
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from gemma4_mlx.media.audio import read_audio
from gemma4_mlx.media.image import load_image
from gemma4_mlx.media.video import read_video, read_video_audio

from helpers.fuzz import fuzz_settings, one_line
from helpers.media_files import write_video


def _png() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3)).save(b, "PNG")
    return b.getvalue()


def _jpeg() -> bytes:
    b = io.BytesIO()
    Image.fromarray(np.arange(48 * 40 * 3, dtype=np.uint8).reshape(48, 40, 3)).save(b, "JPEG")
    return b.getvalue()


def _wav() -> bytes:
    pcm = (np.sin(np.arange(4000) / 7) * 20000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _flac(tmp) -> bytes:
    import av

    path = tmp / "a.flac"
    with av.open(str(path), "w") as c:
        s = c.add_stream("flac", rate=16000)
        s.layout = "mono"
        fr = av.AudioFrame.from_ndarray(
            (np.sin(np.arange(4000) / 7) * 20000).astype(np.int16)[None], format="s16", layout="mono"
        )
        fr.sample_rate, fr.pts = 16000, 0
        for p in [*s.encode(fr), *s.encode()]:
            c.mux(p)
    return path.read_bytes()


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("media")
    video = write_video(tmp / "v.mp4", n=12, h=32, w=48, audio=True).read_bytes()
    return {"png": _png(), "jpg": _jpeg(), "wav": _wav(), "flac": _flac(tmp), "mp4": video}


READERS = {
    "png": load_image,
    "jpg": load_image,
    "wav": read_audio,
    "flac": read_audio,
    "mp4": lambda p: (read_video(p, num_frames=4), read_video_audio(p)),
}


@st.composite
def damaged(draw, raw: bytes) -> bytes:
    out = bytearray(raw)
    for _ in range(draw(st.integers(0, 6))):  # bit flips, anywhere
        pos = draw(st.integers(0, len(out) - 1))
        out[pos] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):  # truncated
        del out[draw(st.integers(0, len(out) - 1)) :]
    return bytes(out)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("kind", list(READERS))
def test_valid_samples_read(samples, tmp_path, kind):
    f = tmp_path / f"ok.{kind}"
    f.write_bytes(samples[kind])
    READERS[kind](f)


@pytest.mark.parametrize("kind", list(READERS))
@given(data=st.data())
@fuzz_settings(25)
def test_fuzz_media(samples, tmp_path_factory, kind, data):
    raw = data.draw(damaged(samples[kind]), label="damaged file")
    f = tmp_path_factory.mktemp("m") / f"x.{kind}"
    f.write_bytes(raw)
    rss, t0 = _rss(), time.perf_counter()
    try:
        READERS[kind](f)
    except ValueError as e:
        assert one_line(str(e)) and str(f) in str(e), str(e)
    assert time.perf_counter() - t0 < 5
    assert _rss() - rss < 256 * 2**20


def test_a_decompression_bomb_header_is_refused_before_decoding(tmp_path):
    """A PNG whose header claims 12000 x 12000 pixels (144 M: between PIL's warning
    and error limits, ~430 MB decoded) is refused from its header alone."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", 12000, 12000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path = tmp_path / "bomb.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="pixel limit"):
        load_image(path)
