"""Thinking budgets in tokens (docs/serving.md §2.3, `batching.thinking`): Anthropic's
`thinking.budget_tokens` and the server's `thinking_tokens` close the thought after
that many tokens and the answer follows in the same reply; the cut thought is the
start of the uncut one; alone, batched and with the drafter the output is the same."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest

import gemma4_mlx
from gemma4_mlx.api import SamplingOptions
from gemma4_mlx.batching import Job, Scheduler
from gemma4_mlx.batching.thinking import ThinkingBudget, ThoughtCount
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.server.prompts import Conversation, Prompter

from helpers.live_server import live_server

NAME = "gemma4-demo"
JAPAN = [{"role": "user", "content": "What is the capital of Japan?"}]
OPEN, CLOSE = 5, 6


def test_counts_and_rules():
    b = ThinkingBudget(3, OPEN, CLOSE)
    assert b.at_start([1, OPEN, 2, CLOSE, 9]) == ThoughtCount(False, 0)
    assert b.at_start([1, OPEN, 2, CLOSE, OPEN, 7]) == ThoughtCount(True, 0)  # the template opened it
    count = b.after(ThoughtCount(), [9, OPEN, 1, 2, CLOSE, 3, OPEN, 4])
    assert count == ThoughtCount(True, 3) and b.binds(count)
    assert b.after(ThoughtCount(), [OPEN, OPEN, OPEN]) == ThoughtCount(True, 2)  # an opening inside one counts
    assert not b.binds(b.after(count, [CLOSE])) and not b.binds(ThoughtCount(True, 2))
    assert b.binds(b.after(count, [CLOSE, OPEN]))  # a thought opened once it is spent closes at once
    # a verified row: position t follows drafts[:t]; only bound positions are masked
    masks = b.masks(ThoughtCount(True, 1), [1, 2, CLOSE, OPEN], 5, 8)
    allowed = [[i for i, v in enumerate(row) if v == 0] for row in masks.tolist()]
    assert allowed == [list(range(8)), list(range(8)), [CLOSE], list(range(8)), [CLOSE]]
    assert b.masks(ThoughtCount(True, 0), [1], 2, 8) is None
    with pytest.raises(ValueError, match="thinking budget tokens -1"):
        ThinkingBudget(-1, OPEN, CLOSE)
    with pytest.raises(ValueError, match="thinking budget open_id None"):
        ThinkingBudget(3, None, CLOSE)


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module")
def an(demo):
    with live_server(*demo, model_name=NAME) as (url, _):
        yield anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)


def _ask(client, budget: int | None = None, **kw):
    """(thinking, text) of a greedy reply with thinking on."""
    thinking = {"type": "enabled", "budget_tokens": budget} if budget is not None else {"type": "enabled"}
    r = client.messages.create(
        model=NAME, max_tokens=120, messages=JAPAN, thinking=thinking, extra_body={"temperature": 0}, **kw
    )
    return (
        "".join(b.thinking for b in r.content if b.type == "thinking"),
        "".join(b.text for b in r.content if b.type == "text"),
    )


def test_budget_tokens_cut_the_thought_and_the_answer_follows(an):
    whole, answer = _ask(an)
    assert len(whole) > 30 and "Tokyo" in answer
    short, after = _ask(an, 8)
    assert 0 < len(short) < len(whole) and whole.startswith(short) and after  # the start of the same thought
    assert _ask(an, 100000) == (whole, answer)  # a budget it does not reach changes nothing
    none, direct = _ask(an, 0)
    assert none == "" and "Tokyo" in direct  # no thought opens at all


def test_the_server_limit_holds_with_thinking_off_too(demo):
    """A model may open a thought on its own with thinking off: the server's limit
    (and a request's budget of 0) still bounds it."""
    prompter = Prompter(*demo, thinking_tokens=8)
    off = prompter.chat_request(Conversation(JAPAN), SamplingOptions(), 50, None)
    on = prompter.chat_request(Conversation(JAPAN, thinking=True, thinking_tokens=3), SamplingOptions(), 50, None)
    assert (off.thinking.tokens, on.thinking.tokens) == (8, 3)
    assert Prompter(*demo).chat_request(Conversation(JAPAN), SamplingOptions(), 50, None).thinking is None
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(ValueError, match="thinking_tokens"):  # at start, not a 500 on every request
            Prompter(*demo, thinking_tokens=bad)


def test_a_thought_the_model_opens_itself_is_bounded(demo):
    """The budget does not depend on the prompt asking for thoughts: a row whose model
    keeps opening them (a bias on `<|channel>` here) gets at most N tokens in each."""
    model, tok = demo
    open_id, close_id = (tok.convert_tokens_to_ids(t) for t in ("<|channel>", "<channel|>"))
    ids = tok.encode("Hi", add_special_tokens=False)
    options = SamplingOptions(logit_bias={open_id: 40.0})
    job = Job(ids, list(ids), options=options, max_tokens=12, thinking=ThinkingBudget(2, open_id, close_id))
    scheduler = Scheduler(model)
    scheduler.add(job)
    while scheduler.busy:
        scheduler.step()
    inside, runs = False, []  # the tokens of each thought after its opening (more openings count)
    for t in job.out:
        if t == open_id and not inside:
            inside, runs = True, runs + [0]
        elif t == close_id:
            inside = False
        elif inside:
            runs[-1] += 1
    assert job.out[:4] == [open_id, open_id, open_id, close_id] and runs and max(runs) == 2


def test_a_zero_budget_keeps_forced_tools_and_formats(an):
    """Budget 0 is thinking off: a grammar that would start after the thought (forced
    tools, a response format) starts with the reply instead of never."""
    weather = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    off = an.messages.create(model=NAME, max_tokens=1, messages=JAPAN, tools=[weather], tool_choice={"type": "any"})
    off = off.usage.input_tokens + off.usage.cache_read_input_tokens
    for budget in (None, 0, 5):
        thinking = {"type": "enabled"} | ({} if budget is None else {"budget_tokens": budget})
        r = an.messages.create(
            model=NAME,
            max_tokens=120,
            messages=JAPAN,
            thinking=thinking,
            tools=[weather],
            tool_choice={"type": "any"},
            extra_body={"temperature": 0},
        )
        assert r.stop_reason == "tool_use" and r.content[-1].type == "tool_use", budget
        assert any(b.type == "thinking" for b in r.content) == (budget != 0)
        prompt = r.usage.input_tokens + r.usage.cache_read_input_tokens
        assert (prompt == off) == (budget == 0)  # rendered with thinking off: no <|think|> in the prompt
        counted = an.messages.count_tokens(model=NAME, messages=JAPAN, thinking=thinking, tools=[weather])
        assert counted.input_tokens == prompt  # counted as it is rendered


def test_batched_and_speculative_replies_keep_their_budgets(demo, an):
    budgets = [3, 8, 20, None]
    alone = [_ask(an, b) for b in budgets]
    with ThreadPoolExecutor(len(budgets)) as pool:
        assert list(pool.map(lambda b: _ask(an, b), budgets)) == alone
    drafter = gemma4_mlx.load_drafter(DEMO_DRAFTER)
    with live_server(*demo, model_name=NAME, drafter=drafter, draft_tokens=4) as (url, _):
        fixed = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert [_ask(fixed, b) for b in budgets] == alone  # a fixed K: drafts past the budget are rejected
    with live_server(*demo, model_name=NAME, drafter=drafter, thinking_tokens=8) as (url, _):
        capped = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert _ask(capped) == _ask(capped, 1000) == alone[1]  # the server's 8 is the lower
        assert _ask(capped, 3) == alone[0]  # the request's lower budget wins
        oa = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        ask = dict(model=NAME, messages=JAPAN, reasoning_effort="high", max_tokens=120)
        greedy = oa.chat.completions.create(temperature=0, **ask)
        # counted while the thought is open: its 8 tokens, then the forced <channel|>
        assert greedy.usage.completion_tokens_details.reasoning_tokens == 8 + 1
        assert greedy.choices[0].message.model_extra["reasoning_content"] == alone[1][0]
        sampled = oa.chat.completions.create(temperature=1.0, seed=5, n=2, **ask)
        assert sampled.usage.completion_tokens_details.reasoning_tokens == 2 * (8 + 1)  # both choices, each cut
    plain = openai.OpenAI(base_url=str(an.base_url).rstrip("/") + "/v1", api_key="x", max_retries=0, timeout=60)
    ask = dict(model=NAME, messages=JAPAN, reasoning_effort="high", max_tokens=120, temperature=0)
    for budget, (thought, answer) in ((3, alone[0]), (8, alone[1])):  # vLLM's thinking_token_budget
        r = plain.chat.completions.create(extra_body={"thinking_token_budget": budget}, **ask)
        message = r.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (thought, answer)
        effort, extra = {"effort": "high"}, {"thinking_token_budget": budget}
        r = plain.responses.create(model=NAME, input=JAPAN, reasoning=effort, temperature=0, extra_body=extra)
        assert (r.output[0].content[0].text, r.output_text) == (thought, answer)
