"""Continuous batching behind the HTTP API, driven by the real `openai` client: 16
concurrent streaming greedy clients each get exactly what the same request gets
served alone — with and without the drafter —, and a client that leaves mid-stream
frees its row while the others finish unchanged (docs/serving.md)."""

from __future__ import annotations

import asyncio

import openai
import pytest

import gemma4_mlx
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL

from helpers.live_server import live_server, wait_idle

NAME = "gemma4-demo"
PLACES = ["Japan", "Peru", "France", "Kenya", "Chile", "Egypt", "Italy", "Spain"]
REQUESTS = [
    (f"What is the capital of {PLACES[i % 8]}?" + (" Answer briefly." if i >= 8 else ""), 6 + (i * 7) % 29)
    for i in range(16)
]


@pytest.fixture(scope="module")
def demo():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    return model, tok, gemma4_mlx.load_drafter(DEMO_DRAFTER, target=model)


async def _stream(client, question: str, max_tokens: int) -> str:
    stream = await client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return text


async def _leave_early(client) -> str:
    """A raw completion that would run for 400 tokens; the client leaves after 3 chunks."""
    stream = await client.completions.create(
        model=NAME, prompt="The capital", max_tokens=400, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = 0
    async for _ in stream:
        chunks += 1
        if chunks >= 3:
            await stream.close()
            break
    return ""


async def _all(url: str, requests, leave: int | None = None) -> list[str]:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        jobs = [_leave_early(client) if i == leave else _stream(client, q, n) for i, (q, n) in enumerate(requests)]
        return await asyncio.gather(*jobs)


def _alone(url: str) -> list[str]:
    return [asyncio.run(_all(url, [r]))[0] for r in REQUESTS]


@pytest.mark.parametrize("with_drafter", [False, True])
def test_concurrent_clients_get_what_they_get_alone(demo, with_drafter, monkeypatch):
    model, tok, drafter = demo
    options = dict(model_name=NAME, max_batch=8, max_queue=32)
    with live_server(model, tok, drafter=drafter if with_drafter else None, **options) as (url, api):
        engine = api.state.server.engine
        alone = _alone(url)
        together = asyncio.run(_all(url, REQUESTS))
        assert together == alone
        assert engine.scheduler.peak_batch >= 4  # they really ran together
        if with_drafter:
            assert engine.scheduler.rounds < sum(len(tok.encode(t)) for t in alone)  # drafts were accepted
        # one client leaves after three chunks: its row is freed, the others are unchanged
        dropped = []
        drop = engine.scheduler.drop
        monkeypatch.setattr(engine.scheduler, "drop", lambda job: (dropped.append(job), drop(job)))
        left = asyncio.run(_all(url, REQUESTS, leave=5))
        assert [t for i, t in enumerate(left) if i != 5] == [t for i, t in enumerate(alone) if i != 5]
        assert wait_idle(engine) == 0 and not engine.scheduler.busy
        assert len(dropped) == 1 and len(dropped[0].out) < 200  # long before its 400 tokens
