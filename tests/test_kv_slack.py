"""The rollback slack's cost (docs/kv-cache.md §6): `memory.rollback_slack_bytes`
equals what the slack adds to real caches, float and quantized, and `info` shows it
for a chat's default slack."""

from __future__ import annotations

import inspect

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from gemma4_mlx.cache import quantized as kvs
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.checkpoint import memory
from gemma4_mlx.checkpoint.load import load_model
from gemma4_mlx.cli import app
from gemma4_mlx.config import read_config

from helpers.checkpoints import W, random_ids


def sliding_bytes(cache) -> int:
    """Bytes of the entries the sliding layers retain (their valid slots only)."""
    return sum(kvs.nbytes(b) for c in cache.writers() if c.window is not None for b in c.state)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_slack_arithmetic_matches_real_caches(checkpoints, bits):
    model, _ = load_model(checkpoints["e2b_like"].path, "float32")
    R = 12
    ids = mx.array([random_ids(W + R + 9, seed=bits)])  # long enough that both caches are full
    held = []
    for rollback in (0, R):
        cache = model.make_cache(max_rollback=rollback, kv_bits=bits)
        model(ids, cache)
        held.append(sliding_bytes(cache))
    assert held[1] - held[0] == memory.rollback_slack_bytes(model.config, R, 4, bits) > 0


def test_info_shows_a_chats_rollback_slack(checkpoints):
    assert inspect.signature(Chat).parameters["max_rollback"].default == memory.CHAT_ROLLBACK
    folder = checkpoints["e2b_like"].path
    r = CliRunner().invoke(app, ["info", str(folder), "--no-load"])
    assert r.exit_code == 0, r.output
    text = read_config(folder).text
    slack = [memory.rollback_slack_bytes(text, memory.CHAT_ROLLBACK, 4, b) / 2**20 for b in (16, 8, 4)]
    line = " ".join(r.output.split())
    assert f"chat rollback slack ({memory.CHAT_ROLLBACK:,} tokens per sliding layer" in line
    assert f"{slack[0]:.2f} MiB at 16-bit KV, {slack[1]:.2f} MiB at 8-bit, {slack[2]:.2f} MiB at 4-bit" in line
