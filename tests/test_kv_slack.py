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
from gemma4_mlx.checkpoint.load import load, load_model
from gemma4_mlx.cli import app
from gemma4_mlx.config import read_config
from gemma4_mlx.demo import DEMO_MODEL

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


@pytest.mark.parametrize("bits", [16, 4])
def test_a_byte_budget_becomes_the_most_tokens_that_fit(checkpoints, bits):
    """Chat(max_rollback="…MB") / chat --rollback-slack: a memory budget for the sliding
    layers' slack, per model and kv_bits; the slack it buys measured on real caches."""
    model, _ = load_model(checkpoints["e2b_like"].path, "float32")
    per_token = memory.rollback_slack_bytes(model.config, 1, 4, bits)
    budget = 37 * per_token + per_token // 2  # 37.5 tokens' worth: 37 fit
    tokens = memory.slack_tokens(model.config, f"{budget / 1e3}KB", 4, bits)
    assert tokens == 37
    ids = mx.array([random_ids(W + 40 + 9, seed=bits)])
    held = []
    for rollback in (0, tokens):
        cache = model.make_cache(max_rollback=rollback, kv_bits=bits)
        model(ids, cache)
        held.append(sliding_bytes(cache))
    assert held[1] - held[0] <= budget < held[1] - held[0] + per_token


def test_chat_takes_the_budget_for_its_model():
    model, tokenizer = load(str(DEMO_MODEL))
    chat = Chat(model, tokenizer, max_rollback="1MB", kv_bits=8)
    per_token = memory.rollback_slack_bytes(model.config, 1, model.model.norm.weight.dtype.size, 8)
    assert chat.max_rollback == 10**6 // per_token > 0
    assert {c.max_rollback for c in chat.cache.writers() if c.window is not None} == {chat.max_rollback}


def test_a_malformed_budget_is_one_line(checkpoints):
    model, _ = load_model(checkpoints["e2b_like"].path, "float32")
    with pytest.raises(ValueError, match=r"rollback slack '12 parsecs': expected tokens \(2048\) or a size"):
        memory.slack_tokens(model.config, "12 parsecs")
    r = CliRunner().invoke(app, ["chat", "--model", "demo", "--prompt", "hi", "--rollback-slack", "lots"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        "error: rollback slack 'lots': expected tokens (2048) or a size (512MB, 1.5GB, 300MiB)"
    )
