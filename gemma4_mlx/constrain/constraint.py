"""A `Grammar` bound to a tokenizer: the factory `SamplingOptions.constraint` calls
(docs/structured-output.md §3).

`Constraint()` returns a fresh `ConstraintProcessor` (one per generation);
`RowConstraints` gives each prompt of a batch its own constraint.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import llguidance as llg
import numpy as np

from gemma4_mlx.constrain.grammar import ConstraintError, Grammar, constraint_from_response_format
from gemma4_mlx.constrain.processor import ConstraintProcessor

# Building the engine's token trie reads every piece (about a second for 262,144
# pieces), so it is done once per tokenizer object and vocabulary size.
_ENGINE_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _backend(tokenizer):
    """The `tokenizers.Tokenizer` under an mlx-lm wrapper, an HF fast tokenizer, or itself."""
    for path in (("_tokenizer", "backend_tokenizer"), ("backend_tokenizer",), ()):
        obj = tokenizer
        for name in path:
            obj = getattr(obj, name, None)
        if obj is not None and hasattr(obj, "to_str"):
            return obj
    raise ConstraintError(f"constrained decoding needs a fast (tokenizers) tokenizer, got {type(tokenizer).__name__}")


def _cached(tokenizer) -> dict:
    """What is kept for one tokenizer object (an empty dict for one that is not
    weak-referenceable: built every time)."""
    try:
        return _ENGINE_TOKENIZERS.setdefault(tokenizer, {})
    except TypeError:
        return {}


def _special_ids(tokenizer, engine: llg.LLTokenizer, vocab_size: int) -> tuple[int, ...]:
    """The engine's special (control) token ids, found once per tokenizer and size."""
    per, key = _cached(tokenizer), ("special", vocab_size)
    if key not in per:
        per[key] = tuple(i for i in range(min(vocab_size, engine.vocab_size)) if engine.is_special_token(i))
    return per[key]


def engine_tokenizer(tokenizer, vocab_size: int) -> llg.LLTokenizer:
    """llguidance's view of `tokenizer`, padded to the model's `vocab_size` rows."""
    per = _cached(tokenizer)
    if vocab_size not in per:
        eos = getattr(tokenizer, "eos_token_id", None)
        per[vocab_size] = llg.LLTokenizer(_backend(tokenizer).to_str(), n_vocab=vocab_size, eos_token=eos)
    return per[vocab_size]


@dataclass
class Constraint:
    """grammar bound to `engine` (llguidance tokenizer).  stop_ids: the model's stop
    tokens — allowed exactly where the grammar accepts.  after: when set (the
    thought channel's close token), the output is free until this token and the
    grammar applies to what follows it.  opener: when set too (the channel's open
    token, `thought_optional`), the grammar applies from the start instead, but the
    output may open with this token (or its prompt end inside an open thought):
    that thought is free until `after`, and the grammar applies after it.
    controls: the vocabulary's control (special) tokens other than the stop tokens,
    which the mask offers only where the grammar takes them as tokens
    (`_Slot.allowed`)."""

    grammar: Grammar
    engine: llg.LLTokenizer
    vocab_size: int
    stop_ids: tuple[int, ...]
    after: int | None = None
    opener: int | None = None
    controls: tuple[int, ...] = ()
    _proto: llg.LLMatcher | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self._proto is None:
            self.grammar.check(self.engine)
            proto = llg.LLMatcher(self.engine, self.grammar.source, log_level=0)
            first = proto.deep_copy()
            if not proto.is_error():
                first.compute_bitmask()  # the first mask: some grammars (a `$ref` loop) fail only here
            for m in (proto, first):
                if m.is_error():
                    why = m.get_error().splitlines()[0]
                    if why == "NoExtensionBias":  # the engine's name for it; say what it means
                        why = "no text can start a sentence of this grammar (a rule that only refers to itself?)"
                    raise ConstraintError(f"{self.grammar.what}: {why}")
            for part in self.grammar.parts:  # a nested grammar's first mask would come mid-output: check it now
                Constraint(part, self.engine, self.vocab_size, self.stop_ids)
            self._proto = proto

    @functools.cached_property
    def control_array(self) -> np.ndarray:
        """`controls` as an array (the processor tests them against each mask)."""
        return np.array(self.controls, dtype=np.uint32)

    def matcher(self) -> llg.LLMatcher:
        """A matcher at the grammar's start (a copy of the compiled one)."""
        return self._proto.deep_copy()

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (an output, stop tokens included) the grammar allows."""
        fed = [self.engine.eos_token if t in self.stop_ids else t for t in tokens]
        return self.matcher().validate_tokens(fed)

    def finished(self, tokens: Sequence[int]) -> bool:
        """Whether `tokens` (an output without its stop token) end the grammar's sentence:
        nothing but the end may follow (a sentence that could go on — a number, an
        optional tail — is not finished, even where it could stop)."""
        m = self.matcher()
        return bool(m.consume_tokens(list(tokens))) and m.is_stopped()

    def answer_only(self, close_id: int | None) -> Constraint:
        """This constraint applied after `close_id` (the thought channel's end)."""
        return replace(self, after=close_id, opener=None)

    def thought_optional(self, open_id: int | None, close_id: int | None) -> Constraint:
        """This constraint from the start, or after a thought the output opens with
        (`open_id` ... `close_id`), thinking on or off: a model may open one, or not,
        either way (docs/structured-output.md §4).  Unchanged without both ids."""
        if open_id is None or close_id is None:
            return self
        return replace(self, after=close_id, opener=open_id)

    def __call__(self) -> ConstraintProcessor:
        return ConstraintProcessor(lambda prompt: self)


def bind(grammar: Grammar, tokenizer, vocab_size: int, stop_ids: Sequence[int], after: int | None = None) -> Constraint:
    """Tie `grammar` to a tokenizer and a model's vocabulary; raises `ConstraintError`
    (one line) when the engine cannot compile it for this tokenizer."""
    if not stop_ids:
        raise ConstraintError("constrained decoding needs the model's stop token ids")
    engine = engine_tokenizer(tokenizer, vocab_size)
    stops = tuple(sorted(set(stop_ids)))
    controls = tuple(i for i in _special_ids(tokenizer, engine, vocab_size) if i not in stops)
    return Constraint(grammar, engine, vocab_size, stops, after, controls=controls)


def bind_response_format(
    response_format, tokenizer, vocab_size: int, stop_ids: Sequence[int], after: int | None = None
) -> Constraint | None:
    """`constraint_from_response_format` then `bind`, in one call (the server's use):
    None for free text; after: the thought channel's close id when thinking is on."""
    grammar = (
        response_format if isinstance(response_format, Grammar) else constraint_from_response_format(response_format)
    )
    return None if grammar is None else bind(grammar, tokenizer, vocab_size, stop_ids, after)


class RowConstraints:
    """One constraint per prompt of a batch (None: that row is free).  Rows are told
    apart by their prompts, so equal prompts must share a constraint."""

    def __init__(self, prompts: Sequence[Sequence[int]], constraints: Sequence[Constraint | None]):
        if len(prompts) != len(constraints):
            raise ValueError(f"{len(prompts)} prompts but {len(constraints)} constraints")
        self.table: dict[tuple, Constraint | None] = {}
        for p, c in zip(prompts, constraints):
            key = tuple(p)
            if key in self.table and self.table[key] is not c:
                raise ValueError("rows with the same prompt must have the same constraint")
            self.table[key] = c

    def __call__(self) -> ConstraintProcessor:
        return ConstraintProcessor(self.table.get, known_prompts=set(self.table))
