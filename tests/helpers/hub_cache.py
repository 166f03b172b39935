"""A Hugging Face cache laid out on disk as huggingface_hub lays it out (blobs,
snapshot symlinks, refs/main), for offline tests of names, pull, list and rm."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_repo(cache: Path, repo: str, src: Path, rev: str | None = None) -> Path:
    """Put the files of `src` into the Hugging Face cache `cache` as `repo`; the snapshot."""
    rev = rev or hashlib.sha1(repo.encode()).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            data = f.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)
    return snap
