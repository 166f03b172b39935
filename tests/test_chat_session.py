"""Chat sessions: KV cache reused across turns (exactly), thinking, the tool loop,
on the embedded demo model."""

import threading

import mlx.core as mx
import pytest

import gemma4_mlx
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.demo import DEMO_MODEL

from helpers.checkpoints import max_diff


@pytest.fixture(scope="module")
def demo():
    model, tokenizer = gemma4_mlx.load(DEMO_MODEL)
    return model, tokenizer


def assert_cache_is_exact(chat: Chat, probe: int = 40):
    """Feeding one token to the session cache equals a fresh forward of everything."""
    got = chat.model(mx.array([[probe]]), chat.cache)[0, -1]
    want = chat.model(mx.array([chat.cached + [probe]]))[0, -1]
    assert max_diff(got, want) < 1e-4
    for c in chat.cache:  # leave the cache as it was
        if c is not None:
            c.trim(1)


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("thinking", [False, True])
def test_turns_prefill_only_what_is_new(demo, thinking):
    model, tok = demo
    chat = Chat(model, tok, thinking=thinking, max_tokens=64)
    questions = [
        "What is the capital of France?",
        "What is 3 plus 4?",
        "Hello",
        "What is the capital of Peru?",
        "Add 12 and 9.",
    ]
    for q in questions:
        before = list(chat.cached)
        chat.messages.append({"role": "user", "content": q})
        ids = tok.encode(chat.prompt_text(), add_special_tokens=False)
        chat.messages.pop()
        reply = chat.send(q)
        assert reply.text  # the demo model answers
        shared = common_prefix(before, ids)
        assert chat.prefilled_last == len(ids) - shared
        if not thinking:
            # everything cached is reused; only the new turn
            # (`<turn|>\n<|turn>user\n...<|turn>model\n`) is prefilled
            assert shared == len(before) and chat.prefilled_last < 30
        assert_cache_is_exact(chat)
    assert len(chat.cached) > 2 * model.config.sliding_window  # well past the window


def test_thinking_and_answers(demo):
    model, tok = demo
    chat = Chat(model, tok, thinking=True)
    reply = chat.send("What is the capital of Japan?")
    assert "Tokyo" in reply.text and reply.thinking
    assert "<|channel>" not in reply.text and "thought" not in reply.text[:8]
    plain = Chat(model, tok).send("What is the capital of Japan?")
    assert plain.text == "The capital of Japan is Tokyo." and plain.thinking == ""


def test_tool_loop_calls_python_function(demo):
    model, tok = demo
    calls = []

    def get_weather(city: str) -> dict:
        """Get the current weather in a city.

        Args:
            city: City name
        """
        calls.append(city)
        return {"temperature": 21, "condition": "sunny"}

    chat = Chat(model, tok, tools=[get_weather])
    reply = chat.run("What's the weather in Paris?")
    assert calls == ["Paris"]
    assert "21" in reply.text and "Paris" in reply.text
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    assert_cache_is_exact(chat)

    declined = Chat(model, tok, tools=[get_weather])
    declined.run("What's the weather in Oslo?", confirm=lambda call: False)
    assert calls == ["Paris"]  # not run without confirmation


def test_media_is_refused_clearly(demo):
    model, tok = demo
    chat = Chat(model, tok)
    with pytest.raises(ValueError, match="x.png: this model has no vision tower"):
        chat.send("describe", images=["x.png"])
    with pytest.raises(ValueError, match="no audio tower"):
        chat.send("describe", audio=[[0.0] * 1600])
    assert chat.messages == []


def test_save(demo, tmp_path):
    import json

    model, tok = demo
    chat = Chat(model, tok, system="Answer briefly.")
    chat.send("Hello")
    chat.save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["system"] == "Answer briefly." and data["messages"][0]["content"] == "Hello"


