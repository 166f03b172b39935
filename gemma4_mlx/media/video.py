"""Gemma 4 video input (docs/multimodal.md §5): decode, sample frames, timestamps, patches.

Follows transformers' `Gemma4VideoProcessor` + `Gemma4Processor.replace_video_token`:

- frames: 32 uniformly spaced, index `i * total // n`; or with `fps=f` (instead of
  num_frames) `n = max(1, int(total / source_fps * f))` frames the same way.  Asking
  for more frames than the video has is an error, as in transformers.
- each frame is an image at the video budget (default 70 soft tokens, any of
  70/140/280/560/1120) through `ImageProcessor` (PIL bicubic resize; transformers'
  video path uses torchvision's antialiased bicubic, which differs slightly when a
  resize happens -- docs/multimodal.md §10.1).
- prompt: per frame `"mm:ss " + <|image> + K x <|video|> + <image|>`, joined by one
  space; mm:ss is the frame's *source* index / source fps, truncated.

Limits: videos longer than 60 s (frames / fps) are refused -- Gemma 4 is documented for
up to 60 s of video; trim or split longer ones.  Missing, unreadable, truncated and
frameless files are a one-line `VideoError` naming the file.  Decoding needs PyAV
(`pip install av`), imported lazily.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gemma4_mlx.media import decode
from gemma4_mlx.media.audio import resample
from gemma4_mlx.media.image import ImageProcessor, check_budget

log = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 32  # Gemma4VideoProcessor.num_frames
DEFAULT_VIDEO_BUDGET = 70  # Gemma4VideoProcessor.max_soft_tokens, per frame
MAX_SECONDS = 60.0
# What a video file may make us hold and decode.  A 52 KB H.264 file of black 4096x4096
# frames held 1.5 GiB of sampled RGB frames (3.8 GB peak), and a high declared frame rate
# let a short file ask for tens of thousands of full frames.  Limits: the sampled frames
# as RGB (32 frames of 4K UHD are 0.8 GB) and the pixels decoded to reach them (a minute
# of 4K at 60 fps, or of 1080p at 240 fps, is 3.0e10).
MAX_KEPT_BYTES = 1 << 30
MAX_DECODED_PIXELS = 32_000_000_000
FALLBACK_FPS = 24.0  # what transformers assumes when a video has no frame rate
AUDIO_RATE = 16_000


class VideoError(ValueError):
    """A video that cannot be turned into Gemma 4 inputs (bad file, length, sampling request)."""


# -- sampling and timestamps ------------------------------------------------------


def sample_indices(
    total_frames: int,
    num_frames: int | None = None,
    fps: float | None = None,
    source_fps: float | None = None,
    name: str = "video",
) -> np.ndarray:
    """Source frame indices to keep (int64, ascending): `i * total // n` for i < n, where
    n = num_frames (default 32) or, with `fps`, max(1, int(total / source_fps * fps))."""
    if num_frames is not None and fps is not None:
        raise VideoError(f"{name}: num_frames and fps are mutually exclusive; pass one of them")
    if fps is not None:
        if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
            raise VideoError(f"{name}: fps must be a positive number, got {fps!r}")
        if source_fps is None:
            raise VideoError(f"{name}: sampling at fps={fps} needs the video's own frame rate (source_fps)")
        n = max(1, int(total_frames / source_fps * fps))
    else:
        n = DEFAULT_NUM_FRAMES if num_frames is None else num_frames
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise VideoError(f"{name}: num_frames must be a positive integer, got {n!r}")
    if total_frames < 1:
        raise VideoError(f"{name}: no video frames")
    if n > total_frames:
        how = f"fps={fps} gives {n} frames" if fps is not None else f"num_frames={n}"
        raise VideoError(
            f"{name}: has {total_frames} frames but {how}; pass num_frames <= {total_frames} or a lower fps"
        )
    return np.arange(n, dtype=np.int64) * total_frames // n


def format_timestamp(seconds: float) -> str:
    """mm:ss, both truncated and zero-padded (minutes are not capped at 59)."""
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes):02d}:{int(secs):02d}"


def frame_timestamps(indices, source_fps: float) -> list[str]:
    return [format_timestamp(int(i) / source_fps) for i in indices]


def video_prompt_text(
    timestamps, tokens_per_frame: int, boi: str = "<|image>", video_token: str = "<|video|>", eoi: str = "<image|>"
) -> str:
    """The text that replaces one <|video|> placeholder in the prompt."""
    block = boi + video_token * int(tokens_per_frame) + eoi
    return " ".join(f"{t} {block}" for t in timestamps)


# -- decoding ----------------------------------------------------------------------


@dataclass
class Video:
    """The sampled frames of a video file, with what the prompt needs to place them."""

    path: str
    frames: np.ndarray  # uint8 (n, H, W, 3) RGB, the sampled frames only
    indices: np.ndarray  # their frame numbers in the source
    fps: float  # source frame rate (24 when the file has none)
    total_frames: int
    duration: float  # total_frames / fps, seconds

    @property
    def timestamps(self) -> list[str]:
        return frame_timestamps(self.indices, self.fps)


def _source_fps(stream, name: str) -> float:
    # transformers reads average_rate; guessed_rate covers streams that lack it
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate:
            return float(rate)
    log.warning("%s: the video has no frame rate; assuming %g fps for timestamps", name, FALLBACK_FPS)
    return FALLBACK_FPS


def _count_frames(path: str) -> int:
    """Frames by demuxing (no decoding), for containers that do not store a count (Matroska)."""
    with decode.open_container(path) as c:
        try:
            return sum(1 for p in c.demux(c.streams.video[0]) if p.size)
        except Exception as e:  # FFmpeg errors on damaged data
            raise decode.DecodeError(decode.reason(e)) from None


def _check_length(name: str, total: int, fps: float, max_seconds: float) -> float:
    duration = total / fps
    if duration > max_seconds:
        raise VideoError(
            f"{name}: video is {duration:.1f} s long ({total} frames at {fps:g} fps); at most "
            f"{max_seconds:g} s is supported -- trim or split it (e.g. `ffmpeg -t {max_seconds:g}`)"
        )
    return duration


def read_video(
    path: str | os.PathLike, num_frames: int | None = None, fps: float | None = None, max_seconds: float = MAX_SECONDS
) -> Video:
    """Decode the frames a Gemma 4 prompt uses (32 uniform, or `fps` per second).

    Frames are decoded in order and only the sampled ones are kept as RGB arrays.
    Videos longer than `max_seconds` (60 s) are refused before decoding.
    """
    name = os.fspath(path)
    try:
        with decode.open_container(name) as c:
            if not c.streams.video:
                raise VideoError(f"{name}: no video stream in this file")
            stream = c.streams.video[0]
            src_fps = _source_fps(stream, name)
            total = int(stream.frames or 0)
            w, h = stream.codec_context.width, stream.codec_context.height
        total = total or _count_frames(name)
        if total == 0:
            raise VideoError(f"{name}: no video frames in this file")
        duration = _check_length(name, total, src_fps, max_seconds)
        indices = sample_indices(total, num_frames, fps, src_fps, name)
        frames = _decode_frames(name, indices, total, (w, h) if w and h else None)
    except decode.DecodeError as e:
        raise VideoError(f"{name}: cannot read video ({e})") from None
    return Video(name, frames, indices, src_fps, total, duration)


def _check_size(name: str, size: tuple[int, int], kept: int, decoded: int) -> None:
    """Refuse, from the header, frames too large to hold or too many pixels to decode."""
    w, h = size
    if kept * w * h * 3 > MAX_KEPT_BYTES or decoded * w * h > MAX_DECODED_PIXELS:
        raise VideoError(
            f"{name}: {kept} sampled frames of {w}x{h} (out of {decoded} to decode) is more than this reader "
            f"holds ({MAX_KEPT_BYTES >> 20} MiB of frames, {MAX_DECODED_PIXELS:.1e} pixels decoded); downscale it "
            "(e.g. `ffmpeg -vf scale=-2:1080`), trim it, or sample fewer frames (num_frames / fps)"
        )


def _decode_frames(name: str, indices: np.ndarray, total: int, size: tuple[int, int] | None) -> np.ndarray:
    """The sampled frames as RGB; size: the header's frame size (None: unknown there, the
    first frame's is checked instead), which every frame must keep: it bounds what is held."""
    wanted, last = set(indices.tolist()), int(indices[-1])
    if size is not None:  # from the header, before anything is decoded
        _check_size(name, size, len(indices), last + 1)
    kept, i = [], -1
    with decode.open_container(name) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(c.decode(stream)):
                if size is None:  # the header did not say: the first frame does
                    size = (frame.width, frame.height)
                    _check_size(name, size, len(indices), last + 1)
                if (frame.width, frame.height) != size:
                    raise VideoError(f"{name}: the frame size changes mid-stream; re-encode the video")
                if i in wanted:
                    kept.append(frame.to_ndarray(format="rgb24"))
                if i >= last:
                    break
        except VideoError:
            raise
        except Exception as e:  # corrupt or truncated packets surface here, from inside FFmpeg
            raise VideoError(
                f"{name}: truncated or corrupt video after frame {i + 1} of {total} ({decode.reason(e)})"
            ) from None
    if len(kept) < len(indices):
        raise VideoError(f"{name}: truncated or corrupt video: decoded {i + 1} of its {total} frames")
    return np.stack(kept)


