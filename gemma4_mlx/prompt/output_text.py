"""Generated text for the parser, where only control *tokens* are control strings.

The parser (`prompt/parser.py`) reads decoded text, in which the special token
`<turn|>` and the characters "<turn|>" written by ordinary tokens look alike.  A reply
explaining Gemma's format, or a schema's `const` the grammar makes the model write,
would end the parsed reply or open a tool call.  So generated ids are decoded in two
kinds of pieces (docs/chat-format.md §1):
- a control token (a token whose piece has a control string's form: `<|turn>`,
  `<eos>`, `<unused25>`, ...) as its string;
- the text of ordinary tokens *guarded*: every "<" becomes U+E002, so no control
  string can be read in it; literal U+E001 / U+E002 are quoted with U+E001.
The parser built with `guarded=True` reads these pieces and hands out the text
unguarded (`unguard`), so callers see exactly what the model wrote.  Guarding keeps
lengths (one character for one), so the parser's budgets and loop checks count the
same — except for the private-use U+E001 / U+E002 themselves, two characters each
(a thinking budget then counts them twice; a tool-call string that spells them as
JSON escapes reads them as guarded).
"""

from __future__ import annotations

import weakref

from gemma4_mlx.prompt.guard import guard
from gemma4_mlx.prompt.parser import CTRL_RE
from gemma4_mlx.prompt.tokens import PromptCodec

_CONTROLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _controls(tokenizer) -> dict[int, str]:
    """id -> string of every token the parser reads as a control token: Gemma's control
    strings and the tokenizer's special tokens, and any other piece of control form
    (`<unused25>`, which a broken model emits and the parser drops).  Once per tokenizer."""
    try:
        return _CONTROLS[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable, built every time
        pass
    found = {i: s for s, i in PromptCodec(tokenizer).control_ids().items()}
    vocab = getattr(tokenizer, "get_vocab", dict)()
    found.update({i: p for p, i in vocab.items() if isinstance(p, str) and CTRL_RE.fullmatch(p)})
    try:
        _CONTROLS[tokenizer] = found
    except TypeError:
        pass
    return found


def primed_detokenizer(tokenizer, prime: bool = True):
    """A fresh streaming detokenizer; primed, it keeps the leading space of the first
    text.  mlx-lm's drop it (a reply starts a turn); text that goes on from its prompt
    (an assistant prefill, a raw completion) keeps it: one ordinary token goes in
    first and its text is read off, unsent."""
    detok = tokenizer.detokenizer
    detok.reset()
    primer = tokenizer.encode("a", add_special_tokens=False) if prime else None
    if primer:
        detok.add_token(primer[-1])
        _ = detok.last_segment
    return detok


class OutputText:
    """Streams generated ids as guarded text for a `guarded=True` parser, through the
    tokenizer's own streaming detokenizer (mlx-lm's: it holds partial characters)."""

    def __init__(self, tokenizer, detok=None, guarded: bool = True):
        """detok: the streaming detokenizer to go on with (primed, say); else a fresh one
        (mlx-lm's wrapper hands out a new copy on every `tokenizer.detokenizer`).
        guarded=False: the plain decoded text (raw completions: no parser reads it)."""
        self.detok = tokenizer.detokenizer if detok is None else detok
        self.controls = _controls(tokenizer) if guarded else {}
        self._guard = guard if guarded else str

    def add(self, token: int) -> str:
        if token not in self.controls:
            self.detok.add_token(token)
            return self._guard(self.detok.last_segment)
        self.detok.finalize()  # the ordinary text before it, whole (held spaces, partial bytes)
        before = guard(self.detok.last_segment)
        self.detok.add_token(token)  # keeps the detokenizer's own state in step
        self.detok.finalize()
        _ = self.detok.last_segment  # its text is the control string: given as such
        return before + self.controls[token]

    def finalize(self) -> str:
        self.detok.finalize()
        return self._guard(self.detok.last_segment)
