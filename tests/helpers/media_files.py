"""Small media files written on the fly with PyAV for the tests."""

from __future__ import annotations

import av
import numpy as np

LEVEL = 6  # grey level step per frame: 40 frames stay below 255


def write_video(path, n=40, rate=10, h=64, w=80, frames=None, audio=False, faststart=False):
    """n solid frames (level 6*i) or the given uint8 frames, lossless-ish H.264; optional AAC track."""
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=rate, options={"qp": "0"})
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if audio:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
            t = np.arange(int(16000 * n / rate)) / 16000
            fr = av.AudioFrame.from_ndarray(
                (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], format="fltp", layout="mono"
            )
            fr.sample_rate, fr.pts = 16000, 0
            for p in [*a.encode(fr), *a.encode()]:
                c.mux(p)
        for i in range(n):
            img = frames[i] if frames is not None else np.full((h, w, 3), LEVEL * i % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path
