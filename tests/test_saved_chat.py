"""Saved chats read back (`chat.saved.read_chat`): a file a user may have edited, so
whatever `Chat` could not render or would render wrongly is one line naming it."""

from __future__ import annotations

import json

import pytest

from gemma4_mlx.chat.saved import read_chat


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
