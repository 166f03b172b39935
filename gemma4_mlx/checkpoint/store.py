"""The models on this machine: `gemma4-mlx pull`, `list` and `rm`.

Two places hold them: the Hugging Face cache (what `pull` and loading a repo id
download; managed through huggingface_hub's cache API) and `hub.models_dir()`
(what `pull --quant` converted).  The conversion itself is the CLI's step: this
layer does not import the converter.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from gemma4_mlx.checkpoint.files import LoadError, weight_files
from gemma4_mlx.checkpoint.hub import (
    DEMO_NAME,
    DEMO_PATH,
    PATTERNS,
    PULL_RECORD,
    REPO_ID,
    SHORT_NAMES,
    find_drafter,
    hub_repo,
    lookup,
    models_dir,
    pull_record,
)
from gemma4_mlx.checkpoint.info import model_info
from gemma4_mlx.checkpoint.keys import rename
from gemma4_mlx.checkpoint.load import PLE_KEY
from gemma4_mlx.formats.safetensors import read_header

SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}
TOWERS = ("vision", "audio")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cache_dir() -> Path:
    # read at call time (huggingface_hub reads HF_HUB_CACHE when it is imported)
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# -- pull -------------------------------------------------------------------------


def download(repo: str) -> Path:
    """Fetch `repo` into the Hugging Face cache (huggingface_hub's progress bars on
    stderr); the snapshot folder.  Errors are one line naming the repo."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=PATTERNS, cache_dir=_cache_dir()))
    except Exception as e:  # offline, unknown or gated repo, network error
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = "offline (HF_HUB_OFFLINE is set) and not in the cache" if _offline() else f"{type(e).__name__}: {first}"
        raise LoadError(f"{repo}: not downloadable from the Hugging Face Hub ({why})") from None


def converted_name(repo: str, quant: str) -> str:
    """The folder name `pull --quant` gives a conversion of `repo`: `gemma-4-E2B-it-q4_0`;
    a drafter's is `gemma-4-E2B-it-q4_0-assistant`, the sibling its target's drafter
    lookup (`find_drafter`) expects."""
    base = repo.split("/")[-1]
    if base.endswith("-assistant"):
        return f"{base[: -len('-assistant')]}-{quant}-assistant"
    return f"{base}-{quant}"


