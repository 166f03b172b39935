"""serve --distributed's job specs (server/follow.py): what rank 0 sends is JSON data
from which another rank rebuilds the same job; what cannot be sent is refused as a 400.
(The two-rank server itself runs in test_distributed.py.)"""

from __future__ import annotations

import json

import pytest

from gemma4_mlx.api import SamplingOptions, load
from gemma4_mlx.batching import Job
from gemma4_mlx.batching.thinking import ThinkingBudget
from gemma4_mlx.chat.conversation import stop_ids
from gemma4_mlx.constrain import bind, json_schema
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.server.errors import APIError
from gemma4_mlx.server.follow import job_from_spec, job_spec


@pytest.fixture(scope="module")
def demo():
    return load(str(DEMO_MODEL))


def test_a_job_travels_as_json_and_comes_back_the_same(demo):
    model, tokenizer = demo
    grammar = json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    constraint = bind(grammar, tokenizer, model.config.vocab_size, stop_ids(model, tokenizer)).thought_optional(7, 8)
    options = SamplingOptions(
        temperature=0.7, top_k=20, presence_penalty=0.5, logit_bias={5: -2.5}, constraint=constraint
    )
    thinking = ThinkingBudget(12, 4, 8)
    job = Job(
        [5, 6, 7], [5, 6, 7], options=options, max_tokens=9, stop_ids=frozenset({1}), logprobs=2, thinking=thinking
    )
    spec = json.loads(json.dumps(job_spec(job, 3)))
    again = job_from_spec(spec, tokenizer)
    assert spec["id"] == 3 and again.ids == job.ids and again.keys == job.keys
    assert again.sampler.seed == job.sampler.seed  # rank 0's draw for an unseeded request
    assert (again.max_tokens, again.stop_ids, again.logprobs, again.thinking) == (9, frozenset({1}), 2, thinking)
    for name in ("temperature", "top_k", "presence_penalty", "logit_bias"):
        assert getattr(again.options, name) == getattr(options, name)
    assert again.options.constraint.grammar == grammar
    assert again.options.constraint.stop_ids == constraint.stop_ids
    assert (again.options.constraint.after, again.options.constraint.opener) == (8, 7)  # an optional thought


def test_media_requests_are_refused_with_a_400():
    job = Job([5, 6], [5, "image:abc"], media=object())
    with pytest.raises(APIError, match="images and audio are not served with --distributed yet") as e:
        job_spec(job, 0)
    assert e.value.status == 400
