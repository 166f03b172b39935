"""Media front ends of Gemma 4 12B "unified" (docs/unified.md §5).

Images: the same aspect-preserving resize to multiples of k*p (48) as the other
Gemma 4 models (`media.image.resized_size`), rescale by 1/255, then one merged
patch per soft token: a (k p) x (k p) x 3 block of the image flattened as
(pixel row, pixel column, channel), in raster order, with its (x, y) block position,
padded to the budget with zero rows at (-1, -1).  Audio: the 16 kHz waveform cut into
frames of `audio_samples_per_token` samples (640 = 40 ms), the last one zero-padded;
one soft token per frame.  Both match transformers' `Gemma4UnifiedImageProcessor`
and `Gemma4UnifiedAudioFeatureExtractor` bit for bit (resizes aside: §5.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from gemma4_mlx.media.audio import FeatureConfig
from gemma4_mlx.media.image import (
    DEFAULT_BUDGET,
    ImageBatch,
    check_budget,
    image_list,
    num_soft_tokens,
    resized_size,
    to_rgb,
)
from gemma4_mlx.media.video import DEFAULT_NUM_FRAMES, DEFAULT_VIDEO_BUDGET, VideoProcessor


class UnifiedImageProcessor:
    """Images -> `ImageBatch` of merged patches [N, budget, 3 (k p)^2] (what
    `models.unified.UnifiedVision` takes)."""

    def __init__(
        self,
        image_budget: int = DEFAULT_BUDGET,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
        video: bool = False,
    ):
        """video: rescale as the video processor does.  The image processor multiplies
        in float32 by float32(1/255); the video processor, whose identity normalisation
        is fused with the rescale, divides by 255 in float32 (§5.1)."""
        self.budget = check_budget(image_budget)
        self.patch_size, self.pooling_kernel_size = patch_size, pooling_kernel_size
        levels = np.arange(256, dtype=np.float32)
        self._table = levels / np.float32(255) if video else levels * np.float32(1 / 255)

    @classmethod
    def from_config(cls, processor_config: dict | None, default_budget: int = DEFAULT_BUDGET) -> UnifiedImageProcessor:
        """From processor_config.json's `image_processor` block (or a flat image processor file)."""
        pc = dict((processor_config or {}).get("image_processor", processor_config or {}))
        if pc.get("do_normalize") and (any(pc.get("image_mean", [0])) or any(s != 1 for s in pc.get("image_std", [1]))):
            raise ValueError("processor_config: do_normalize with a non-identity mean/std is not supported")
        if pc.get("do_rescale", True) is False or pc.get("rescale_factor", 1 / 255) != 1 / 255:
            raise ValueError("processor_config: only the 1/255 rescale of the 12B processor is supported")
        return cls(
            check_budget(pc.get("max_soft_tokens") or default_budget, "max_soft_tokens"),
            pc.get("patch_size", 16),
            pc.get("pooling_kernel_size", 3),
        )

    def num_soft_tokens(self, height: int, width: int, image_budget: int | None = None) -> int:
        budget = self.budget if image_budget is None else image_budget
        return num_soft_tokens(height, width, budget, self.patch_size, self.pooling_kernel_size)

    def __call__(self, images, image_budget: int | None = None) -> ImageBatch:
        """images: one image or a list (PIL images, numpy arrays, file paths)."""
        budget = self.budget if image_budget is None else check_budget(image_budget)
        images = image_list(images)
        p, k = self.patch_size, self.pooling_kernel_size
        side = p * k
        pixels = np.zeros((len(images), budget, 3 * side * side), np.float32)
        positions = np.full((len(images), budget, 2), -1, np.int64)
        counts, sizes = [], []
        for i, image in enumerate(images):
            img = to_rgb(image)
            h, w = resized_size(img.height, img.width, budget, p, k)
            if (h, w) != (img.height, img.width):  # PIL bicubic; the reference uses torchvision's (§5.1)
                img = img.resize((w, h), resample=Image.BICUBIC)
            a = self._table[np.asarray(img, np.uint8)]
            gh, gw = h // side, w // side
            merged = a.reshape(gh, side, gw, side, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, -1)
            pixels[i, : gh * gw] = merged
            xs, ys = np.meshgrid(np.arange(gw), np.arange(gh), indexing="xy")
            positions[i, : gh * gw] = np.stack([xs, ys], axis=-1).reshape(-1, 2)
            counts.append(gh * gw)
            sizes.append((h, w))
        return ImageBatch(pixels, positions, counts, sizes, budget)


