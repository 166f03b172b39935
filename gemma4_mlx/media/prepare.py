"""Prompts with images, audio clips and videos (docs/multimodal.md §2.2, §3, §4, §5).

The chat template writes one placeholder per medium (`<|image|>`, `<|audio|>`,
`<|video|>`); `MediaProcessor.expand` replaces each with its full run of soft-token
placeholders, as transformers' processor does, and `MediaProcessor.prompt` finds
those runs in the token ids.  The towers run only for runs a prefill actually
needs (`MediaPrompt.rows`), and their outputs are kept in a small cache keyed by
the content hash of the processed pixels / samples, so an image in the history
of a chat is not encoded again on every turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from gemma4_mlx.media import audio as A
from gemma4_mlx.media import unified as U
from gemma4_mlx.media.image import ImageProcessor, check_budget
from gemma4_mlx.media.rows import AUDIO, IMAGE, VIDEO, MediaRows
from gemma4_mlx.media.video import DEFAULT_NUM_FRAMES, VideoProcessor, read_video_audio
from gemma4_mlx.prompt.tokens import PromptCodec, chat_template_for, encode_prompt, render_user_turn

log = logging.getLogger(__name__)

PLACEHOLDERS = {"image": "<|image|>", "audio": "<|audio|>", "video": "<|video|>"}
BOI, EOI, BOA, EOA = "<|image>", "<image|>", "<|audio>", "<audio|>"
_PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
_KIND_OF = {v: k for k, v in PLACEHOLDERS.items()}
_CODE = {"image": IMAGE, "video": VIDEO, "audio": AUDIO}


class MediaError(ValueError):
    """Media the model cannot take: one line naming the file or argument."""


# -- what a caller passes ---------------------------------------------------------


@dataclass(frozen=True)
class Image:
    source: Any  # path, PIL image or HxWx3 array
    budget: int | None = None  # soft-token budget: 70, 140, 280, 560 or 1120


@dataclass(frozen=True)
class Audio:
    source: Any  # path or 1-D float array
    sampling_rate: int | None = None  # of an array (default 16 kHz)


@dataclass(frozen=True)
class Video:
    source: Any  # path
    budget: int | None = None  # per frame (default 70)
    num_frames: int | None = None  # default: the video processor's (32)
    fps: float | None = None  # sample at this rate instead of a fixed frame count
    with_audio: bool = False  # the soundtrack too, as audio right after the video (E2B/E4B)


def as_media(x, kind: str):
    """Wrap a bare path / array / PIL image as Image, Audio or Video."""
    cls = {"image": Image, "audio": Audio, "video": Video}[kind]
    return x if isinstance(x, cls) else cls(x)


# -- one processed medium -----------------------------------------------------------


@dataclass
class Prepared:
    kind: str  # "image" | "audio" | "video"
    digest: str  # content hash (processed pixels / samples) plus settings
    counts: list[int]  # soft tokens per placeholder run (a video: one run per frame)
    text: str  # what replaces its placeholder in the prompt text
    encode: Callable[[], mx.array] = field(repr=False)  # -> [sum(counts), H_text]


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
    return h.hexdigest()[:32]


def _once(batch, reprocess: Callable, run: Callable) -> Callable[[], mx.array]:
    """An encoder that uses `batch` once and then lets it go: a chat keeps every
    Prepared for its whole history, and float32 pixels are 3-5x the soft tokens.
    After the feature cache evicts the rows, the source is processed again."""
    held = [batch]

    def encode():
        b = held.pop() if held else reprocess()
        return run(b)

    return encode


def _name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


DEFAULT_FEATURES = A.FeatureConfig()  # transformers' Gemma 4 audio front end


class MediaProcessor:
    """Processors plus the model's towers, with an LRU cache of encoded media."""

    def __init__(
        self,
        model,
        image: ImageProcessor | None = None,
        features: A.FeatureConfig | None = DEFAULT_FEATURES,
        video: VideoProcessor | None = None,
        cache_bytes: int = 512 << 20,
    ):
        """features: None when the checkpoint's processor config has no
        `feature_extractor` block: audio is then refused, never ignored (docs/multimodal.md §6.3).
        video: defaults to 32 frames at budget 70 with the image processor's geometry."""
        self.model = model
        self.image = image or ImageProcessor()
        self.features = features
        if video is None:
            video = VideoProcessor(
                num_frames=DEFAULT_NUM_FRAMES,
                patch_size=self.image.patch_size,
                pooling_kernel_size=self.image.pooling_kernel_size,
            )
        self.video = video
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, mx.array] = OrderedDict()

    @classmethod
    def from_folder(cls, model, folder: str | Path | None) -> MediaProcessor:
        """Settings from `processor_config.json` (defaults when the folder has none)."""
        pc = None
        f = Path(folder) / "processor_config.json" if folder is not None else None
        if f is not None and f.exists():
            try:
                pc = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise MediaError(f"{f}: not valid JSON ({e})") from None
            if not isinstance(pc, dict):
                raise MediaError(f"{f}: expected a JSON object, got {type(pc).__name__}")
            pc = {k: v for k, v in pc.items() if v is not None}  # `"video_processor": null` = absent
        if getattr(model, "unified", False):
            try:
                return cls(model, *U.processors(model, pc, f or "processor_config.json"))
            except ValueError as e:
                raise MediaError(str(e)) from None
        vision = getattr(getattr(model, "vision", None), "config", None)
        flat = pc is not None and "patch_size" in pc  # an image processor's own file
        if (pc is None or ("image_processor" not in pc and not flat)) and vision is not None:
            image = ImageProcessor(vision.default_output_length or 280, vision.patch_size, vision.pooling_kernel_size)
        else:
            image = ImageProcessor.from_config(
                pc, {"default_output_length": getattr(vision, "default_output_length", None)}
            )
        if vision is not None and (image.patch_size, image.pooling_kernel_size) != (
            vision.patch_size,
            vision.pooling_kernel_size,
        ):
            raise MediaError(
                f"{f}: patch_size/pooling_kernel_size {image.patch_size}/{image.pooling_kernel_size} "
                f"do not match the vision tower's {vision.patch_size}/{vision.pooling_kernel_size}"
            )
        features = A.FeatureConfig()
        if pc is not None:
            features = A.FeatureConfig.from_dict(pc["feature_extractor"]) if "feature_extractor" in pc else None
        video = VideoProcessor.from_config(pc) if pc and "video_processor" in pc else None
        return cls(model, image, features, video)

    # -- preparing ---------------------------------------------------------------
    def prepare(self, item) -> Prepared:
        if isinstance(item, Image):
            return self._image(item)
        if isinstance(item, Audio):
            return self._audio(item)
        if isinstance(item, Video):
            return self._video(item)
        raise MediaError(f"media: expected Image, Audio or Video, got {type(item).__name__}")

    def _need(self, tower: str, what: str):
        if tower not in self.model:
            raise MediaError(
                f"{what}: this model has no {tower} tower "
                f"({'E2B/E4B only' if tower == 'audio' else 'text-only checkpoint'})"
            )

    def _need_audio(self, what: str):
        """The audio tower and the front end that makes its features."""
        self._need("audio", what)
        if self.features is None:
            raise MediaError(
                f"{what}: the checkpoint's processor_config.json has "
                "no feature_extractor block, so audio cannot be processed"
            )

    def check(self, item, tokenizer) -> None:
        """Refuse a medium at attach time, before any message is sent, for the real
        cause: a path that is no file, a tower the model lacks, audio without a feature
        extractor, a tokenizer without the medium's token.  Reading and decoding the
        file is left to `prepare`."""
        source = item.source
        if isinstance(source, (str, os.PathLike)) and not Path(source).expanduser().is_file():
            raise MediaError(f"{_name(source)}: no such file")
        kinds = {Image: ["image"], Audio: ["audio"], Video: ["video"]}[type(item)]
        if isinstance(item, Video) and item.with_audio:
            kinds.append("audio")  # its soundtrack
        for kind in kinds:
            what = f"{kind} {_name(source)}"
            if kind == "audio":
                self._need_audio(what)
            else:
                self._need("vision", what)
            token, want = PLACEHOLDERS[kind], self.model.media_ids[kind]
            got = tokenizer.convert_tokens_to_ids(token)
            if got is None or got == getattr(tokenizer, "unk_token_id", None):
                raise MediaError(f"{what}: the tokenizer has no {token} token (the model's {kind} token is id {want})")
            if got != want:
                raise MediaError(f"{what}: the tokenizer's {token} is id {got}, the model's {kind} token is id {want}")

    def _image(self, item: Image) -> Prepared:
        self._need("vision", f"image {_name(item.source)}")
        try:
            budget = None if item.budget is None else check_budget(item.budget)
            batch = self.image(item.source, budget)
        except ValueError as e:
            raise MediaError(str(e)) from None
        n = batch.num_soft_tokens[0]
        real = int((batch.position_ids[0, :, 0] >= 0).sum())
        digest = _digest("image", batch.budget, batch.sizes[0], batch.pixel_values[0, :real])
        vision = self.model.vision
        encode = _once(
            batch, lambda: self.image(item.source, budget), lambda b: vision(b.pixel_values, b.position_ids)[0]
        )
        return Prepared("image", digest, [n], BOI + PLACEHOLDERS["image"] * n + EOI, encode)

    def _audio(self, item: Audio) -> Prepared:
        self._need_audio(f"audio {_name(item.source)}")
        cfg = self.features
        try:
            wave = A.load_audio(item.source, item.sampling_rate, cfg)
        except (ValueError, TypeError) as e:
            raise MediaError(str(e)) from None
        frames = isinstance(cfg, U.FrameConfig)  # the 12B: raw waveform frames (docs/unified.md §5)
        n = cfg.num_tokens(len(wave)) if frames else A.num_audio_tokens(len(wave), cfg)
        audio = self.model.audio

        def encode():
            feats, mask = cfg.frames([wave]) if frames else A.log_mel([wave], cfg)
            return audio.soft_tokens(feats, mask)

        return Prepared("audio", _digest("audio", cfg, wave), [n], BOA + PLACEHOLDERS["audio"] * n + EOA, encode)

    def _video(self, item: Video) -> Prepared:
        self._need("vision", f"video {_name(item.source)}")
        try:
            budget = None if item.budget is None else check_budget(item.budget)
            batch = self.video(item.source, num_frames=item.num_frames, fps=item.fps, video_budget=budget)
        except ValueError as e:  # VideoError, budget
            raise MediaError(str(e)) from None
        counts = [batch.num_soft_tokens] * batch.num_frames
        digest = _digest("video", batch.budget, batch.timestamps, batch.pixel_values)
        vision = self.model.vision
        encode = _once(
            batch,
            lambda: self.video(item.source, num_frames=item.num_frames, fps=item.fps, video_budget=budget),
            lambda b: vision(b.pixel_values, b.position_ids)[0],
        )
        return Prepared("video", digest, counts, batch.prompt_text(), encode)

    # -- the prompt --------------------------------------------------------------
    def expand(self, text: str, prepared: list[Prepared]) -> str:
        """Replace the i-th media placeholder of `text` by the i-th medium's runs."""
        found = _PLACEHOLDER_RE.findall(text)
        kinds = [_KIND_OF[p] for p in found]
        if kinds != [p.kind for p in prepared]:
            raise MediaError(
                f"the prompt has {_describe(kinds)} placeholders but {_describe([p.kind for p in prepared])} were given"
            )
        it = iter(prepared)
        return _PLACEHOLDER_RE.sub(lambda m: next(it).text, text)

    def prompt(self, ids: list[int], prepared: list[Prepared]) -> MediaPrompt:
        """Locate each medium's placeholder runs in the token ids."""
        codes = {
            self.model.media_ids["image"]: IMAGE,
            self.model.media_ids["video"]: VIDEO,
            self.model.media_ids["audio"]: AUDIO,
        }
        runs, i = [], 0
        while i < len(ids):
            kind = codes.get(ids[i])
            if kind is None:
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            runs.append((i, j - i, kind))
            i = j
        want = [(_CODE[p.kind], n) for p in prepared for n in p.counts]
        if [(k, n) for _, n, k in runs] != want:
            raise MediaError(
                f"the token ids hold {len(runs)} media runs "
                f"{[n for _, n, _ in runs]}, the media need {[n for _, n in want]}"
            )
        owners = [(p, r) for p in prepared for r in range(len(p.counts))]
        return MediaPrompt(list(ids), runs, owners, self)

    # -- encoding ------------------------------------------------------------------
    def rows(self, p: Prepared) -> mx.array:
        hit = self._cache.get(p.digest)
        if hit is not None:
            self._cache.move_to_end(p.digest)
            return hit
        try:
            rows = p.encode()
            mx.eval(rows)
        except ValueError as e:  # VideoError on a re-read, a tower's input check
            raise MediaError(f"{p.kind}: {e}") from None
        if rows.shape[0] != sum(p.counts):
            raise MediaError(
                f"{p.kind}: the tower returned {rows.shape[0]} soft tokens, "
                f"the prompt holds {sum(p.counts)} placeholders"
            )
        self._cache[p.digest] = rows
        while len(self._cache) > 1 and sum(r.nbytes for r in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return rows


def _describe(kinds: list[str]) -> str:
    if not kinds:
        return "no media"
    return ", ".join(f"{kinds.count(k)} {k}" for k in ("image", "audio", "video") if k in kinds)


@dataclass
class MediaPrompt:
    """Token ids with their media runs; `rows(start)` encodes only what a prefill
    from `start` on needs."""

    ids: list[int]
    runs: list[tuple[int, int, int]]  # (start, length, kind) in sequence order
    owners: list[tuple[Prepared, int]]  # per run: its medium and the run's index in it
    processor: MediaProcessor = field(repr=False)

    def keys(self) -> list:
        """Per position: the token id, or (content hash, run, index) at placeholders,
        so a cached prefix is reused only where the same media sit."""
        keys: list = list(self.ids)
        for (start, n, _), (p, r) in zip(self.runs, self.owners):
            for j in range(n):
                keys[start + j] = (p.digest, r, j)
        return keys

    def rows(self, start: int = 0) -> MediaRows | None:
        """MediaRows of positions start.. (re-indexed from start), or None."""
        needed = [(run, own) for run, own in zip(self.runs, self.owners) if run[0] + run[1] > start]
        if not needed:
            return None
        parts, runs = [], []
        for (s, n, kind), (p, r) in needed:
            first = sum(p.counts[:r])
            rows = self.processor.rows(p)[first : first + n]
            if s < start:  # the run began in the cached prefix: only its tail is new
                rows, n, s = rows[start - s :], n - (start - s), start
            parts.append(rows)
            runs.append((s - start, n, kind))
        return MediaRows.from_runs(runs, mx.concatenate(parts, axis=0))


def processor_for(model) -> MediaProcessor:
    """The model's MediaProcessor (one per model, so its feature cache is shared)."""
    mp = getattr(model, "_media_processor", None)
    if mp is None:
        mp = MediaProcessor.from_folder(model, getattr(model, "folder", None))
        model._media_processor = mp
    return mp


def has_media(images=(), audio=(), videos=()) -> bool:
    """Whether any medium is given (arrays are not asked for their truth value)."""
    return any(_listify(x) for x in (images, audio, videos))


def _listify(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def media_items(images=(), audio=(), videos=(), image_budget: int | None = None) -> list:
    """Wrap bare sources (paths, arrays, PIL images) in order: images, audio, videos.
    image_budget applies to images and video frames that do not set their own."""
    out = []
    for kind, xs in (("image", images), ("audio", audio), ("video", videos)):
        for x in _listify(xs):
            m = as_media(x, kind)
            if kind != "audio" and m.budget is None and image_budget is not None:
                m = (
                    Image(m.source, image_budget)
                    if kind == "image"
                    else Video(m.source, image_budget, m.num_frames, m.fps, m.with_audio)
                )
            out.append(m)
            if kind == "video" and m.with_audio:
                out += soundtrack(m.source)
    return out


def soundtrack(source) -> list[Audio]:
    """A video's soundtrack as audio clips of at most 30 s each (the audio tower's
    limit; transformers' processor would cut it at 30 s), placed right after the
    video as transformers' `load_audio_from_video` does.  No audio stream: none."""
    try:
        wave = read_video_audio(source)
    except ValueError as e:
        raise MediaError(str(e)) from None
    if wave is None:
        return []
    step = A.MAX_SAMPLES
    return [Audio(wave[a : a + step]) for a in range(0, len(wave), step) if len(wave) - a >= A.MIN_SAMPLES]


def user_content(text: str | None, items: list) -> list[dict] | str:
    """A user turn's content: one part per medium, then the text (transformers' order)."""
    if not items:
        return text or ""
    kinds = {Image: "image", Audio: "audio", Video: "video"}
    parts = [{"type": kinds[type(m)]} for m in items]
    if text:
        parts.append({"type": "text", "text": text})
    return parts


def media_prompt(
    model,
    tokenizer,
    prompt,
    images=(),
    audio=(),
    videos=(),
    *,
    chat: bool = True,
    image_budget: int | None = None,
    processor: MediaProcessor | None = None,
):
    """(ids, MediaRows) for one prompt with media (`media_prompt_keyed`'s rows)."""
    ids, mprompt = media_prompt_keyed(
        model, tokenizer, prompt, images, audio, videos, chat=chat, image_budget=image_budget, processor=processor
    )
    return ids, mprompt.rows(0)


def media_prompt_keyed(
    model,
    tokenizer,
    prompt,
    images=(),
    audio=(),
    videos=(),
    *,
    chat: bool = True,
    image_budget: int | None = None,
    processor: MediaProcessor | None = None,
):
    """(ids, MediaPrompt) for one prompt with media: its `keys()` name each cached
    slot (a prompt cache reuses a prefix by them), `rows(start)` feed the model.

    A text prompt goes through the chat template with the media before the text
    (with chat=False the placeholders are prepended unless the text has them);
    token ids must already hold the expanded runs."""
    mp = processor or processor_for(model)
    items = media_items(images, audio, videos, image_budget)
    prepared = [mp.prepare(m) for m in items]
    if isinstance(prompt, str):
        template = chat_template_for(tokenizer) if chat else None
        if template:
            codec = PromptCodec(tokenizer)  # typed `<|image|>` text stays text
            text = render_user_turn(codec, template, user_content(prompt, items))
            ids = codec.encode(mp.expand(text, prepared))
        else:
            if not _PLACEHOLDER_RE.search(prompt):  # raw text (as `encode_prompt` without a template): media first
                prompt = "".join(PLACEHOLDERS[p.kind] for p in prepared) + prompt
            ids = encode_prompt(tokenizer, mp.expand(prompt, prepared), chat=False)  # adds a missing BOS
    else:
        ids = list(prompt)
    return ids, mp.prompt(ids, prepared)
