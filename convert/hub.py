"""SRC resolution: a local folder, or a Hugging Face repo id fetched with huggingface_hub."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download

from gemma4_mlx.checkpoint.hub import lookup

from .errors import ConvertError

# Everything a conversion reads: weights, configs, tokenizer, chat template, processor.
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(src: str | Path) -> Path:
    """A folder as is; a short name (`e2b-it`) or pulled model as the other commands
    read it (`checkpoint.hub.lookup`); `owner/name` through the hub cache (no network
    when HF_HUB_OFFLINE is set, short timeouts otherwise).  Errors are one line naming SRC."""
    found = lookup(src)
    p = found if isinstance(found, Path) else Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConvertError(f"{src}: not a folder (expected a Hugging Face checkpoint folder)")
    repo = str(found)
    if not REPO_ID.fullmatch(repo):
        raise ConvertError(f"{src}: no such folder")
    try:
        return Path(snapshot_download(repo, allow_patterns=PATTERNS, local_files_only=_offline(), etag_timeout=10))
    except Exception as e:  # offline, unknown or gated repo, network error
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = (
            "offline (HF_HUB_OFFLINE is set) and not in the local cache"
            if _offline()
            else f"{type(e).__name__}: {first}"
        )
        raise ConvertError(
            f"{src}: not a local folder and not downloadable from the Hugging Face Hub ({why})"
        ) from None