def test_thinking_budget_closes_the_thought_and_answers(demo):
    model, tok = demo
    full_chat = Chat(model, tok, thinking=True)
    full = full_chat.send("What is the capital of Japan?")
    chat = Chat(model, tok, thinking=True, thinking_budget=12)
    reply = chat.send("What is the capital of Japan?")
    assert len(reply.thinking) <= 12 < len(full.thinking)
    assert "Tokyo" in reply.text
    # the rest of the thought was never generated: `<channel|>` was injected early.  (The
    # stats count every sampled token: the tiny demo model, cut off, goes on writing its
    # thought as answer text, so the total is no shorter; where the channel closes is.)
    close, n = tok.convert_tokens_to_ids("<channel|>"), reply.stats.prompt_tokens
    assert reply.stats.prompt_tokens == full.stats.prompt_tokens
    assert chat.cached[n:].index(close) < full_chat.cached[n:].index(close) - 5
    assert_cache_is_exact(chat)


@pytest.fixture(scope="module")
def demo_drafter(demo):
    from gemma4_mlx.checkpoint.load import load_drafter
    from gemma4_mlx.demo import DEMO_DRAFTER

    return load_drafter(DEMO_DRAFTER, target=demo[0])


@pytest.mark.parametrize("thinking,budget", [(False, None), (True, None), (True, 12)])
def test_chat_with_the_demo_drafter_gives_the_same_replies(demo, demo_drafter, thinking, budget):
    """Speculative turns (real acceptance: the demo drafter was trained for this
    target) leave the reply and the session cache exactly as plain decoding does."""
    model, tok = demo
    plain = Chat(model, tok, thinking=thinking, thinking_budget=budget, max_tokens=64)
    spec = Chat(
        model, tok, thinking=thinking, thinking_budget=budget, max_tokens=64, drafter=demo_drafter, draft_tokens=3
    )
    for q in ["What is the capital of France?", "What is 3 plus 4?", "Add 12 and 9."]:
        a, b = plain.send(q), spec.send(q)
        assert (b.text, b.thinking) == (a.text, a.thinking)
        assert spec.cached == plain.cached
        assert_cache_is_exact(spec)
        assert b.stats.speculative.tokens_per_round > 2.0  # the drafter really helps


def test_an_unfinished_stream_ends_when_the_next_turn_starts(demo):
    """An app that keeps a stream's iterator and sends the next turn (or presses stop)
    gets the partial reply recorded in order, not after the next turn's reply."""
    model, tok = demo
    chat = Chat(model, tok)
    kept = chat.stream("What is the capital of Spain?")
    partial = next(kept).text + next(kept).text
    chat.send("What is the capital of Japan?")
    roles = [(m["role"], m["content"]) for m in chat.messages]
    assert roles[:3] == [("user", "What is the capital of Spain?"), ("assistant", partial), ("user", roles[2][1])]
    assert roles[3] == ("assistant", "The capital of Japan is Tokyo.") and list(kept) == []
    stopped = chat.stream("What is the capital of Peru?")
    first = next(stopped).text
    chat.stop()
    assert chat.messages[-1] == {"role": "assistant", "content": first} and list(stopped) == []
    assert chat.prompt_text().count("<|turn>model\n") == 4  # each reply its own turn, then the next


def test_reused_prompt_tokens_are_reported(demo):
    """A turn's stats count the prompt tokens its cache already held (earlier turns),
    as stream_generate counts a prompt cache file's."""
    model, tok = demo
    chat = Chat(model, tok)
    first = chat.send("What is the capital of Japan?").stats
    second = chat.send("And of France?").stats
    assert first.prompt_cached == 0 and second.prompt_cached > first.prompt_tokens
    assert second.prompt_tokens == chat.prefilled_last  # and only the new turn was prefilled


def test_stop_from_another_thread_ends_the_reply_where_it_is_read(demo):
    """A UI's stop button runs on another thread than the loop reading the stream: it
    asks, and the reading thread ends the reply after the token it is on (closing the
    generator from there raised or ran MLX work on the UI thread)."""
    model, tok = demo
    full = Chat(model, tok).send("Hello").text
    chat = Chat(model, tok)
    stream, seen = chat.stream("Hello"), []
    seen.append(next(stream))
    button = threading.Thread(target=chat.stop)  # does no MLX work: it only asks
    button.start()
    button.join()
    seen += list(stream)
    text = "".join(e.text for e in seen if e.type == "content")
    assert seen[-1].type == "reply" and seen[-1].reply.text == text == chat.messages[-1]["content"]
    assert 0 < len(text) < len(full) and full.startswith(text)