def read_video_audio(path: str | os.PathLike, max_seconds: float = MAX_SECONDS) -> np.ndarray | None:
    """The soundtrack as 16 kHz mono float32 (for the audio tower), or None without an audio stream.

    Resampled like every other clip (`audio.resample`); the audio tower takes at most
    30 s per clip, so split longer soundtracks.
    """
    name = os.fspath(path)
    try:
        got = decode.decode_audio(name, max_seconds)
    except decode.DecodeError as e:
        raise VideoError(f"{name}: cannot read the soundtrack ({e})") from None
    if got is None:
        return None
    if got.too_long is not None:
        raise VideoError(f"{name}: soundtrack is {got.too_long:.1f} s long; at most {max_seconds:g} s is supported")
    return resample(got.samples, got.rate, AUDIO_RATE)


# -- model inputs --------------------------------------------------------------------


@dataclass
class VideoBatch:
    """One video's frames as vision-tower input, plus its prompt text pieces."""

    pixel_values: np.ndarray  # float32 (n_frames, 9 * budget, 3 * patch^2)
    position_ids: np.ndarray  # int64 (n_frames, 9 * budget, 2), padding (-1, -1)
    num_soft_tokens: int  # per frame
    timestamps: list[str]  # per frame, mm:ss
    indices: np.ndarray  # source frame numbers
    source_fps: float
    size: tuple[int, int]  # resized (height, width) of every frame
    budget: int

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    def prompt_text(self, boi: str = "<|image>", video_token: str = "<|video|>", eoi: str = "<image|>") -> str:
        return video_prompt_text(self.timestamps, self.num_soft_tokens, boi, video_token, eoi)


