"""A checkpoint's `generation_config.json` as the server's sampling defaults: read at
load (bad fields left out with a warning), used for what a request leaves out, never
over what it gives."""

from __future__ import annotations

import json
import logging
import shutil

import openai
import pytest

import gemma4_mlx
from gemma4_mlx.checkpoint.generation import GenerationDefaults, read_generation_defaults
from gemma4_mlx.demo import DEMO_MODEL

from helpers.live_server import live_server

NAME = "gemma4-demo"


@pytest.mark.parametrize(
    ("content", "want"),
    [
        ({"temperature": 1.0, "top_p": 0.95, "top_k": 64}, GenerationDefaults(1.0, 0.95, 64)),
        ({"do_sample": False, "top_k": 64}, GenerationDefaults(temperature=0.0, top_k=64)),
        ({"temperature": "hot", "top_p": 3, "top_k": 2.5, "min_p": 0.1}, GenerationDefaults(min_p=0.1)),
        ({"repetition_penalty": -1, "bos_token_id": 2}, GenerationDefaults()),
        ([1, 2], GenerationDefaults()),
        ("{not json", GenerationDefaults()),
    ],
)
def test_read_generation_defaults(tmp_path, caplog, content, want):
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "generation_config.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        assert read_generation_defaults(tmp_path) == want
    bad = content in ([1, 2], "{not json") or (isinstance(content, dict) and "hot" in content.values())
    assert bool(caplog.records) == bad or "repetition_penalty" in text
    assert read_generation_defaults(tmp_path / "none") == GenerationDefaults()


def test_load_reads_the_checkpoints_file(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, folder)
    (folder / "generation_config.json").write_text(json.dumps({"top_k": 64, "top_p": 0.95}))
    model, _ = gemma4_mlx.load(folder)
    assert model.generation_defaults == GenerationDefaults(top_p=0.95, top_k=64)


def test_the_server_uses_them_where_a_request_is_silent():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    kw = dict(model=NAME, prompt="The capital", max_tokens=16, extra_body={"ignore_eos": True})
    model.generation_defaults = GenerationDefaults(temperature=0.0)  # as `do_sample: false` gives
    with live_server(model, tok, model_name=NAME) as (url, _):
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
        greedy = oa.completions.create(temperature=0, **kw).choices[0].text
        assert [oa.completions.create(**kw).choices[0].text for _ in range(2)] == [greedy, greedy]
        sampled = {oa.completions.create(temperature=1.5, **kw).choices[0].text for _ in range(3)}
        assert len(sampled) > 1  # the request's own temperature wins