def record_pull(folder: Path, repo: str, revision: str, quant: str) -> None:
    """Note in a converted folder where it came from (read by `list` and `find_drafter`)."""
    record = {"repo": repo, "revision": revision, "quant": quant}
    (Path(folder) / PULL_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def converted_from(repo: str) -> list[Path]:
    """The converted folders pulled from `repo`, newest first."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if _is_model(d) and pull_record(d).get("repo") == repo]
    return sorted(found, key=lambda d: d.stat().st_mtime, reverse=True)


# -- list -------------------------------------------------------------------------


@dataclass
class LocalModel:
    name: str  # what --model accepts
    kind: str  # "converted", "hf-cache" or "embedded"
    path: str
    source: str  # the repo id it came from ("" unknown)
    drafter_of: bool  # an MTP drafter, not a model
    format: str  # quantization recipe or dtype ("?" unreadable)
    size_bytes: int  # on disk
    resident_bytes: int | None  # estimated weights in memory for text (None: unreadable)
    drafter: str | None  # the drafter `find_drafter` picks for it, by name

    def as_dict(self) -> dict:
        return asdict(self)


def _is_model(folder: Path) -> bool:
    return folder.is_dir() and not folder.name.endswith(".partial") and (folder / "config.json").is_file()


def _disk_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _config(folder: Path) -> dict:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _config_format(raw: dict) -> str | None:
    q = raw.get("quantization")
    if isinstance(q, dict):
        return str(q.get("recipe") or q.get("mode") or f"{q.get('bits', '?')}-bit")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    for d in (raw, text):
        for k in ("dtype", "torch_dtype"):
            if isinstance(d.get(k), str):
                return SHORT_DTYPES.get(d[k], d[k])
    return None


def _header_bytes(folder: Path) -> dict[str, tuple[str, int]]:
    """{renamed key: (safetensors dtype, bytes)} over the folder's weight files."""
    out = {}
    for f in weight_files(folder):
        try:
            _, header = read_header(f)
            for key, e in header.items():
                a, b = e["data_offsets"]
                out[rename(key)] = (e["dtype"], b - a)
        except (OSError, ValueError, KeyError, TypeError):
            raise LoadError(f"{f}: unreadable safetensors header") from None
    return out


def _dominant(weights: dict[str, int]) -> str:
    return max(weights, key=weights.get) if weights else "?"


def estimate(folder: Path, drafter: bool = False) -> tuple[str, int]:
    """(format, resident bytes) from config.json and the safetensors headers (no tensor
    is read).  Resident: the weights a text-only load keeps in memory: the towers load
    on the first image or clip, and an unquantized PLE table stays memory-mapped
    (`checkpoint.load.map_ple_table`); the KV cache comes on top."""
    tensors = _header_bytes(folder)
    mapped = 0
    if PLE_KEY in tensors and PLE_KEY.replace(".weight", ".scales") not in tensors:
        mapped = tensors[PLE_KEY][1]
    fmt = _config_format(_config(folder))
    if drafter:
        by_dtype: dict[str, int] = {}
        for dtype, n in tensors.values():
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
        return fmt or SHORT_DTYPES.get(_dominant(by_dtype), _dominant(by_dtype).lower()), sum(by_dtype.values())
    info = model_info(folder, load=False)
    comps = info["components"]
    resident = sum(c["bytes"] for name, c in comps.items() if name not in TOWERS) - mapped
    if fmt is None:
        by_mode: dict[str, int] = {}
        for c in comps.values():
            for m in c["modes"]:
                by_mode[m] = by_mode.get(m, 0) + c["bytes"]
        fmt = info["quantization"] or SHORT_DTYPES.get(_dominant(by_mode), _dominant(by_mode))
    return fmt, resident


def display_name(path: Path | None) -> str | None:
    """How `list` shows a folder: its repo id or short name, pulled name, `demo`, else the path."""
    if path is None:
        return None
    path = Path(path)
    repo = hub_repo(path)
    if repo:
        return short_name(repo)
    if path.resolve() == DEMO_PATH:
        return DEMO_NAME
    if path.resolve() == DEMO_PATH.with_name(DEMO_PATH.name + "-assistant"):
        return f"{DEMO_NAME} (embedded drafter)"
    if path.resolve().parent == models_dir().resolve():
        return path.name
    return str(path)


def short_name(repo: str) -> str:
    return next((s for s, r in SHORT_NAMES.items() if r == repo), repo)


def _entry(name: str, kind: str, folder: Path, source: str, size: int) -> LocalModel:
    raw = _config(folder)
    is_drafter = str(raw.get("model_type", "")).endswith("_assistant")
    try:
        fmt, resident = estimate(folder, drafter=is_drafter)
    except (LoadError, ValueError, OSError):
        fmt, resident = _config_format(raw) or "?", None  # incomplete download, unknown layout
    drafter = None if is_drafter else display_name(find_drafter(folder))
    return LocalModel(name, kind, str(folder), source, is_drafter, fmt, size, resident, drafter)


def _cached_repos() -> list:
    from huggingface_hub import scan_cache_dir

    try:
        return [r for r in scan_cache_dir(_cache_dir()).repos if r.repo_type == "model"]
    except Exception:  # no cache folder yet, or unreadable
        return []


def _snapshot(repo) -> Path | None:
    """The revision of a cached repo to describe: `main`'s, else the newest."""
    revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
    return Path(revisions[0].snapshot_path) if revisions else None


def _is_gemma4(repo_id: str, folder: Path | None) -> bool:
    model_type = str(_config(folder).get("model_type", "")) if folder else ""
    return model_type.startswith("gemma4") or "gemma-4" in repo_id.lower()


def list_models(include_demo: bool = True) -> list[LocalModel]:
    """Converted models (`models_dir()`), Gemma 4 repos in the Hugging Face cache, and
    the embedded demo model."""
    out = []
    root = models_dir()
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if _is_model(d):
            out.append(_entry(d.name, "converted", d, pull_record(d).get("repo", ""), _disk_size(d)))
    for repo in sorted(_cached_repos(), key=lambda r: r.repo_id.lower()):
        folder = _snapshot(repo)
        if folder is None or not _is_gemma4(repo.repo_id, folder):
            continue
        out.append(_entry(short_name(repo.repo_id), "hf-cache", folder, repo.repo_id, repo.size_on_disk))
    if include_demo:
        out.append(_entry(DEMO_NAME, "embedded", DEMO_PATH, "", _disk_size(DEMO_PATH)))
    return out


# -- rm ---------------------------------------------------------------------------


@dataclass
class Removal:
    """What `rm NAME` would delete; `run()` deletes it."""

    what: str
    size_bytes: int
    run: Callable[[], None]


def removal(name: str) -> Removal:
    """Plan the removal of a pulled (converted) model or of a repo's Hugging Face cache
    entry (every cached revision).  Anything else is refused with a one-line LoadError:
    the demo ships with the package, and other folders are not ours to delete."""
    found = lookup(name)
    if isinstance(found, Path):
        folder = found.resolve()
        if folder in (DEMO_PATH, DEMO_PATH.with_name(DEMO_PATH.name + "-assistant")):
            raise LoadError(f"{name}: the embedded demo model is part of the package and cannot be removed")
        repo = hub_repo(folder)
        if repo:
            found = repo
        elif folder.parent == models_dir().resolve() and folder.is_dir():
            return Removal(f"{folder.name} ({folder})", _disk_size(folder), lambda: shutil.rmtree(folder))
        else:
            raise LoadError(
                f"{name}: not a model gemma4-mlx manages (pulled models in {models_dir()} and the "
                "Hugging Face cache); delete the folder yourself"
            )
    if not REPO_ID.fullmatch(found):
        raise LoadError(f"{name}: no pulled model or cached repo of that name (see `gemma4-mlx list`)")
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir(_cache_dir())
    except Exception:  # no cache folder at all
        cache = None
    repos = [r for r in (cache.repos if cache else []) if r.repo_type == "model" and r.repo_id == found]
    if not repos:
        raise LoadError(f"{name}: {found} is not in the Hugging Face cache ({_cache_dir()}); nothing to remove")
    repo = repos[0]
    what = f"{found} from the Hugging Face cache ({repo.repo_path})"
    if not repo.revisions:  # blobs of an interrupted download only
        return Removal(what, repo.size_on_disk, lambda: shutil.rmtree(repo.repo_path))
    # every revision deleted: huggingface_hub removes the repo's whole folder
    strategy = cache.delete_revisions(*(r.commit_hash for r in repo.revisions))
    if set(strategy.repos) != {Path(repo.repo_path)}:  # a commit hash shared with another repo (a duplicate)
        return Removal(what, repo.size_on_disk, lambda: shutil.rmtree(repo.repo_path))
    return Removal(what, strategy.expected_freed_size, strategy.execute)
