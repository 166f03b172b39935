"""`gemma4-mlx chat` refuses media when they are attached, for the real cause: here
a tokenizer without the medium's token, on the tiny multimodal checkpoint of
tests/helpers/mm_configs.py (a missing file or tower: tests/test_chat_terminal.py)."""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (loads OpenBLAS before mlx.core)

# isort: split

import io
import shutil

import numpy as np
import pytest
from PIL import Image as PILImage

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import mm_configs  # noqa: E402

BASE = ["--dtype", "float32", "-n", "3", "--draft-model", "none"]


def chat_cli(*args):
    from typer.testing import CliRunner

    from gemma4_mlx.cli import app

    return CliRunner().invoke(app, ["chat", *BASE, *args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return mm_configs.write_chat_checkpoint(tmp_path_factory.mktemp("mm_chat"))


@pytest.fixture(scope="module")
def no_media_tokens(folder, tmp_path_factory):
    """The checkpoint with a tokenizer that lacks <|image|>, <|audio|> and <|video|>."""
    path = tmp_path_factory.mktemp("no_media_tokens") / "ckpt"
    shutil.copytree(folder, path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    kept = {k: v for k, v in mm_configs.SPECIALS.items() if k not in ("<|image|>", "<|audio|>", "<|video|>")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mm_configs, "SPECIALS", kept)
        mm_configs.write_tokenizer(path)
    return path


def picture(seed: int) -> PILImage.Image:
    return PILImage.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8))


def test_tokenizer_without_media_tokens_is_named_at_start(no_media_tokens, tmp_path):
    img = tmp_path / "cat.png"
    picture(5).save(img)
    r = chat_cli("-m", str(no_media_tokens), "--image", str(img), "-p", "what is this?")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and "media runs" not in r.output
    assert "the tokenizer has no <|image|> token" in r.output, r.output


def test_interactive_attach_checks_the_tokenizer(no_media_tokens, folder, tmp_path):
    from rich.console import Console

    from gemma4_mlx import Chat, load
    from gemma4_mlx.chat.terminal import Terminal

    img = tmp_path / "cat.png"
    picture(6).save(img)
    for path, want in ((no_media_tokens, "the tokenizer has no <|image|> token"), (folder, "attached cat.png")):
        out = io.StringIO()
        term = Terminal(Chat(*load(path, dtype="float32"), max_tokens=3), Console(file=out, width=300))
        assert term.command(f"/image {img}")
        assert want in out.getvalue(), out.getvalue()
        assert term.pending["images"] == ([] if path == no_media_tokens else [str(img)])
