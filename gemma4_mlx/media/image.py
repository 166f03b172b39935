"""Gemma 4 image processor (docs/multimodal.md §2.2).

Matches transformers' PIL backend (`Gemma4ImageProcessorPil`, the one
`Gemma4ImageProcessor` falls back to without torchvision) bit for bit:
RGB conversion, aspect-preserving bicubic resize to multiples of
pooling_kernel_size * patch_size (48), rescale by 1/255, patchify, (x, y)
position ids, and padding to the budget's 9 * budget patches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280


def check_budget(value: Any, name: str = "image_budget") -> int:
    """The budget as an int, or a ValueError naming the argument."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) not in BUDGETS:
        raise ValueError(f"{name} must be one of {', '.join(map(str, BUDGETS))} soft tokens, got {value!r}")
    return int(value)


def resized_size(
    height: int, width: int, budget: int, patch_size: int = 16, pooling_kernel_size: int = 3
) -> tuple[int, int]:
    """(H', W'): the largest multiples of k*p keeping the aspect ratio within 9 * budget patches.

    The float arithmetic follows transformers' `get_aspect_ratio_preserving_size`
    step by step, so the floors land on the same side.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image has zero size ({width}x{height})")
    max_patches = budget * pooling_kernel_size**2
    target_px = max_patches * patch_size**2
    scale = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    h = int(math.floor(scale * height / side)) * side
    w = int(math.floor(scale * width / side)) * side
    longest = budget * side  # (max_patches // k^2) sides of 48 in a single 48-wide strip
    if h == 0 and w == 0:
        raise ValueError(f"cannot resize a {width}x{height} image to a multiple of {side}")
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    assert h * w <= target_px, (height, width, h, w)
    return h, w


def num_soft_tokens(
    height: int, width: int, budget: int = DEFAULT_BUDGET, patch_size: int = 16, pooling_kernel_size: int = 3
) -> int:
    """Soft tokens of a height x width image: (H'/48) * (W'/48) <= budget."""
    h, w = resized_size(height, width, check_budget(budget), patch_size, pooling_kernel_size)
    side = pooling_kernel_size * patch_size
    return (h // side) * (w // side)


def load_image(path: str | os.PathLike) -> Image.Image:
    """An image file as upright RGB (EXIF orientation applied, alpha dropped), like
    transformers' `load_image`; any failure is a one-line ValueError naming the file."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"image file not found: {name}")
    return decode_image(name, f"image file {name}")


def decode_image(source, name: str, max_pixels: int | None = None, budget: str = "") -> Image.Image:
    """An encoded image (a path or a binary file object) as upright RGB, as `load_image`.
    Images over PIL's limit (~89M pixels) or `max_pixels` (what is left of `budget`,
    named in the message) are refused from the header, before decoding; any failure
    is one ValueError line "cannot read {name}: ..."."""
    try:
        with Image.open(source) as f:
            # PIL only warns between its limit and twice it (~89M-179M pixels: up to
            # ~0.5 GB decoded); no Gemma image needs that many, so refuse before decoding
            pil = Image.MAX_IMAGE_PIXELS
            if pil is not None and f.width * f.height > pil:
                raise ValueError(
                    f"{f.width}x{f.height} pixels is over the {pil} pixel limit "
                    "(a decompression bomb, or far more detail than the model sees); downscale it"
                )
            if max_pixels is not None and f.width * f.height > max_pixels:
                raise ValueError(f"{f.width}x{f.height} pixels is more than the {max_pixels} left of {budget}")
            f.load()  # decode now: truncated or corrupt data fails here, not later
            return ImageOps.exif_transpose(f).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, struct/zlib errors, ...
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read {name}: {reason}") from None


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from an (H, W), (H, W, C) or (C, H, W) array, C in {1, 3, 4},
    as transformers converts arrays (channels first when ambiguous; alpha onto white)."""
    if a.ndim == 2:  # grayscale (transformers rejects 2-D arrays)
        a = a[..., None]
    elif a.ndim == 3 and a.shape[0] in (1, 3, 4):  # transformers prefers channels first when ambiguous
        a = np.moveaxis(a, 0, -1)
    elif a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"image has zero size ({a.shape[1]}x{a.shape[0]})")
    if a.dtype != np.uint8:
        if (
            a.dtype.kind not in "iuf"
            or not np.all(np.isfinite(a))
            or a.min() < 0
            or a.max() > 255
            or not np.array_equal(a, np.round(a))
        ):
            raise ValueError(
                f"image array must hold integer pixel values 0-255 (uint8), got dtype "
                f"{a.dtype} with range [{a.min()}, {a.max()}]"
            )
        a = a.astype(np.uint8)
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255
        return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return a


def to_rgb(image: Any) -> Image.Image:
    """A PIL RGB image from a PIL image, a numpy array or a file path."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, np.ndarray):
        return Image.fromarray(_array_to_rgb(image))
    if not isinstance(image, Image.Image):
        raise ValueError(
            f"unsupported image type {type(image).__name__}: pass a PIL image, a numpy array or a file path"
        )
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image has zero size ({image.width}x{image.height})")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        return image.convert("RGB")
    except Exception as e:  # a lazily opened PIL file that turns out truncated
        name = getattr(image, "filename", "") or "PIL image"
        raise ValueError(f"cannot read image {name}: {str(e).splitlines()[0] if str(e) else e!r}") from None


