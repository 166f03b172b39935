"""Media: raw images, audio and video -> the rows the model's towers consume.

`image`, `video`, `audio` (features) and `decode` turn files into arrays;
`prepare` places media in prompts, encodes them through the towers (with a
content-keyed feature cache) and hands `rows.MediaRows` to the decoder."""

from gemma4_mlx.media.image import (
    BUDGETS,
    DEFAULT_BUDGET,
    ImageBatch,
    ImageProcessor,
    check_budget,
    load_image,
    num_soft_tokens,
)
from gemma4_mlx.media.video import VideoBatch, VideoError, VideoProcessor, read_video, read_video_audio

__all__ = [
    "BUDGETS",
    "DEFAULT_BUDGET",
    "ImageBatch",
    "ImageProcessor",
    "check_budget",
    "load_image",
    "num_soft_tokens",
    "VideoBatch",
    "VideoError",
    "VideoProcessor",
    "read_video",
    "read_video_audio",
]
