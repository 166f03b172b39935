"""Saved chats: `Chat.save` / `Chat.load` (docs/kv-cache.md §8).

Two forms.  Without the cache, a JSON file: the system prompt, the thinking switch
and the messages; loading it re-prefills the whole conversation on the next turn.
With the cache, a prompt-cache file (`checkpoint.prompt_cache`, safetensors) whose
metadata also holds that JSON: loading restores the KV cache exactly, so the next
turn prefills only itself — and only for the model (and dtype, kv_bits) that made it.

Media are not saved (only their content keys would be): a conversation holding
images, audio or video is refused, in both directions, with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.cache.disk import read_metadata
from gemma4_mlx.checkpoint.prompt_cache import CacheFileError, load_prompt_cache, save_prompt_cache

MAX_JSON_CHAT_BYTES = 256 << 20  # a larger file is not a JSON chat we wrote: never read whole to check
MEDIA_PARTS = ("image", "image_url", "audio", "input_audio", "video")  # every part a template renders as media


@dataclass
class SavedChat:
    data: dict  # system, thinking, messages, max_rollback (when saved with the cache)
    cache: LayerCaches | None = None
    keys: list | None = None  # per cached slot (`Chat.cached`)


def is_cache_file(path: Path) -> bool:
    """A safetensors file (an 8-byte header length, then its JSON header), not a
    JSON conversation (which starts with '{': its first 8 bytes read as a length
    far beyond any file)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def save_chat(path: str | Path, data: dict, model=None, cache=None, keys=None) -> None:
    """`data` as JSON, or with `cache` (holding `keys`) as a prompt-cache file."""
    path = Path(path)
    _check_no_media(path, data["messages"], "cannot save")
    if path.exists() and not _holds_a_chat(path):
        raise ValueError(f"{path}: exists and is not a saved chat; not overwritten (remove it or pick another name)")
    if cache is None:
        _write_atomically(path, json.dumps(data, indent=1, ensure_ascii=False, default=str))
        return
    save_prompt_cache(path, model, cache, keys, extra={"chat": data})


def _holds_a_chat(path: Path) -> bool:
    """Whether `path` is a chat this module saved (JSON or a cache file), so that
    saving over it loses nothing the user did not ask to replace."""
    try:
        if not path.is_file():
            return False
        cached = is_cache_file(path)
        if not cached and path.stat().st_size > MAX_JSON_CHAT_BYTES:
            return False
        data = _stored_chat(path, cached)
    except (OSError, ValueError):  # CacheFileError is a ValueError
        return False
    return isinstance(data, dict) and (cached or isinstance(data.get("messages"), list))


def _stored_chat(path: Path, cached: bool):
    """The conversation a saved chat holds, unchecked: the JSON file, or a cache file's
    `chat` metadata.  ValueError (or CacheFileError) naming the file if it cannot be read."""
    if cached:
        try:
            extra = json.loads(read_metadata(path).get("extra", "{}"))
        except (ValueError, RecursionError):
            raise CacheFileError(f"{path}: malformed saved chat (metadata)") from None
        return extra.get("chat") if isinstance(extra, dict) else None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: not a saved chat ({' '.join(str(e).split()) or type(e).__name__})") from None


def _write_atomically(path: Path, text: str) -> None:
    """`text` in `path` through a temporary file and a rename: a failed write (a
    full disk) leaves the previous save as it was.  A symlink is followed (its target
    is replaced) and the old file's permissions are kept.  OSError names `path`."""
    path = Path(os.path.realpath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if path.exists():
                os.chmod(f.fileno(), path.stat().st_mode & 0o7777)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # named by the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def read_chat(path: str | Path, model, kv_bits, max_rollback: int | None) -> SavedChat:
    """A saved chat; the cache restored for `model` (kv_bits "saved": the file's).
    ValueError (one line naming the file) for what cannot be loaded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    cached = is_cache_file(path)
    data = _check(path, _stored_chat(path, cached))
    if not cached:
        return SavedChat(data)
    saved = load_prompt_cache(path, model, kv_bits=kv_bits, max_rollback=max_rollback or _rollback(path, data))
    return SavedChat(data, saved.cache, saved.keys)


def _rollback(path, data: dict) -> int:
    """The saved session's sliding-layer rollback slack (Chat's default if absent)."""
    value = data.get("max_rollback", 2048)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CacheFileError(f"{path}: malformed saved chat (max_rollback {value!r})")
    return value


def _check(path: Path, data) -> dict:
    """The conversation's fields, checked: one line for what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a saved chat (no conversation in it)")
    messages = data.get("messages")
    if not isinstance(messages, list):
        raise ValueError(f"{path}: malformed saved chat (messages)")
    for i, m in enumerate(messages):
        bad = _bad_field(m)
        if bad:
            raise ValueError(f"{path}: malformed saved chat (messages[{i}]{bad})")
    if not isinstance(data.get("system"), (str, type(None))) or not isinstance(data.get("thinking", False), bool):
        raise ValueError(f"{path}: malformed saved chat (system / thinking)")
    _check_no_media(path, messages, "cannot load")
    return data


ROLES = ("system", "developer", "user", "assistant", "model", "tool")


def _bad_field(m) -> str:
    """'' for a message `Chat` can render, else the part of it that is wrong."""
    if not isinstance(m, dict):
        return " is not an object"
    if m.get("role") not in ROLES:
        return ".role"
    content = m.get("content")
    is_part = lambda p: isinstance(p, dict) and isinstance(p.get("type"), str)  # noqa: E731
    parts_ok = isinstance(content, list) and all(map(is_part, content))
    if not (content is None or isinstance(content, str) or parts_ok):
        return ".content"
    if not isinstance(m.get("tool_calls") or [], list):
        return ".tool_calls"
    return ""


def _check_no_media(path: Path, messages: list, what: str) -> None:
    for m in messages:
        parts = m.get("content") if isinstance(m.get("content"), list) else []
        kinds = [p.get("type") for p in parts if isinstance(p, dict) and p.get("type") in MEDIA_PARTS]
        if kinds:
            raise ValueError(f"{path}: {what} a conversation with media ({kinds[0]}): saved chats keep text only")
