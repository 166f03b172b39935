"""The steps of one speculative round (docs/speculative.md §7-§10), for every live row at once.

  draft            K tokens with the drafter, seeded by (bonus token, target hidden);
  verify           [bonus, d_1..d_K] in one target forward (K + 1 positions per row);
  pick             the target's own token at every verify position (keyed sampler);
  accepted_counts  per row, the drafts before the first disagreement;
  advance_rows     per row: emit the accepted tokens + the target's next pick (cut at
                   a stop token or max_tokens: `emit`, which the batching
                   scheduler's `Job.take` shares), reseed the bonus token.
The cache commit between the last two is `LayerCaches.commit`; `loop` strings them
together.  `Rows` is the per-row state a round reads and advances.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from gemma4_mlx.cache import LayerCaches
from gemma4_mlx.config import FULL
from gemma4_mlx.contracts import DecodingModel, MTPDrafter
from gemma4_mlx.models.assistant import producer_layers
from gemma4_mlx.runtime.processors import History, apply_processors
from gemma4_mlx.runtime.sampling import PositionedSampler
from gemma4_mlx.speculative.stats import MTPSettings


def draft(
    drafter: MTPDrafter,
    target: DecodingModel,
    bonus: mx.array,
    h: mx.array,
    caches: LayerCaches,
    K: int,
    mtp: MTPSettings,
) -> mx.array:
    """K greedy draft tokens per row [B, K], as a lazy graph (no host sync)."""
    cfg = target.config
    kv, masks = {}, {}
    for t, i in producer_layers(cfg).items():
        n = None if t == FULL else (mtp.sliding_keys or cfg.sliding_window)
        k, v, m = caches[i].draft_view(n)
        kv[t], masks[t] = (k, v), m
    pos = caches[producer_layers(cfg)[FULL]].positions()  # L: the bonus token's position
    offset = pos - 1 if mtp.position == "last_committed" else pos
    tok, hcur, out = bonus, h[:, None, :], []
    for _ in range(K):
        e = target.embed(tok[:, None])  # target table * sqrt(D_t)
        x, hcur = drafter.step(mx.concatenate([e, hcur.astype(e.dtype)], axis=-1), kv, masks, offset)
        tok = drafter.argmax(x)[:, 0]
        out.append(tok)
    return mx.stack(out, axis=1)


def verify(target: DecodingModel, block: mx.array, caches: LayerCaches) -> tuple[mx.array, mx.array]:
    """Target logits [B, T, V] and final-norm hiddens [B, T, H] for every position."""
    h = target.hidden(block, caches)
    return target.logits(h), h


def pick(
    sampler: PositionedSampler,
    processors,
    logits: mx.array,
    rows: Sequence[int],
    index: Sequence[int],
    histories=None,
    drafts=None,
) -> mx.array:
    """The target's token at every verify position [B, T].

    Row b, position j is output index index[b] + j of stream rows[b].  Processors
    (penalties) see the history plus the drafts before position j (docs/speculative.md §8.5).
    """
    B, T, V = logits.shape
    logits = logits.reshape(B * T, V)
    if processors:
        hists = [histories[b] + (drafts[b][:j] if drafts else []) for b in range(B) for j in range(T)]
        logits = apply_processors(logits, hists, processors)
    flat_rows = [r for r in rows for _ in range(T)]
    flat_index = [i + j for i in index for j in range(T)]
    return sampler(logits, flat_rows, flat_index).reshape(B, T)


def accepted_counts(drafts: list[list[int]], picks: list[list[int]]) -> list[int]:
    """Per row, how many drafts equal the target's picks before the first mismatch."""
    out = []
    for d, p in zip(drafts, picks):
        a = 0
        while a < len(d) and d[a] == p[a]:
            a += 1
        out.append(a)
    return out


@dataclass
class Rows:
    """The rows of a speculative batch.  Batch row i is stream live[i]; streams keep
    their index (into the prompts) after others finished and left the batch."""

    live: list[int]  # stream of each batch row
    out: list[list[int]]  # per stream: the tokens emitted so far
    history: list[History]  # per stream: prompt + out (what processors read)
    bonus: list[int]  # per batch row: the token the next round verifies first
    hidden: mx.array  # [B, H] per batch row: the target hidden that seeds the drafter

    @classmethod
    def start(cls, prompts: Sequence[Sequence[int]], hidden: mx.array) -> Rows:
        n = len(prompts)
        return cls(list(range(n)), [[] for _ in prompts], [History(p) for p in prompts], [0] * n, hidden)

    def index(self) -> list[int]:
        """Per batch row, the output index of its next token."""
        return [len(self.out[r]) for r in self.live]

    def histories(self) -> list[History]:
        return [self.history[r] for r in self.live]

    def most_left(self, max_tokens: int) -> int:
        """The most tokens any live row may still emit."""
        return max(max_tokens - len(self.out[r]) for r in self.live)

    def keep_only(self, keep: list[int], caches: LayerCaches) -> None:
        """Finished rows leave the batch (and the caches)."""
        if len(keep) == len(self.live):
            return
        sel = [self.live.index(r) for r in keep]
        caches.filter(sel)
        self.hidden = self.hidden[mx.array(sel)]
        self.bonus = [self.bonus[i] for i in sel]
        self.live = keep


def commit(caches: LayerCaches, hidden: mx.array, accepted: list[int], K: int, timed: bool) -> mx.array:
    """Keep accepted[i] + 1 of row i's K + 1 verified entries; returns each row's
    hidden after its last accepted token.  timed (an auto draft length is learning
    its costs): the commit — ragged rows rolled in every cache — runs now, so that it
    is timed in the round that caused it; left lazy, the next round would pay it,
    and a plain step after a speculative one would look as dear as both (B = 8:
    179 ms measured for a 115 ms step, docs/speculative.md §12.1)."""
    caches.commit(accepted, K)
    rows = hidden[mx.arange(len(accepted)), mx.array(accepted)]
    if timed:
        mx.eval(rows, caches.state)
    return rows


def emit(picks: Sequence[int], room: int, stop) -> list[int]:
    """What a row emits of its picks this round: in order, ending after the first
    stop token or at `room` tokens (its max_tokens left).  The batching scheduler's
    `Job.take` cuts the same way."""
    new = []
    for t in picks[: max(room, 0)]:
        new.append(t)
        if t in stop:
            break
    return new


def advance_rows(
    rows: Rows, picks: list[list[int]], accepted: list[int], stop: set, max_tokens: int, caches: LayerCaches
) -> tuple[list, list[int]]:
    """Emit row i's picks[i][:accepted[i] + 1] — its accepted drafts (equal to the
    target's picks) and the target's pick after them — cut after a stop token or at
    max_tokens; reseed its bonus token with that last pick.

    Returns ([(stream, new tokens)] in batch order, the streams that go on).
    """
    emitted, keep = [], []
    for i, r in enumerate(rows.live):
        new = emit(picks[i][: accepted[i] + 1], max_tokens - len(rows.out[r]), stop)
        if len(new) < accepted[i] + 1 and len(rows.live) == 1:
            # the last row stopped inside the round: keep its cache at exactly
            # what plain decoding would hold (chat sessions reuse it)
            caches.trim(accepted[i] + 1 - len(new))
        rows.out[r].extend(new)
        rows.history[r].extend(new)
        emitted.append((r, new))
        if new[-1] not in stop and len(rows.out[r]) < max_tokens:
            keep.append(r)
        rows.bonus[i] = picks[i][accepted[i]]
    return emitted, keep


__all__ = ["draft", "verify", "pick", "accepted_counts", "Rows", "advance_rows", "emit"]
