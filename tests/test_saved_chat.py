"""Saved chats read back (`chat.saved.read_chat`): a file a user may have edited, so
whatever `Chat` could not render or would render wrongly is one line naming it."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import gemma4_mlx
from gemma4_mlx.cache.disk import FORMAT, CacheFileError
from gemma4_mlx.chat.saved import read_chat, save_chat
from gemma4_mlx.cli import app
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.template import tool_result_content


def test_saved_chat_with_image_url_parts_is_refused(tmp_path):
    path = tmp_path / "chat.json"
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    path.write_text(json.dumps({"system": None, "messages": [{"role": "user", "content": [part]}]}))
    with pytest.raises(ValueError, match="media"):
        read_chat(path, None, None, None)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "content": [5]}, r"messages\[0\]\.content"),
        ({"role": "user", "content": {"a": 1}}, r"messages\[0\]\.content"),
        ({"role": 5, "content": "hi"}, r"messages\[0\]\.role"),
        ("hi", r"messages\[0\] is not an object"),
    ],
)
def test_saved_chat_with_malformed_messages_is_refused(tmp_path, message, field):
    """A saved chat is a file a user may have edited: a message `Chat` cannot render is
    one line naming it (content [5] rendered as an empty turn; role 5 raised later)."""
    path = tmp_path / "chat.json"
    path.write_text(json.dumps({"system": None, "messages": [message]}))
    with pytest.raises(ValueError, match=rf"chat\.json: malformed saved chat \({field}"):
        read_chat(path, None, None, None)


def test_saving_over_a_file_that_is_not_a_chat_is_refused(tmp_path):
    """`/save notes.txt` replaced the user's notes with chat JSON, silently."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    data = {"system": None, "thinking": False, "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValueError, match=r"notes.txt: exists and is not a saved chat; not overwritten"):
        save_chat(notes, data)
    assert notes.read_text() == "my precious notes"
    chat = tmp_path / "chat.json"
    save_chat(chat, data)
    save_chat(chat, dict(data, messages=[*data["messages"], {"role": "assistant", "content": "hello"}]))
    assert len(read_chat(chat, None, None, None).data["messages"]) == 2  # a chat is replaced, as before


def test_tool_results_json_cannot_hold_are_written_as_text():
    """A tool returning {("paris", "today"): "sunny"} crashed the chat (json.dumps)."""
    assert tool_result_content({("paris", "today"): "sunny"}) == "{('paris', 'today'): 'sunny'}"
    loop = []
    loop.append(loop)
    assert tool_result_content(loop) == "[[...]]"
    assert tool_result_content({"ok": 1}) == '{"ok": 1}'


def test_deeply_nested_saved_chats_are_one_line(tmp_path):
    """100,000 nested lists raised RecursionError out of json.loads (JSON chat, or a
    cache file's chat metadata)."""
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000)
    with pytest.raises(ValueError, match=r"deep.json: not a saved chat \(") as e:
        read_chat(deep, None, None, None)
    assert "\n" not in str(e.value)
    header = json.dumps({"__metadata__": {"format": FORMAT, "extra": "[" * 100_000}}).encode()
    cached = tmp_path / "deep.kv"
    cached.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CacheFileError, match=r"deep.kv: malformed saved chat \(metadata\)"):
        read_chat(cached, None, None, None)


def test_chat_resume_goes_on_with_a_saved_conversation(tmp_path):
    """`chat --resume FILE` answers as `Chat.load(FILE)` does: the saved turns and
    system prompt come back; a file that is not a saved chat is one line."""
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    first = gemma4_mlx.Chat(model, tok, system="Be brief.")
    first.send("What is the capital of Japan?")
    first.save(tmp_path / "c.json")
    want = gemma4_mlx.Chat.load(tmp_path / "c.json", model, tok).send("And of Peru?").text
    args = ["chat", "-m", str(DEMO_MODEL), "--draft-model", "none", "--resume", str(tmp_path / "c.json")]
    r = CliRunner().invoke(app, args, input="And of Peru?")
    assert r.exit_code == 0 and r.stdout.strip() == want, r.output
    assert "resumed" in r.stderr and "2 messages" in r.stderr
    (tmp_path / "bad.json").write_text('{"messages": 3}')
    r = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "bad.json")], input="hi")
    assert r.exit_code == 1 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "bad.json" in r.stderr


@pytest.mark.parametrize("extra", [[], ["--rollback-slack", "256MB"], ["--kv-bits", "8"]])
def test_chat_resume_keeps_the_saved_cache_settings(tmp_path, extra):
    """A chat saved with its 8-bit cache resumes as saved (its width is the default
    when --kv-bits is not given); a slack given as a memory budget is turned into
    tokens; a file given as `--resume=~/...` is found in HOME."""
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    first = gemma4_mlx.Chat(model, tok, kv_bits=8, max_tokens=8)
    first.send("What is the capital of Japan?")
    first.save(tmp_path / "c.safetensors", with_cache=True)
    args = ["chat", "-m", str(DEMO_MODEL), "--draft-model", "none", "--resume=~/c.safetensors", "-n", "8", *extra]
    r = CliRunner(env={"HOME": str(tmp_path)}).invoke(app, args, input="And of Peru?")
    assert r.exit_code == 0 and "resumed" in r.stderr and r.stdout.strip(), r.output
