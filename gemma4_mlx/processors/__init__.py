"""Input processors: raw media -> the arrays the Gemma 4 encoders consume."""

from .image import BUDGETS, DEFAULT_BUDGET, ImageBatch, ImageProcessor, check_budget, load_image, num_soft_tokens
from .video import VideoBatch, VideoError, VideoProcessor, read_video, read_video_audio

__all__ = ["BUDGETS", "DEFAULT_BUDGET", "ImageBatch", "ImageProcessor", "check_budget", "load_image",
           "num_soft_tokens", "VideoBatch", "VideoError", "VideoProcessor", "read_video", "read_video_audio"]
