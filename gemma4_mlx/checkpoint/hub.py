"""Finding checkpoints: a local folder or a Hugging Face repo id, and a target's MTP drafter."""

from __future__ import annotations

import re
from pathlib import Path

from gemma4_mlx.checkpoint.files import LoadError


def resolve_path(path_or_repo: str) -> Path:
    p = Path(path_or_repo).expanduser()
    if p.exists():
        return p
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path_or_repo):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path_or_repo, allow_patterns=[
                "*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]))
        except Exception as e:  # offline, unknown repo, gated...
            raise LoadError(f"{path_or_repo}: not a local folder and not downloadable "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    raise LoadError(f"{path_or_repo}: no such folder")


def find_drafter(model: str | Path) -> Path | None:
    """The matching MTP drafter next to a target, if one is already on this machine:
    a sibling folder `<target>-assistant` (the hub's naming, e.g.
    `gemma-4-E2B-it-assistant`; the embedded demo's drafter is named so too), or the
    same repo id in the Hugging Face cache.  Never downloads."""
    p = Path(str(model)).expanduser()
    hub = re.search(r"models--([\w.-]+?)--([\w.-]+)/snapshots/", str(p.resolve()) + "/")
    if p.exists() and hub:  # a Hugging Face cache snapshot: look the drafter up by repo id
        return find_drafter(f"{hub.group(1)}/{hub.group(2)}")
    if p.exists():
        sib = p.with_name(p.name + "-assistant")
        return sib if (sib / "config.json").exists() else None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)):
        try:
            from huggingface_hub import snapshot_download

            found = Path(snapshot_download(f"{model}-assistant", local_files_only=True))
            return found if (found / "config.json").exists() else None
        except Exception:  # not cached (or no hub at all): no drafter
            return None
    return None
