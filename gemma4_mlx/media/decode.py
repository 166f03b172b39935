"""PyAV helpers shared by the audio and video loaders.

PyAV (`pip install av`, bundles FFmpeg) is optional and imported lazily: WAV files
and arrays never need it.  Every failure inside PyAV/FFmpeg comes out as a
`DecodeError` whose message is one line *without* the file name; the callers add
the name and raise their own `AudioError` / `VideoError`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np


class DecodeError(ValueError):
    """A one-line reason why a media file could not be decoded (no file name)."""


class MissingPyAV(DecodeError):
    """PyAV is not installed."""


def import_av():
    try:
        import av
    except ImportError:
        raise MissingPyAV("decoding it needs PyAV (`pip install av`)") from None
    return av


def reason(e: BaseException) -> str:
    """One line for an exception; FFmpeg's errno and file name are dropped (callers name the file)."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text).splitlines()[0]


@contextlib.contextmanager
def open_container(path: str):
    """av.open(path) for reading, with open failures as DecodeError."""
    if not os.path.isfile(path):
        raise DecodeError("file not found")
    av = import_av()
    try:
        container = av.open(path, "r")
    except Exception as e:  # FFmpeg raises InvalidDataError, EOFError, OSError, ... for bad files
        raise DecodeError(reason(e)) from None
    try:
        yield container
    finally:
        container.close()


# Sampling rates taken from a file's header.  Audio is resampled to 16 kHz with work
# and memory in proportion to the rate ratio, and the rate comes from the (untrusted)
# file: a 244-byte WAV declaring 1 Hz took 25 s to resample, a 15 KB FLAC at 655 kHz
# 1.5 GB.  Real recordings lie within these bounds (8 kHz telephony .. 384 kHz studio).
AUDIO_RATES = (1_000, 384_000)


def check_rate(rate) -> None:
    """DecodeError unless `rate` (Hz) is in AUDIO_RATES."""
    lo, hi = AUDIO_RATES
    if not lo <= rate <= hi:
        raise DecodeError(f"sampling rate {rate} Hz is outside the {lo}..{hi} Hz this reader takes")


# FFmpeg sample formats -> how to map the stored integers onto [-1, 1], as the WAV reader does
_INT_SCALE = {"u8": 128.0, "s16": 2.0**15, "s32": 2.0**31, "s64": 2.0**63}


def frame_to_mono(frame) -> np.ndarray:
    """One decoded audio frame -> mono float32, channels averaged (the WAV path's downmix)."""
    a = frame.to_ndarray()
    fmt = frame.format.name.rstrip("p")  # planar and packed hold the same sample type
    channels = frame.layout.nb_channels or 1
    if not frame.format.is_planar:
        a = a.reshape(-1, channels).T  # packed: interleaved samples in one row
    x = a.astype(np.float64)
    if fmt == "u8":
        x = (x - 128.0) / 128.0
    elif fmt in _INT_SCALE:
        x = x / _INT_SCALE[fmt]
    elif fmt not in ("flt", "dbl"):
        raise DecodeError(f"unsupported sample format {frame.format.name}")
    return x.mean(axis=0).astype(np.float32)


@dataclass
class DecodedAudio:
    samples: np.ndarray  # mono float32 at `rate`
    rate: int
    too_long: float | None = None  # seconds (from the header when known) if decoding stopped at the cap


def decode_audio(path: str, max_seconds: float | None = None) -> DecodedAudio | None:
    """The first audio stream of any FFmpeg-readable file (FLAC, MP3, M4A/AAC, Ogg/Opus,
    the soundtrack of a video) as mono float32 at its own rate; None if it has no audio stream.

    With `max_seconds`, decoding stops one second past it (so a two-hour file is never
    held in memory) and `too_long` reports the duration.  Zero decoded samples is a
    DecodeError: FFmpeg skips what it cannot parse, so an empty result means unreadable data.
    """
    with open_container(path) as c:
        if not c.streams.audio:
            return None
        stream = c.streams.audio[0]
        chunks, rate, n = [], None, 0
        try:
            for frame in c.decode(stream):
                if rate is None:
                    rate = int(frame.sample_rate)
                    check_rate(rate)
                elif frame.sample_rate != rate:
                    raise DecodeError(f"sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
                chunks.append(frame_to_mono(frame))
                n += frame.samples
                if max_seconds is not None and n > (max_seconds + 1) * rate:
                    return DecodedAudio(np.zeros(0, np.float32), rate, _duration(c, stream, n / rate))
        except DecodeError:
            raise
        except Exception as e:  # corrupt or truncated packets surface here
            raise DecodeError(reason(e)) from None
    if not n:
        raise DecodeError("no audio could be decoded")
    x = np.concatenate(chunks)
    if not np.all(np.isfinite(x)):
        raise DecodeError("decoded NaN or infinite samples")
    return DecodedAudio(x, rate)


def _duration(container, stream, at_least: float) -> float:
    """The header's duration in seconds (stream, else container), at least what was decoded."""
    seconds = 0.0
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / 1_000_000  # AV_TIME_BASE
    return max(seconds, at_least)
