"""The README runs as written: every ```python block is executed in a fresh process,
and every `gemma4-mlx` option a ```sh block names exists in that command's --help.

The blocks name real checkpoints ("e2b-it", "google/gemma-4-E2B-it-assistant",
"e4b-it"); an offline Hugging Face cache stands in for them, laid out as
huggingface_hub lays it out: the embedded demo model and its drafter as E2B-it and
its assistant, a tiny multimodal checkpoint (vision and audio towers) as E4B-it.
The media files the blocks open are written next to them."""

import os
import re
import shlex
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL

from helpers.hub_cache import cache_repo
from helpers.media_files import write_video
from helpers.mm_configs import write_chat_checkpoint

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """(cwd with the media files, environment with the offline cache)."""
    root = tmp_path_factory.mktemp("readme")
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    cache_repo(cache, "google/gemma-4-E2B-it", DEMO_MODEL)
    cache_repo(cache, "google/gemma-4-E2B-it-assistant", DEMO_DRAFTER)
    # positions for the README's 1120-token image budget
    cache_repo(cache, "google/gemma-4-E4B-it", write_chat_checkpoint(root / "mm", position_embedding_size=512))
    cwd = root / "cwd"
    cwd.mkdir()
    rng = np.random.default_rng(0)
    for name in ("cat.jpg", "chart.png"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(cwd / name)
    with wave.open(str(cwd / "memo.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((3000 * np.sin(np.arange(16000) / 8)).astype(np.int16).tobytes())
    write_video(cwd / "clip.mp4", n=20, rate=10)
    env = dict(
        os.environ,
        HF_HOME=str(root / "hf"),
        HF_HUB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        GEMMA4_MLX_MODELS=str(root / "models"),
    )
    return cwd, env


def test_the_readme_has_python_blocks():
    assert len(blocks("python")) >= 3


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs_as_written(workdir, index):
    cwd, env = workdir
    code = blocks("python")[index]
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"README python block {index} failed:\n{code}\n{run.stderr[-3000:]}"


def commands() -> list[tuple[str, list[str]]]:
    """(subcommand, --options) of every gemma4-mlx invocation in the sh blocks."""
    out = []
    for body in blocks("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            for part in re.split(r"[;|]", line.split("  #")[0]):
                words = shlex.split(part.replace("[", " ").replace("]", " "), comments=True)
                if len(words) >= 2 and words[0] == "gemma4-mlx" and not words[1].startswith("-"):
                    out.append((words[1], sorted({w.split("=")[0] for w in words[2:] if w.startswith("--")})))
    return out


def test_sh_blocks_name_real_commands_and_options():
    cmds = commands()
    assert {"chat", "generate", "info", "pull", "list", "rm"} <= {c for c, _ in cmds}
    helps = {}
    for cmd, options in cmds:
        if cmd not in helps:
            run = subprocess.run(
                [sys.executable, "-m", "gemma4_mlx", cmd, "--help"],
                capture_output=True,
                text=True,
                env=dict(os.environ, COLUMNS="200"),
                timeout=120,
            )
            assert run.returncode == 0, f"gemma4-mlx {cmd}: {run.stderr}"
            helps[cmd] = run.stdout
        for opt in options:
            assert re.search(re.escape(opt) + r"\b", helps[cmd]), f"README: gemma4-mlx {cmd} {opt} does not exist"
