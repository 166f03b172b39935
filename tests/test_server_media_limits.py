"""Media a request may bring (server/prompts.py): images are refused from their headers
once the request's decoded pixels would pass its budget, at most MAX_MEDIA items per
request, and images are read upright (EXIF orientation), as the CLI reads files and
transformers reads base64 images."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.server import prompts
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.prompts import Prompter


@pytest.fixture(scope="module")
def prompter():
    return Prompter(*gemma4_mlx.load(DEMO_MODEL))


def _uri(img: Image.Image, **save) -> str:
    buf = io.BytesIO()
    img.save(buf, format=save.pop("format", "PNG"), **save)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_request_pixel_budget(prompter, monkeypatch):
    monkeypatch.setattr(prompts, "MAX_REQUEST_PIXELS", 1000)
    media = []
    prompter.add_image(media, _uri(Image.new("RGB", (20, 20))), "m[0]")
    prompter.add_image(media, _uri(Image.new("RGB", (20, 20))), "m[1]")
    with pytest.raises(APIError) as e:  # 800 used, 200 left
        prompter.add_image(media, _uri(Image.new("RGB", (20, 20))), "m[2]")
    assert e.value.status == 400 and e.value.message.startswith("m[2]: undecodable image")
    assert "20x20 pixels is more than the 200 left of this request's 1000 image pixels" in e.value.message
    assert len(media) == 2


def test_media_count_per_request(prompter, monkeypatch):
    monkeypatch.setattr(prompts, "MAX_MEDIA", 2)
    media = []
    for i in range(2):
        prompter.add_image(media, _uri(Image.new("RGB", (4, 4))), f"m[{i}]")
    with pytest.raises(APIError, match=r"m\[2\]: more than 2 images and audio clips in one request"):
        prompter.add_image(media, _uri(Image.new("RGB", (4, 4))), "m[2]")


def test_images_are_read_upright(prompter):
    """EXIF orientation 6 (rotate 90 degrees): a 30x10 photo is seen 10x30."""
    exif = Image.Exif()
    exif[0x0112] = 6
    media = []
    prompter.add_image(media, _uri(Image.new("RGB", (30, 10)), format="JPEG", exif=exif), "m[0]")
    assert media[0][1].size == (10, 30)