def image_list(images) -> list:
    """One image or a sequence of them, as a non-empty list."""
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("no images given")
    return images


@dataclass
class ImageBatch:
    """What the vision tower consumes, plus the prompt-side counts."""

    pixel_values: np.ndarray  # float32 [N, 9 * budget, 3 * patch^2], pixels in [0, 1]
    position_ids: np.ndarray  # int64 [N, 9 * budget, 2] = (x column, y row); padding (-1, -1)
    num_soft_tokens: list[int]  # per image: how many <|image|> placeholders it fills
    sizes: list[tuple[int, int]]  # per image: resized (height, width)
    budget: int


class ImageProcessor:
    def __init__(
        self,
        image_budget: int = DEFAULT_BUDGET,
        patch_size: int = 16,
        pooling_kernel_size: int = 3,
        resample: int = Image.BICUBIC,
        rescale_factor: float = 1 / 255,
    ):
        self.budget = check_budget(image_budget)
        self.patch_size, self.pooling_kernel_size = patch_size, pooling_kernel_size
        self.resample, self.rescale_factor = resample, rescale_factor

    @classmethod
    def from_config(cls, processor_config: dict | None = None, vision_config: dict | None = None) -> ImageProcessor:
        """From processor_config.json (its `image_processor` block); budget from
        `max_soft_tokens`, else the vision config's `default_output_length`, else 280."""
        pc = dict((processor_config or {}).get("image_processor", processor_config or {}))
        if pc.get("do_normalize") and (any(pc.get("image_mean", [0])) or any(s != 1 for s in pc.get("image_std", [1]))):
            raise ValueError("processor_config: do_normalize with a non-identity mean/std is not supported")
        budget = pc.get("max_soft_tokens") or (vision_config or {}).get("default_output_length") or DEFAULT_BUDGET
        return cls(
            image_budget=check_budget(budget, "max_soft_tokens"),
            patch_size=pc.get("patch_size", 16),
            pooling_kernel_size=pc.get("pooling_kernel_size", 3),
            resample=pc.get("resample", Image.BICUBIC),
            rescale_factor=pc.get("rescale_factor", 1 / 255) if pc.get("do_rescale", True) else 1.0,
        )

    def _table(self) -> np.ndarray:
        return (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)

    def num_soft_tokens(self, height: int, width: int, image_budget: int | None = None) -> int:
        budget = self.budget if image_budget is None else image_budget
        return num_soft_tokens(height, width, budget, self.patch_size, self.pooling_kernel_size)

    def __call__(self, images, image_budget: int | None = None) -> ImageBatch:
        """images: one image or a list (PIL images, numpy arrays, file paths)."""
        budget = self.budget if image_budget is None else check_budget(image_budget)
        images = image_list(images)
        p, k = self.patch_size, self.pooling_kernel_size
        max_patches = budget * k * k
        n = len(images)
        pixels = np.zeros((n, max_patches, 3 * p * p), np.float32)
        positions = np.full((n, max_patches, 2), -1, np.int64)
        counts, sizes = [], []
        for i, image in enumerate(images):
            img = to_rgb(image)
            h, w = resized_size(img.height, img.width, budget, p, k)
            if (h, w) != (img.height, img.width):
                img = img.resize((w, h), resample=self.resample)
            # rescale in float64, one rounding to float32 (as transformers' numpy rescale),
            # through a 256-entry table: the same values, without a float64 image
            a = self._table()[np.asarray(img, np.uint8)]
            ph, pw = h // p, w // p
            patches = a.reshape(ph, p, pw, p, 3).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)
            pixels[i, : ph * pw] = patches  # row-major patches; inside: (pixel row, column, channel)
            xs, ys = np.meshgrid(np.arange(pw), np.arange(ph), indexing="xy")
            positions[i, : ph * pw] = np.stack([xs, ys], axis=-1).reshape(-1, 2)
            counts.append(ph * pw // (k * k))
            sizes.append((h, w))
        return ImageBatch(pixels, positions, counts, sizes, budget)