@dataclass(frozen=True)
class FrameConfig(FeatureConfig):
    """The unified audio front end: raw frames instead of log-mel features.  Loading
    (decoding, resampling to `sampling_rate`, the 30 s limit) is the shared one."""

    samples_per_token: int = 640

    @classmethod
    def from_dict(cls, d: dict) -> FrameConfig:
        """processor_config.json's `feature_extractor` block of the 12B."""
        n = int(d.get("audio_samples_per_token", d.get("feature_size", 640)))
        if n <= 0:
            raise ValueError(f"feature_extractor: audio_samples_per_token must be > 0, got {n}")
        return cls(feature_size=n, sampling_rate=int(d.get("sampling_rate", 16_000)), samples_per_token=n)

    def num_tokens(self, n_samples: int) -> int:
        """ceil(samples / frame): the reference's placeholder count for a clip."""
        return math.ceil(n_samples / self.samples_per_token)

    def frames(self, waves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Clips -> (frames [B, T, samples] float32, zero past each clip; mask [B, T])."""
        n = self.samples_per_token
        counts = [self.num_tokens(len(w)) for w in waves]
        out = np.zeros((len(waves), max(counts), n), np.float32)
        mask = np.zeros((len(waves), max(counts)), bool)
        for i, (w, t) in enumerate(zip(waves, counts)):
            padded = np.zeros(t * n, np.asarray(w).dtype)
            padded[: len(w)] = w
            out[i, :t] = padded.reshape(t, n).astype(np.float32)  # cast after the cut, as the reference
            mask[i, :t] = True
        return out, mask


def video_processor(pc: dict | None, image: UnifiedImageProcessor) -> VideoProcessor:
    """Frames sampled as for the other Gemma 4 models (`media.video`), each turned into
    merged patches at the video budget (70 unless processor_config.json says otherwise)."""
    vp = dict((pc or {}).get("video_processor") or {})
    budget = check_budget(vp.get("max_soft_tokens") or DEFAULT_VIDEO_BUDGET, "video max_soft_tokens")
    out = VideoProcessor(
        budget, vp.get("num_frames") or DEFAULT_NUM_FRAMES, image.patch_size, image.pooling_kernel_size
    )
    out.images = UnifiedImageProcessor(budget, image.patch_size, image.pooling_kernel_size, video=True)
    return out


def processors(model, pc: dict | None, source) -> tuple[UnifiedImageProcessor, FrameConfig, VideoProcessor]:
    """The image processor, audio front end and video processor of a unified model, from
    its processor_config.json (`pc`, None without one), checked against its embedders."""
    vision = getattr(getattr(model, "vision", None), "config", None)
    audio = getattr(getattr(model, "audio", None), "config", None)
    try:
        image = UnifiedImageProcessor.from_config(pc)
        features = FrameConfig.from_dict((pc or {}).get("feature_extractor") or {})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if pc is None or "image_processor" not in pc and "patch_size" not in pc:
        if vision is not None:  # no processor file: the embedder's geometry
            image = UnifiedImageProcessor(image.budget, vision.patch_size, vision.pooling_kernel_size)
    if vision is not None and (image.patch_size, image.pooling_kernel_size) != (
        vision.patch_size,
        vision.pooling_kernel_size,
    ):
        raise ValueError(
            f"{source}: patch_size/pooling_kernel_size {image.patch_size}/{image.pooling_kernel_size} "
            f"do not match the vision embedder's {vision.patch_size}/{vision.pooling_kernel_size}"
        )
    if audio is not None:
        block = (pc or {}).get("feature_extractor") or {}
        if "audio_samples_per_token" not in block:  # none, or a mel extractor's block: the embedder decides
            rate = int(block.get("sampling_rate", 16_000))
            features = FrameConfig(
                feature_size=audio.audio_embed_dim, sampling_rate=rate, samples_per_token=audio.audio_embed_dim
            )
        elif features.samples_per_token != audio.audio_embed_dim:
            raise ValueError(
                f"{source}: audio_samples_per_token {features.samples_per_token} != the audio embedder's "
                f"audio_embed_dim {audio.audio_embed_dim}"
            )
    return image, features, video_processor(pc, image)
