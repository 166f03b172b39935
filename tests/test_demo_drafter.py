"""The embedded demo drafter (`gemma4_mlx/demo/gemma-4-demo-assistant/`, made by
`python -m gemma4_mlx.demo.train_drafter`) drafts for the embedded demo model for
real: speculative output equals plain greedy decoding, and most drafts are accepted.

Floors, from the measurement on these 9 prompts at K = 3 (README of the checkpoint):
the correct feed gives first-position acceptance 1.00 (every one of ~50 first
drafts) and 3.71 tokens/round (at most 4).  A local copy of `speculative.draft`
fed wrongly gives: concat order swapped ([h ; e] instead of [e ; h]) 0.71 / 1.86;
the target hidden of another batch row 0.71 / 2.83.  The floors (0.9, 3.3) sit
well below the correct values and well above those.  Weaker faults are not caught
by the floors: h zeroed gives 0.94 / 3.48 (checked separately below: it must cost
acceptance, i.e. the drafter really reads h), hiddens one verify position late
0.98 / 3.71 (the demo's K/V carry nearly the same information).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

import gemma4_mlx
from gemma4_mlx.checkpoint.load import load_drafter
from gemma4_mlx.config import FULL
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.demo.drafter_report import DEMO_CHATS, render_chat, stop_ids
from gemma4_mlx.demo.train_drafter import ASSISTANT_DIR
from gemma4_mlx.models.assistant import producer_layers
from gemma4_mlx.runtime.generate import generate_tokens
from gemma4_mlx.speculative import loop as speculative
from gemma4_mlx.speculative.loop import SpecStats, speculative_batch_generate

K = 3
MAX_TOKENS = 64
FIRST_FLOOR = 0.9  # first-position acceptance, measured 1.00
TPR_FLOOR = 3.3  # tokens per round, measured 3.71


@pytest.fixture(scope="module")
def demo():
    target, tok = gemma4_mlx.load(DEMO_MODEL)
    drafter = load_drafter(ASSISTANT_DIR, target=target)
    # Short questions, tool calls, thinking, multi-turn, a tool result to report;
    # most prompts are longer than the window (64); one ragged batch.
    prompts = [render_chat(tok, c) for c in DEMO_CHATS]
    stops = stop_ids(tok, target)
    plain = [list(generate_tokens(target, p, max_tokens=MAX_TOKENS, stop_ids=stops)) for p in prompts]
    return target, drafter, prompts, stops, plain


def run(demo, draft_fn=None):
    target, drafter, prompts, stops, _ = demo
    saved = speculative.draft
    try:
        speculative.draft = draft_fn or saved
        stats = SpecStats()
        out = speculative_batch_generate(
            target, drafter, prompts, max_tokens=MAX_TOKENS, draft_tokens=K, stop_ids=stops, stats=stats
        )
    finally:
        speculative.draft = saved
    return out, stats


def draft_copy(order="eh", hidden="ok"):
    """`speculative.draft` (greedy, "last_committed" position), optionally broken."""

    def draft(drafter, target, bonus, h, caches, K, mtp):
        cfg = target.config
        kv, masks = {}, {}
        for t, i in producer_layers(cfg).items():
            k, v, m = caches[i].draft_view(None if t == FULL else cfg.sliding_window)
            kv[t], masks[t] = (k, v), m
        offset = caches[producer_layers(cfg)[FULL]].positions() - 1
        if hidden == "other_row":
            h = mx.roll(h, 1, axis=0)
        elif hidden == "zero":
            h = mx.zeros_like(h)
        tok, hcur, out = bonus, h[:, None, :], []
        for _ in range(K):
            e = target.model.embed(tok[:, None])
            parts = [e, hcur] if order == "eh" else [hcur, e]
            x, hcur = drafter.step(mx.concatenate(parts, axis=-1), kv, masks, offset)
            tok = drafter.argmax(x)[:, 0]
            out.append(tok)
        return mx.stack(out, axis=1)

    return draft


def test_checkpoint(demo):
    target, drafter, *_ = demo
    cfg = drafter.config
    assert cfg.backbone_hidden_size == target.config.hidden_size
    assert not drafter.centroid_head and cfg.text.num_hidden_layers == 4
    assert sum(f.stat().st_size for f in ASSISTANT_DIR.iterdir()) < 2 * 2**20
    assert (ASSISTANT_DIR / "README.md").exists()


def test_lossless_with_real_acceptance(demo):
    plain = demo[-1]
    assert sum(len(p) for p in plain) > 150  # real answers, not a stop token at once
    out, stats = run(demo)
    assert out == plain
    acc = stats.acceptance()
    assert len(acc) == K
    assert acc[0] >= FIRST_FLOOR, stats.line()
    assert stats.tokens_per_round >= TPR_FLOOR, stats.line()


def test_local_copy_of_draft_is_exact(demo):
    """The copy the broken variants start from behaves exactly like `speculative.draft`."""
    out, stats = run(demo)
    out2, stats2 = run(demo, draft_copy())
    assert out2 == out
    assert stats2.accepted_at == stats.accepted_at and stats2.tokens == stats.tokens


@pytest.mark.parametrize(
    "broken", [dict(order="he"), dict(hidden="other_row")], ids=["swapped_concat", "other_rows_hidden"]
)
def test_broken_drafter_input_fails_the_floors(demo, broken):
    """Speculation stays lossless whatever the drafter gets, but a drafter fed the
    wrong input no longer clears the floors."""
    out, stats = run(demo, draft_copy(**broken))
    assert out == demo[-1]
    assert stats.acceptance()[0] < FIRST_FLOOR and stats.tokens_per_round < TPR_FLOOR, stats.line()


def test_drafter_reads_the_target_hidden(demo):
    _, stats = run(demo)
    _, zeroed = run(demo, draft_copy(hidden="zero"))
    assert zeroed.tokens_per_round < stats.tokens_per_round - 0.1, (stats.line(), zeroed.line())
