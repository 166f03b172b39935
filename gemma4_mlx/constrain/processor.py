"""The constraint as a logits processor: `processor(history [T], logits [1, V]) -> logits`
(docs/structured-output.md §3).

It keeps llguidance matchers ("slots") and syncs one to every history it is shown:
the slot sharing the longest prefix with the history is rolled back to that prefix
and fed the rest, then every token the grammar does not allow next is set to -inf.
The decoding loops need no change: speculative verify shows history + drafts[:j]
(a draft the grammar refuses is never the pick, so it is rejected), accepted
drafts advance a slot, rejected ones roll it back; batch rows and equal prompts
each find their own slot.  A slot another history still needs is copied, not
rolled back (§3.2).
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from gemma4_mlx.prompt.tokens import ends_in_open_thought

NEG_INF = float("-inf")


class _Slot:
    """tokens: the history this slot has gone through (prompt + output, every output
    token valid); prompt_len: where the output starts; start: where the grammar starts
    (None: waiting for the constraint's `after` token); version: bumped on change.
    With the constraint's `opener`, the grammar starts at the output, and an output
    that opens with `opener` waits for `after` instead; so does an output whose
    prompt ends inside an open thought (`primed`: with thinking on, the template
    opens one for the model after a tool result)."""

    __slots__ = (
        "constraint",
        "tokens",
        "prompt_len",
        "start",
        "matcher",
        "used",
        "version",
        "mask",
        "broken",
        "primed",
    )

    def __init__(self, constraint, prompt: list[int]):
        self.constraint, self.tokens, self.prompt_len = constraint, list(prompt), len(prompt)
        self.start, self.matcher, self.used, self.version, self.mask = None, None, 0, 0, None
        self.broken: str | None = None  # why the grammar allows nothing here, when the engine does not say
        self.primed = (
            constraint is not None
            and constraint.opener is not None
            and ends_in_open_thought(prompt, constraint.opener, constraint.after)
        )
        if constraint is not None and (constraint.after is None or constraint.opener is not None) and not self.primed:
            self.start, self.matcher = len(self.tokens), constraint.matcher()

    def fork(self) -> _Slot:
        s = _Slot(None, [])
        s.constraint, s.tokens, s.prompt_len, s.start = self.constraint, list(self.tokens), self.prompt_len, self.start
        s.primed = self.primed
        s.matcher = None if self.matcher is None else self.matcher.deep_copy()
        return s

    def rewind(self, n: int) -> None:
        """Drop tokens[n:] (n >= prompt_len)."""
        if n >= len(self.tokens):
            return
        if self.start is not None and n < self.start:  # (after a thought) the `after` token went: wait again
            self.start, self.matcher = None, None
        elif self.matcher is not None:
            self.matcher.rollback(len(self.tokens) - n)
        del self.tokens[n:]
        c = self.constraint
        if self.start is None and c is not None and c.opener is not None and n == self.prompt_len and not self.primed:
            self.start, self.matcher = n, c.matcher()  # back before the optional thought
        self.version += 1

    def advance(self, rest: list[int]) -> bool:
        """Go through `rest`; False when a token of it breaks the grammar (the slot
        stops before it: the history is one no decoding step will keep, §3.3)."""
        c = self.constraint
        if not rest:
            return True
        if c is None:
            self.tokens += rest
            self.version += 1
            return True
        if c.opener is not None and len(self.tokens) == self.prompt_len and rest[0] == c.opener and not self.primed:
            self.start, self.matcher = None, None  # a thought opened: free until `after`
        if self.start is None:
            if c.after not in rest:
                self.tokens += rest
                self.version += 1
                return True
            i = rest.index(c.after) + 1
            self.tokens += rest[:i]
            self.start, self.matcher, rest = len(self.tokens), c.matcher(), rest[i:]
        # A stop token is refused here too: decoding ends at it, nothing after it is kept.
        n = self.matcher.validate_tokens(rest)
        if n:
            self.matcher.consume_tokens(rest[:n])
        self.tokens += rest[:n]
        self.version += 1
        return n == len(rest)

    def _drop_spelled_controls(self, words: np.ndarray) -> bool:
        """Clear the control tokens the mask offers but the grammar does not take as
        tokens; whether any was.  Where a grammar forces text that spells a control
        token (`<|"|>` as text), the engine offers that token, its tokenizer's
        reading of the text, and then refuses it: picked, it would end a string or a
        call early and leave the rest of the output unconstrained."""
        controls = self.constraint.control_array
        controls = controls[(controls >> 5) < len(words)]
        offered = controls[(words[controls >> 5] >> (controls & 31)) & 1 == 1]  # a few at most: one test each
        dropped = False
        for t in offered.tolist():
            if not self.matcher.validate_tokens([t]):
                words[t >> 5] &= ~np.uint32(1 << (t & 31))
                dropped = True
        return dropped

    def allowed(self, width: int) -> mx.array | None:
        """[width] bool: the tokens the grammar allows next (stop tokens where it
        accepts); None when the grammar allows nothing (a finished or broken match)."""
        if self.mask is not None and self.mask[0] == self.version:
            return self.mask[1]
        c = self.constraint
        words = np.frombuffer(self.matcher.compute_bitmask(), np.uint32).copy()  # bit t of word t // 32
        # the matcher says whether the grammar may end here: the mask's eos bit may be the
        # engine's reading of text that spells `<eos>` (`_drop_spelled_controls`)
        accept = self.matcher.is_accepting()
        for s in c.stop_ids:
            if s >> 5 < len(words):
                words[s >> 5] = words[s >> 5] | (1 << (s & 31)) if accept else words[s >> 5] & ~np.uint32(1 << (s & 31))
        dropped = self._drop_spelled_controls(words)
        if not words.any() and (dropped or not accept):  # the engine offered only a spelled control token
            self.broken = "the grammar needs a control token's text here, which the model writes only as that token"
        if c.opener is not None and len(self.tokens) == self.prompt_len and c.opener >> 5 < len(words):
            words[c.opener >> 5] |= np.uint32(1 << (c.opener & 31))  # the output may open a thought
        out = _unpack(words, width) if words.any() else None
        self.mask = (self.version, out)
        return out


_STOPS: dict[tuple, tuple[mx.array, mx.array]] = {}


def _close_instead_of_stop(logits: mx.array, c) -> mx.array:
    """Inside the thought a grammar waits for (`after`), the model's score for ending
    goes to closing the thought, and the stop tokens are masked: a reply that ended
    in its thought would skip all the grammar requires (a forced call, a schema's
    JSON), and the reply would finish without it.  Scatters on the few ids, not
    selects over the vocabulary: 0.2 ms, not 1.4 ms, a step for 262,144 tokens."""
    width = logits.shape[-1]
    key = (c.stop_ids, c.after, width)
    if key not in _STOPS:  # (stop ids, the close id) in the row, made once
        stops = [s for s in c.stop_ids if s < width]
        _STOPS[key] = (mx.array(stops, mx.int32), mx.array([c.after] if c.after < width else [], mx.int32))
    stops, close = _STOPS[key]
    if not stops.size:
        return logits
    end = logits[..., stops].max(axis=-1, keepdims=True)
    raised = logits.at[..., close].maximum(end) if close.size else logits
    return raised.at[..., stops].minimum(mx.array(NEG_INF, logits.dtype))  # last: a stop stays masked


def _unpack(words: np.ndarray, width: int) -> mx.array:
    """Bit t of the packed mask as a [width] bool array.  numpy expands it on the
    host (~20 us for 262,144 tokens): expanding the V / 32 words with MLX ops took
    ~3 ms a step on the CPU backend, and a V-byte copy is nothing beside a step."""
    flags = np.unpackbits(words.view(np.uint8), bitorder="little")[:width]
    if flags.shape[0] < width:  # the model has more rows than the tokenizer: those stay masked
        flags = np.concatenate([flags, np.zeros(width - flags.shape[0], np.uint8)])
    return mx.array(flags.view(np.bool_))


class ConstraintProcessor:
    """route(prompt tuple) -> the constraint of a new row (None: free row).
    known_prompts: the batch's prompts when known — a history equal to one of them
    starts a row even if another row's history is a prefix of it.
    max_slots: slots kept (least recently used ones go; speed only, never results).
    Histories are found by (length, last token), then compared whole: hashing a
    20k-token tuple costs ~0.07 ms, and a step looked one up several times."""

    def __init__(self, route: Callable, known_prompts: set | None = None, max_slots: int = 256):
        self.route, self.known, self.max_slots = route, known_prompts or set(), max_slots
        self.known_keys = {_key(p) for p in self.known}
        # The grammar engine's error, once a matcher hit one of its limits mid-output
        # (its mask then allows only the end: the text stops; callers must not take it
        # for a finished answer).  Raising here would abandon the whole batch.
        self.failure: str | None = None
        self.slots: list[_Slot] = []
        self.index: dict[tuple[int, int], list[_Slot]] = {}  # _key(slot.tokens) -> slots, one per history
        self.clock = 0

    def __call__(self, history, logits: mx.array) -> mx.array:
        h = history.tolist() if isinstance(history, mx.array) else list(history)
        # On a GPU, start the model's step now: the host computes the mask while it
        # runs.  On the CPU backend both would fight over the same cores (§6).
        if mx.default_device() == mx.gpu:
            mx.async_eval(logits)
        slot, ok = self.sync(h)
        if not ok or slot.constraint is None:
            return logits
        if slot.start is None:
            return _close_instead_of_stop(logits, slot.constraint)
        allowed = slot.allowed(logits.shape[-1])
        if self.failure is None and slot.matcher.is_error():
            self.failure = slot.matcher.get_error().splitlines()[0]
        elif self.failure is None and slot.broken is not None:
            self.failure = slot.broken
        return logits if allowed is None else mx.where(allowed, logits, NEG_INF)

    # -- finding and syncing a slot -----------------------------------------------
    def sync(self, h: list[int]) -> tuple[_Slot, bool]:
        """The slot now at `h` (or at its longest valid prefix) and whether all of `h` is valid."""
        self.clock += 1
        slot, lcp = self._find(h)
        if slot is None:
            slot, ok = _Slot(self.route(tuple(h)), h), True
        elif lcp < len(slot.tokens):  # another history may still need this slot: copy it
            slot = slot.fork()
            slot.rewind(lcp)
            ok = slot.advance(h[lcp:])
        else:
            self._unindex(slot)
            ok = slot.advance(h[lcp:])
            self._index(slot)
            slot.used = self.clock
            return slot, ok
        slot.used = self.clock
        self._add(slot)
        return slot, ok

    def _lookup(self, h: list[int], n: int) -> _Slot | None:
        """The slot whose history is h[:n]."""
        for s in self.index.get((n, h[n - 1] if n else -1), ()):
            if s.tokens == (h if n == len(h) else h[:n]):
                return s
        return None

    def _find(self, h: list[int]) -> tuple[_Slot | None, int]:
        s = self._lookup(h, len(h))
        if s is not None:  # the same history again (equal prompts, a repeated position)
            return s, len(h)
        if _key(h) in self.known_keys and tuple(h) in self.known:  # a row's prompt: a new row
            return None, 0
        s = self._lookup(h, len(h) - 1) if h else None
        if s is not None:  # the common case: one token more
            return s, len(h) - 1
        best, best_lcp = None, -1
        for s in self.slots:
            p = s.prompt_len
            if len(h) < p or h[:p] != s.tokens[:p]:
                continue
            n = p
            limit = min(len(h), len(s.tokens))
            while n < limit and h[n] == s.tokens[n]:
                n += 1
            if n > best_lcp:
                best, best_lcp = s, n
        return best, best_lcp

    def _index(self, slot: _Slot) -> None:
        """Index `slot` under its history, in place of another slot with the same one."""
        same = self._lookup(slot.tokens, len(slot.tokens))
        if same is not None:
            self._unindex(same)
        self.index.setdefault(_key(slot.tokens), []).append(slot)

    def _unindex(self, slot: _Slot) -> None:
        bucket = self.index.get(_key(slot.tokens), [])
        if any(s is slot for s in bucket):
            bucket[:] = [s for s in bucket if s is not slot]
            if not bucket:
                del self.index[_key(slot.tokens)]

    def _add(self, slot: _Slot) -> _Slot:
        self.slots.append(slot)
        self._index(slot)
        if len(self.slots) > self.max_slots:
            old = min(self.slots, key=lambda s: s.used)
            self.slots.remove(old)
            self._unindex(old)
        return slot


def _key(tokens) -> tuple[int, int]:
    """What the slot index is keyed by: (length, last token)."""
    return (len(tokens), tokens[-1] if len(tokens) else -1)
