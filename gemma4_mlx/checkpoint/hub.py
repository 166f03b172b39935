"""Finding checkpoints: what a `--model` value names, and a target's MTP drafter.

A model is named by (first match wins):
  a path            an existing folder, as is;
  `demo`            the embedded demo model (`gemma4_mlx.demo.DEMO_MODEL`);
  `demo-assistant`  its MTP drafter (`gemma4_mlx.demo.DEMO_DRAFTER`);
  a pulled name     a folder `gemma4-mlx pull --quant` wrote under `models_dir()`, e.g.
                    `gemma-4-E2B-it-q4_0`, also as short name + quant (`e2b-it-q4_0`);
  a short name      `e2b`, `e2b-it`, `e4b(-it)`, `26b(-it)`, `31b(-it)` (`SHORT_NAMES`),
                    the released repo ids;
  a repo id         `owner/name`, from the Hugging Face cache or downloaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from gemma4_mlx.checkpoint.files import LoadError

# The released Gemma 4 variants (docs/text-decoder.md §1), as hub repo ids.
SHORT_NAMES = {
    "e2b": "google/gemma-4-E2B",
    "e2b-it": "google/gemma-4-E2B-it",
    "e4b": "google/gemma-4-E4B",
    "e4b-it": "google/gemma-4-E4B-it",
    "26b": "google/gemma-4-26B-A4B",
    "26b-it": "google/gemma-4-26B-A4B-it",
    "31b": "google/gemma-4-31B",
    "31b-it": "google/gemma-4-31B-it",
}
DEMO_NAME = "demo"
# The embedded demo model: the same folder as `gemma4_mlx.demo.DEMO_MODEL`, named by
# path here because this layer does not import `demo` (it sits above).
DEMO_PATH = Path(__file__).resolve().parent.parent / "demo" / "gemma-4-demo"
# What a download fetches: weights, configs, tokenizer, chat template, processor.
PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*"]
# Written by `gemma4-mlx pull` into a converted folder: {"repo", "revision", "quant"}.
PULL_RECORD = "gemma4-mlx-pull.json"
MODELS_ENV = "GEMMA4_MLX_MODELS"
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_HUB_PATH = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/")


def models_dir() -> Path:
    """Where `gemma4-mlx pull --quant` puts converted models: $GEMMA4_MLX_MODELS, else
    $XDG_DATA_HOME/gemma4-mlx/models (~/.local/share/gemma4-mlx/models)."""
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data).expanduser() / "gemma4-mlx" / "models"


def repo_of(name: str) -> str | None:
    """The repo id a short name stands for (any case), else None."""
    return SHORT_NAMES.get(name.lower())


def pulled(name: str) -> Path | None:
    """The converted folder `name` names under `models_dir()`: its folder name
    (`gemma-4-E2B-it-q4_0`) or a short name with the quant (`e2b-it-q4_0`)."""
    if not name or "/" in name or name in (".", ".."):
        return None
    root = models_dir()
    candidates = [name]
    for short, repo in SHORT_NAMES.items():
        if name.lower().startswith(short + "-"):
            candidates.append(repo.split("/")[1] + name[len(short) :])
    for c in candidates:
        if (root / c / "config.json").is_file():
            return root / c
    return None


def pull_record(folder: Path) -> dict:
    """The `PULL_RECORD` of a converted folder ({} when there is none or it is unreadable)."""
    try:
        record = json.loads((Path(folder) / PULL_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def lookup(name: str | Path) -> Path | str:
    """What a model name stands for, without touching the network: an existing path,
    the demo or a pulled folder as a Path; a short name as its repo id; anything else
    unchanged."""
    p = Path(str(name)).expanduser()
    if p.exists():
        return p
    name = str(name)
    if name.lower() == DEMO_NAME:
        return DEMO_PATH
    if name.lower() == DEMO_NAME + "-assistant":  # the demo's MTP drafter, beside it
        return DEMO_PATH.with_name(DEMO_PATH.name + "-assistant")
    folder = pulled(name)
    if folder is not None:
        return folder
    return repo_of(name) or name


def resolve_path(path_or_repo: str | Path) -> Path:
    """The checkpoint folder a model name (see the module's docstring) names, downloading
    a repo id that is not in the Hugging Face cache.  Errors are one line."""
    found = lookup(path_or_repo)
    if isinstance(found, Path):
        return found
    if REPO_ID.fullmatch(found):
        from huggingface_hub import snapshot_download

        shown = found if found == path_or_repo else f"{path_or_repo} ({found})"
        try:
            return Path(snapshot_download(found, allow_patterns=PATTERNS))
        except Exception as e:  # offline, unknown repo, gated...
            raise LoadError(
                f"{shown}: not a local folder and not downloadable "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    raise LoadError(
        f"{path_or_repo}: no such folder, pulled model or repo id (short names: {', '.join(SHORT_NAMES)}, {DEMO_NAME})"
    )


def hub_repo(path: str | Path) -> str | None:
    """The repo id of a Hugging Face cache snapshot folder, else None."""
    m = _HUB_PATH.search(str(Path(path).resolve()) + "/")
    return f"{m.group(1)}/{m.group(2)}" if m else None


def find_drafter(model: str | Path) -> Path | None:
    """The matching MTP drafter next to a target, if one is already on this machine:
    a sibling folder `<target>-assistant` (the hub's naming, e.g.
    `gemma-4-E2B-it-assistant`; the embedded demo's drafter and the drafters `pull`
    converts are named so too), or the same repo id in the Hugging Face cache; for a
    pulled folder without a sibling, the drafter of the repo it was converted from.
    `model` is any model name (`lookup`).  Never downloads."""
    found = lookup(model)
    if isinstance(found, Path):
        repo = hub_repo(found)
        if repo:  # a Hugging Face cache snapshot: look the drafter up by repo id
            return find_drafter(repo)
        sib = found.with_name(found.name + "-assistant")
        if (sib / "config.json").exists():
            return sib
        source = pull_record(found).get("repo")
        return find_drafter(source) if isinstance(source, str) and REPO_ID.fullmatch(source) else None
    if REPO_ID.fullmatch(found):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(f"{found}-assistant", local_files_only=True))
            return path if (path / "config.json").exists() else None
        except Exception:  # not cached (or no hub at all): no drafter
            return None
    return None
