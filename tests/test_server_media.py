"""Images and audio through the live server on a tiny multimodal checkpoint (real
`openai` client): a data-URI image and a base64 WAV clip give what `Chat.send` gives
with the same media, and a follow-up turn reuses the cached prefix, media included."""

from __future__ import annotations

import base64
import io
import wave

import numpy as np
import openai
import pytest
from PIL import Image

from gemma4_mlx import load
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.runtime.generate import SamplingOptions

from helpers.live_server import live_server
from helpers.mm_configs import write_chat_checkpoint

NAME = "tiny-mm"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(write_chat_checkpoint(tmp_path_factory.mktemp("mm_serve")), dtype="float32")


@pytest.fixture(scope="module")
def oa(loaded):
    model, tok = loaded
    with live_server(model, tok, model_name=NAME) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def tone(n: int = 8000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)


def image_part() -> dict:
    buf = io.BytesIO()
    picture().save(buf, format="PNG")
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
    }


def audio_part() -> dict:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((tone() * 32767).astype("<i2").tobytes())
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"}}


def test_image_and_audio_equal_chat_and_reuse_the_prefix(loaded, oa):
    model, tok = loaded
    content = [image_part(), audio_part(), {"type": "text", "text": "what is it?"}]
    msgs = [{"role": "user", "content": content}]
    r = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=6)
    chat = Chat(model, tok, max_tokens=6, options=SamplingOptions())
    # the WAV holds 16-bit samples: the same rounding as the clip the server decoded
    want = chat.send("what is it?", images=[picture()], audio=[np.round(tone() * 32767) / 32768])
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens > 40  # image and audio soft tokens are in the prompt
    msgs += [{"role": "assistant", "content": r.choices[0].message.content}, {"role": "user", "content": "and?"}]
    again = oa.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=6)
    assert again.usage.prompt_tokens_details.cached_tokens > r.usage.prompt_tokens - 8
    assert again.choices[0].message.content == chat.send("and?").text


def test_undecodable_audio_is_a_400(oa):
    bad = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(b"RIFF....WAVEjunk").decode(), "format": "wav"},
    }
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=NAME, messages=[{"role": "user", "content": [bad]}], max_tokens=2)
    assert "undecodable audio" in str(e.value)
