"""Gemma 4 audio front end (docs/multimodal.md §4.1-§4.2): load, resample, log-mel, token counts.

Pure numpy; matches transformers' `Gemma4AudioFeatureExtractor` (float32 framing,
window and FFT, float64 mel projection and log, float32 output) and the processor's
soft-token count.  What we add around it:

- input: a 1-D float waveform (any rate, given by `sampling_rate`, default 16 kHz) or
  a file.  WAV is read here (stdlib `wave` for PCM, a small RIFF reader for IEEE-float /
  WAVE_FORMAT_EXTENSIBLE); FLAC, MP3, M4A/AAC, Ogg/Opus and the soundtrack of a video
  are decoded with PyAV (optional, `decode.py`).  Several channels are averaged to mono.
- resampling to 16 kHz: Kaiser-windowed sinc, polyphase (see `resample`).
- limits: a clip longer than 30 s (480,000 samples at 16 kHz) is an error, not
  silently truncated as transformers does; split long audio into <= 30 s clips, each
  with its own <|audio> ... <audio|> block.  A clip shorter than 161 samples (~10 ms)
  yields zero soft tokens in transformers and is an error here too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from gemma4_mlx.media import decode

SAMPLING_RATE = 16_000
MAX_SAMPLES = 480_000  # 30 s: the feature extractor's max_length
MAX_TOKENS = 750  # processor `audio_seq_length`
MIN_SAMPLES = 161  # fewer samples -> no valid mel frame -> 0 soft tokens

# Token ids of the released checkpoints (docs/multimodal.md §1.1); prefer the ids in config.json.
BOA_TOKEN_ID, AUDIO_TOKEN_ID, EOA_TOKEN_ID = 256000, 258881, 258883


class AudioError(ValueError):
    """Audio that cannot be turned into Gemma 4 features (bad file, length, format)."""


# -- configuration -----------------------------------------------------------


@dataclass(frozen=True)
class FeatureConfig:
    """The `feature_extractor` block of processor_config.json (transformers defaults)."""

    feature_size: int = 128
    sampling_rate: int = SAMPLING_RATE
    frame_length_ms: float = 20.0
    hop_length_ms: float = 10.0
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = False
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-3
    per_bin_mean: tuple | None = None
    per_bin_stddev: tuple | None = None
    padding_value: float = 0.0
    pad_to_multiple_of: int = 128

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureConfig:
        """Read the block (or a whole processor_config.json); unknown keys are ignored.

        transformers derives the frame and hop sizes from the `*_ms` keys only: the
        sample-valued `frame_length` / `hop_length` stored next to them are ignored
        there.  We refuse a file in which the two disagree rather than guess.
        """
        if "feature_extractor" in d:
            d = d["feature_extractor"]
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        cfg = cls(**kw)
        for key, derived in (("frame_length", cfg.frame_length), ("hop_length", cfg.hop_length)):
            if d.get(key) is not None and int(d[key]) != derived:
                raise AudioError(f"feature_extractor: {key}={d[key]} disagrees with {key}_ms ({derived} samples)")
        if cfg.dither:
            raise AudioError("feature_extractor: dither > 0 (random noise) is not supported")
        return cfg

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n

    @property
    def max_samples(self) -> int:
        return 30 * self.sampling_rate


# -- mel filters ---------------------------------------------------------------


def _hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m):
    return 700.0 * (np.power(10, m / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def mel_filters(n_freqs: int, n_mels: int, f_min: float, f_max: float, sampling_rate: int) -> np.ndarray:
    """(n_freqs, n_mels) float64 HTK triangles over FFT bins spaced in Hz, no area norm."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(f_min), _hz_to_mel(f_max), n_mels + 2))
    bins = np.linspace(0, sampling_rate // 2, n_freqs)
    rel = edges[None, :] - bins[:, None]  # (n_freqs, n_mels + 2)
    width = np.diff(edges)
    rising = -rel[:, :-2] / width[:-1]
    falling = rel[:, 2:] / width[1:]
    out = np.maximum(0.0, np.minimum(rising, falling))
    out.flags.writeable = False
    return out


@lru_cache(maxsize=8)
def _hann(n: int) -> np.ndarray:
    w = np.hanning(n + 1)[:-1].astype(np.float32)  # periodic Hann
    w.flags.writeable = False
    return w


# -- features ------------------------------------------------------------------


def log_mel(clips: Sequence[np.ndarray], cfg: FeatureConfig = FeatureConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Batch of validated 16 kHz float32 clips -> (features (B, T, n_mels) float32, mask (B, T) bool).

    The batch is right-padded to the longest clip, then to a multiple of 128 samples;
    frames whose last window sample lies past a clip's end are invalid and zeroed.
    """
    n = max(len(c) for c in clips)
    m = cfg.pad_to_multiple_of
    n_pad = -(-n // m) * m if m else n
    wav = np.full((len(clips), n_pad), cfg.padding_value, dtype=np.float32)
    real = np.zeros((len(clips), n_pad), dtype=bool)
    for i, c in enumerate(clips):
        wav[i, : len(c)] = c
        real[i, : len(c)] = True
    if cfg.input_scale_factor != 1.0:
        wav = wav * cfg.input_scale_factor
    # semicausal padding: the first frame is centred on sample 0
    left = cfg.frame_length // 2
    wav = np.pad(wav, ((0, 0), (left, 0)))
    real = np.pad(real, ((0, 0), (left, 0)))
    size, hop = cfg.frame_length + 1, cfg.hop_length  # one extra sample for preemphasis
    n_frames = (wav.shape[1] - size) // hop + 1
    if n_frames <= 0:
        raise AudioError("audio too short for one frame")
    frames = np.lib.stride_tricks.sliding_window_view(wav, size, axis=-1)[:, ::hop][:, :n_frames]
    p = cfg.preemphasis
    if p > 0.0 and cfg.preemphasis_htk_flavor:
        frames = np.concatenate([frames[..., :1] * (1.0 - p), frames[..., 1:-1] - p * frames[..., :-2]], -1)
    elif p > 0.0:
        frames = frames[..., 1:] - p * frames[..., :-1]
    else:
        frames = frames[..., :-1]
    spec = np.abs(np.fft.rfft(frames * _hann(cfg.frame_length), n=cfg.fft_length, axis=-1))
    filters = mel_filters(
        cfg.fft_length // 2 + 1, cfg.feature_size, cfg.min_frequency, cfg.max_frequency, cfg.sampling_rate
    )
    feats = np.log(spec @ filters + np.float64(cfg.mel_floor))  # float64, additive floor
    if cfg.per_bin_mean is not None:
        feats = feats - np.asarray(cfg.per_bin_mean).reshape(1, 1, -1)
    if cfg.per_bin_stddev is not None:
        feats = feats / np.asarray(cfg.per_bin_stddev).reshape(1, 1, -1)
    feats = feats.astype(np.float32)
    mask = real[:, np.arange(n_frames) * hop + size - 1]  # last sample of each window is real
    return feats * mask[..., None], mask


def num_audio_tokens(n_samples: int, cfg: FeatureConfig = FeatureConfig()) -> int:
    """Soft tokens for a clip of n_samples (16 kHz): valid mel frames through two
    stride-2 convolutions (kernel 3, padding 1), capped at 750 -- transformers'
    `_compute_audio_num_tokens`, equal to its mask-derived count.  25 per second."""
    t = (n_samples + cfg.frame_length // 2 - (cfg.frame_length + 1)) // cfg.hop_length + 1
    if t <= 0:
        return 0
    for _ in range(2):
        t = (t + 2 - 3) // 2 + 1
    return min(t, MAX_TOKENS)


def tokens_from_mask(mask: np.ndarray) -> list[int]:
    """Per-clip token counts from a (B, T) frame mask: what survives mask[::2][::2]."""
    return [int(row[::2][::2].sum()) for row in np.asarray(mask, dtype=bool)]


def audio_prompt_ids(
    n_tokens: int, boa: int = BOA_TOKEN_ID, audio: int = AUDIO_TOKEN_ID, eoa: int = EOA_TOKEN_ID
) -> list[int]:
    """<|audio> + n x <|audio|> + <audio|>: the expansion of one clip's placeholder."""
    return [boa] + [audio] * n_tokens + [eoa]


# -- loading -------------------------------------------------------------------

_COMPRESSED = {
    ".flac": "FLAC",
    ".mp3": "MP3",
    ".m4a": "M4A/AAC",
    ".mp4": "MP4",
    ".aac": "AAC",
    ".ogg": "Ogg",
    ".opus": "Opus",
    ".webm": "WebM",
    ".wma": "WMA",
    ".aiff": "AIFF",
    ".aif": "AIFF",
    ".mkv": "Matroska",
    ".mov": "QuickTime",
}


def _sniff(head: bytes, ext: str) -> str:
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "MP3"
    if head[4:8] == b"ftyp":
        return "M4A/MP4"
    if head[:4] == b"OggS":
        return "Ogg"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    if ext in _COMPRESSED:
        return _COMPRESSED[ext]
    return "corrupt" if ext in (".wav", ".wave") or head[:4] in (b"RIFF", b"RIFX") else "unknown"


def _file_kind(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise AudioError(f"{path}: cannot read audio file ({e.strerror or e})") from None
    return _sniff(head, os.path.splitext(path)[1].lower())


def _convert_hint(path: str) -> str:
    return (
        f"convert it, e.g. `ffmpeg -i '{path}' -ac 1 -ar 16000 out.wav` (install ffmpeg), or decode it "
        "yourself (e.g. `pip install soundfile`) and pass the float array with its sampling_rate"
    )


def _too_long(name: str, seconds: float, cfg: FeatureConfig) -> AudioError:
    return AudioError(
        f"{name}: {seconds:.2f} s of audio; Gemma 4 takes at most "
        f"30 s ({cfg.max_samples} samples at {cfg.sampling_rate} Hz) per clip -- "
        "split it into clips of <= 30 s, each with its own audio placeholder"
    )


def read_audio(path: str | os.PathLike, cfg: FeatureConfig | None = None) -> tuple[np.ndarray, int]:
    """Decode an audio file -> (mono float32 waveform in [-1, 1], its sampling rate).

    WAV goes through `read_wav`; FLAC, MP3, M4A/AAC, Ogg/Opus, WebM and the soundtrack
    of a video file through PyAV.  With `cfg`, a compressed file longer than its 30 s is
    refused while decoding, before all of it is held in memory.
    """
    path = os.fspath(path)
    kind = _file_kind(path)
    if kind in ("wav", "corrupt"):
        return read_wav(path, cfg)
    try:
        got = decode.decode_audio(path, None if cfg is None else cfg.max_samples / cfg.sampling_rate)
    except decode.MissingPyAV:
        what = "unknown audio format" if kind == "unknown" else f"unsupported audio format {kind}"
        raise AudioError(f"{path}: {what} without PyAV: `pip install av`, or {_convert_hint(path)}") from None
    except decode.DecodeError as e:
        what = "unknown audio format" if kind == "unknown" else f"corrupt or unsupported audio format {kind}"
        raise AudioError(f"{path}: {what} ({e}); {_convert_hint(path)}") from None
    if got is None:
        raise AudioError(f"{path}: no audio stream in this {'file' if kind == 'unknown' else kind + ' file'}")
    if got.too_long is not None:
        raise _too_long(path, got.too_long, cfg)
    return got.samples, got.rate


def read_wav(path: str | os.PathLike, cfg: FeatureConfig | None = None) -> tuple[np.ndarray, int]:
    """Decode a WAV file -> (mono float32 waveform in [-1, 1], sampling rate).
    Other formats are refused here; `read_audio` / `load_audio` decode them.  The
    header's rate must be in `decode.AUDIO_RATES`; with `cfg`, a file longer than its
    30 s is refused from the header, before its samples are read."""
    path = os.fspath(path)
    kind = _file_kind(path)
    if kind == "corrupt":
        raise AudioError(f"{path}: corrupt WAV file (no RIFF/WAVE header)")
    if kind != "wav":
        what = "unknown audio format" if kind == "unknown" else f"unsupported audio format {kind}"
        raise AudioError(
            f"{path}: {what}; read_wav decodes WAV only (load_audio decodes the rest "
            f"with PyAV), or {_convert_hint(path)}"
        )
    try:
        try:
            with wave.open(path, "rb") as w:
                ch, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
                # frames the file can hold: a truncated file is named as such, below
                _check_wav_header(path, rate, min(n, os.path.getsize(path) // max(1, ch * width)), cfg)
                data = w.readframes(n)
            fmt = 1
        except wave.Error as e:
            if "unknown format" not in str(e):
                raise
            fmt, ch, width, rate, data, n = _read_riff(path)  # IEEE float / EXTENSIBLE
            _check_wav_header(path, rate, min(n, len(data) // (ch * width)), cfg)
    except AudioError:
        raise
    except (wave.Error, EOFError, struct.error, RuntimeError, ValueError, OSError) as e:  # wave's own failures
        raise AudioError(f"{path}: corrupt WAV file ({str(e) or 'unexpected end of file'})") from None
    if len(data) < n * ch * width:
        raise AudioError(f"{path}: corrupt WAV file (data chunk truncated: {len(data)} of {n * ch * width} bytes)")
    return _pcm_to_float(data[: n * ch * width], fmt, width, ch, path), rate


def _check_rate(name: str, rate) -> None:
    """AudioError naming `name` for a rate outside `decode.AUDIO_RATES`."""
    try:
        decode.check_rate(rate)
    except decode.DecodeError as e:
        raise AudioError(f"{name}: {e}") from None


def _check_wav_header(path: str, rate: int, frames: int, cfg: FeatureConfig | None) -> None:
    _check_rate(path, rate)
    if cfg is not None and frames * cfg.sampling_rate > cfg.max_samples * rate:
        raise _too_long(path, frames / rate, cfg)


def _read_riff(path: str):
    """Minimal RIFF walk for what `wave` refuses: format 3 (float) and 0xFFFE."""
    with open(path, "rb") as f:
        blob = f.read()
    pos, fmt = 12, None
    while pos + 8 <= len(blob):
        cid, size = blob[pos : pos + 4], struct.unpack_from("<I", blob, pos + 4)[0]
        body = blob[pos + 8 : pos + 8 + size]
        if cid == b"fmt ":
            tag, ch, rate, _, _, bits = struct.unpack_from("<HHIIHH", body)
            if tag == 0xFFFE:
                tag = struct.unpack_from("<H", body, 24)[0]  # sub-format GUID starts with the tag
            if tag not in (1, 3):
                raise AudioError(
                    f"{path}: unsupported WAV encoding (format tag {tag}); only PCM and IEEE float are decoded"
                )
            fmt = (tag, ch, (bits + 7) // 8, rate)
        elif cid == b"data":
            if fmt is None:
                raise wave.Error("data chunk before fmt chunk")
            tag, ch, width, rate = fmt
            if ch == 0 or width == 0:
                raise wave.Error("bad channel count or sample width")
            return tag, ch, width, rate, body, size // (ch * width)
        pos += 8 + size + (size & 1)
    raise wave.Error("no fmt/data chunk")


def _pcm_to_float(data: bytes, fmt: int, width: int, ch: int, path: str) -> np.ndarray:
    if fmt == 3:
        if width not in (4, 8):
            raise AudioError(f"{path}: unsupported float WAV sample width {width}")
        x = np.frombuffer(data, dtype="<f4" if width == 4 else "<f8").astype(np.float64)
    elif width == 1:
        x = (np.frombuffer(data, dtype=np.uint8).astype(np.float64) - 128.0) / 128.0
    elif width in (2, 4):
        x = np.frombuffer(data, dtype=f"<i{width}").astype(np.float64) / float(2 ** (8 * width - 1))
    elif width == 3:
        b = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float64) / float(1 << 23)
    else:
        raise AudioError(f"{path}: unsupported WAV sample width {width} bytes")
    x = x.reshape(-1, ch).mean(axis=1)  # average channels to mono
    if not np.all(np.isfinite(x)):
        raise AudioError(f"{path}: WAV contains NaN or infinite samples")
    return x.astype(np.float32)


def resample(
    x: np.ndarray,
    rate_in: int,
    rate_out: int = SAMPLING_RATE,
    zeros: int = 24,
    rolloff: float = 0.945,
    beta: float = 8.6,
) -> np.ndarray:
    """Band-limited resampling with a Kaiser-windowed sinc (polyphase over rate_out/rate_in
    reduced to L/M).  `zeros` zero crossings each side; the cutoff is `rolloff` times the
    lower Nyquist; Kaiser beta 8.6 (stopband ~ -80 dB).  Output length ceil(N*L/M); the
    first output sample sits on the first input sample."""
    if rate_in == rate_out:
        return np.asarray(x, dtype=np.float32)
    if rate_in <= 0 or rate_out <= 0:
        raise AudioError(f"bad sampling rate {rate_in} -> {rate_out}")
    g = math.gcd(int(rate_in), int(rate_out))
    up, down = int(rate_out) // g, int(rate_in) // g
    fc = rolloff * min(1.0, up / down)  # cutoff, as a fraction of the input Nyquist
    half = zeros / fc  # kernel half-width in input samples
    taps = np.arange(-math.ceil(half), math.ceil(half) + 2)
    x = np.asarray(x, dtype=np.float64)
    n_out = -(-len(x) * up // down)
    pad = len(taps) + 1
    xp = np.pad(x, (pad, pad))
    out = np.empty(n_out, dtype=np.float64)
    # One kernel row per output phase, built once (at most `up` rows: 160 for 44.1 kHz)
    tau = np.arange(up)[:, None] / up - taps[None, :]  # t_n - k, in input samples
    u = np.clip(tau / half, -1.0, 1.0)
    kern = fc * np.sinc(fc * tau) * np.i0(beta * np.sqrt(1.0 - u * u)) / np.i0(beta)
    kern[np.abs(tau) >= half] = 0.0
    for a in range(0, n_out, 16384):
        n = np.arange(a, min(n_out, a + 16384), dtype=np.int64)
        base, phase = (n * down) // up, (n * down) % up
        out[a : a + len(n)] = np.einsum("nk,nk->n", kern[phase], xp[base[:, None] + taps[None, :] + pad])
    return out.astype(np.float32)


def load_audio(source, sampling_rate: int | None = None, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """One clip -> validated mono float32 waveform at the model's 16 kHz.

    source: an audio file (WAV; FLAC, MP3, M4A/AAC, Ogg/Opus or a video's soundtrack
    with PyAV installed), or a 1-D float array at `sampling_rate` Hz (default 16 kHz).
    Decoded files are resampled with `resample`, like arrays and WAV.
    """
    if isinstance(source, (str, os.PathLike)):
        if sampling_rate is not None:
            raise TypeError("sampling_rate applies to arrays; an audio file carries its own rate")
        x, rate = read_audio(source, cfg)
        name = os.fspath(source)
    else:
        x = np.asarray(source)
        rate, name = cfg.sampling_rate if sampling_rate is None else sampling_rate, "audio array"
        if x.ndim != 1:
            raise AudioError(f"{name}: expected a 1-D mono waveform, got shape {x.shape} (average the channels first)")
        if not np.issubdtype(x.dtype, np.floating):
            raise AudioError(
                f"{name}: expected float samples in [-1, 1], got {x.dtype} (e.g. divide int16 PCM by 32768)"
            )
        if not np.all(np.isfinite(x)):
            raise AudioError(f"{name}: waveform contains NaN or infinite samples")
    if len(x) == 0:
        raise AudioError(f"{name}: empty audio (0 samples)")
    _check_rate(name, rate)
    if len(x) * cfg.sampling_rate > cfg.max_samples * rate:  # before resampling, which costs in proportion
        raise _too_long(name, len(x) / rate, cfg)
    x = resample(x, int(rate), cfg.sampling_rate)
    if len(x) > cfg.max_samples:
        raise _too_long(name, len(x) / cfg.sampling_rate, cfg)
    if len(x) < MIN_SAMPLES:
        raise AudioError(
            f"{name}: {len(x)} samples is too short: at least {MIN_SAMPLES} samples "
            f"(~10 ms at {cfg.sampling_rate} Hz) are needed for one audio token"
        )
    return x


@dataclass
class AudioInputs:
    input_features: np.ndarray  # (B, T, n_mels) float32, zero on invalid frames
    input_features_mask: np.ndarray  # (B, T) bool
    num_tokens: list[int]  # soft tokens per clip (placeholders to insert)


def process_audio(clips, sampling_rate: int | None = None, cfg: FeatureConfig = FeatureConfig()) -> AudioInputs:
    """One clip or a list of clips (audio file paths or 1-D float arrays at `sampling_rate`) -> model inputs."""
    if isinstance(clips, (str, os.PathLike, np.ndarray)):
        clips = [clips]
    clips = list(clips)
    if not clips:
        raise AudioError("no audio given")
    if any(np.isscalar(c) and not isinstance(c, str) for c in clips):
        raise TypeError("pass each clip as a 1-D array or a path, not a flat list of numbers")
    # sampling_rate describes the arrays; a file carries its own
    waves = [load_audio(c, None if isinstance(c, (str, os.PathLike)) else sampling_rate, cfg) for c in clips]
    feats, mask = log_mel(waves, cfg)
    counts = [num_audio_tokens(len(w), cfg) for w in waves]
    assert counts == tokens_from_mask(mask), (counts, tokens_from_mask(mask))
    return AudioInputs(feats, mask, counts)