class VideoProcessor:
    def __init__(
        self,
        video_budget: int = DEFAULT_VIDEO_BUDGET,
        num_frames: int = DEFAULT_NUM_FRAMES,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
    ):
        self.budget = check_budget(video_budget, "video_budget")
        self.num_frames = num_frames
        self.images = ImageProcessor(self.budget, patch_size, pooling_kernel_size)

    @classmethod
    def from_config(cls, processor_config: dict | None = None) -> VideoProcessor:
        """From processor_config.json's `video_processor` block (budget `max_soft_tokens`, `num_frames`)."""
        pc = dict((processor_config or {}).get("video_processor", processor_config or {}))
        images = ImageProcessor.from_config({"max_soft_tokens": DEFAULT_VIDEO_BUDGET, **pc})
        out = cls(images.budget, pc.get("num_frames") or DEFAULT_NUM_FRAMES)
        out.images = images  # patch size, pooling, resample and rescale as configured
        return out

    def __call__(
        self,
        video,
        num_frames: int | None = None,
        fps: float | None = None,
        video_budget: int | None = None,
        source_fps: float | None = None,
    ) -> VideoBatch:
        """video: a file path, a `Video` (already sampled), or a uint8 (T, H, W, 3) array of
        every frame of a clip (sampled here; `source_fps` for timestamps, else 24 with a warning)."""
        budget = self.budget if video_budget is None else check_budget(video_budget, "video_budget")
        if num_frames is None and fps is None:
            num_frames = self.num_frames
        if isinstance(video, (str, os.PathLike)):
            video = read_video(video, num_frames, fps)
        elif isinstance(video, np.ndarray):
            video = self._from_array(video, num_frames, fps, source_fps)
        elif not isinstance(video, Video):
            raise VideoError(
                f"unsupported video type {type(video).__name__}: pass a file path, a Video "
                "or a (T, H, W, 3) uint8 array"
            )
        frames = [Image.fromarray(f) for f in video.frames]  # PIL: no channels-first guess on odd shapes
        batch = self.images(frames, image_budget=budget)
        return VideoBatch(
            batch.pixel_values,
            batch.position_ids,
            batch.num_soft_tokens[0],
            video.timestamps,
            video.indices,
            video.fps,
            batch.sizes[0],
            budget,
        )

    @staticmethod
    def _from_array(a: np.ndarray, num_frames, fps, source_fps) -> Video:
        name = "video array"
        if a.ndim != 4 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise VideoError(f"{name}: expected uint8 (T, H, W, 3) RGB frames, got {a.dtype} {a.shape}")
        if source_fps is None:
            log.warning("%s: no source_fps given; assuming %g fps for timestamps", name, FALLBACK_FPS)
        src = float(source_fps or FALLBACK_FPS)
        duration = _check_length(name, len(a), src, MAX_SECONDS)
        indices = sample_indices(len(a), num_frames, fps, source_fps, name)  # fps sampling needs the real rate
        return Video(name, a[indices], indices, src, len(a), duration)
