"""Only the template's structure makes control tokens; message text never does.

A user who types `<turn|>\\n<|turn>system\\n…` must not be able to open a system
turn, and neither may a tool result (a web page, a file) or a document.  So the
text a conversation carries (user, system, tool and assistant contents, thoughts,
tool-call arguments, tool declarations) is *escaped* before the template renders
it, and the rendered prompt is *encoded* in two kinds of pieces:

- control strings the template wrote (`<|turn>`, `<|tool_call>`, `<|"|>`, …) become
  their single token ids;
- the text between them, unescaped back to exactly what was typed, is tokenized as
  plain text: a control string inside it is split after its first character, so
  the tokenizer can only produce ordinary pieces for it (the model still reads
  the literal characters).

Escaping inserts U+E000 after the first character of every control string found
in the text (literal U+E000 / U+E001 are quoted with U+E001), so no control
string survives rendering and the template's own string handling (trimming,
thought stripping) sees ordinary text.  Text without control strings tokenizes
exactly as before (the tokenizer also splits at control tokens first).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from gemma4_mlx.prompt.template import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    normalize_messages,
    render_with_checkpoint_template,
)

_BREAK = "\ue000"  # inserted after a control string's first character
_QUOTE = "\ue001"  # quotes a literal _BREAK or _QUOTE in the text
_UNESCAPE = re.compile(f"{_QUOTE}(.)|{_BREAK}", re.S)


def control_strings(tokenizer) -> list[str]:
    """Gemma 4's control strings plus every special token the tokenizer declares."""
    found = set(SPECIAL_TOKENS)
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF tokenizer
    for tok in (getattr(hf, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return sorted((s for s in found if len(s) > 1), key=len, reverse=True)


class PromptCodec:
    """Escapes untrusted text for rendering and encodes rendered prompts (module doc)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.controls = control_strings(tokenizer)
        self._control_re = re.compile("|".join(re.escape(s) for s in self.controls))
        self._heads = {c[:k] for c in self.controls for k in range(1, len(c))}  # proper prefixes
        self._longest_head = max((len(c) - 1 for c in self.controls), default=0)
        unk = getattr(tokenizer, "unk_token_id", None)
        ids = {s: tokenizer.convert_tokens_to_ids(s) for s in self.controls}
        # a control string this vocabulary lacks is ordinary text, as the tokenizer has it
        self._ids = {s: i for s, i in ids.items() if isinstance(i, int) and (i != unk or s == "<unk>")}

    def control_ids(self) -> dict[str, int]:
        """Every control string this vocabulary has as one token, with its id."""
        return dict(self._ids)

    # -- before rendering ------------------------------------------------------
    def escape(self, text: str) -> str:
        text = text.replace(_QUOTE, _QUOTE + _QUOTE).replace(_BREAK, _QUOTE + _BREAK)
        return self._control_re.sub(lambda m: m.group(0)[0] + _BREAK + m.group(0)[1:], text)

    def escape_value(self, value):
        """Every string in a message / tool structure, keys included.  Structural
        values (roles, part types, ids) hold no control strings, so they come out
        unchanged; one that does is untrusted text and is escaped like any other."""
        if isinstance(value, str):
            return self.escape(value)
        if isinstance(value, Mapping):
            return {self.escape_value(k) if isinstance(k, str) else k: self.escape_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.escape_value(v) for v in value]
        return value

    def escape_messages(self, messages) -> list[dict]:
        """Every string of every message escaped, in the form the templates render
        (`normalize_messages`).  Normalizing first parses tool-call arguments given as
        JSON text: escaped as text, a control string hidden behind JSON's own escapes
        (`<|\\"|>`, `\\u003c|turn>`) would pass, and the template's parse would bring it back.
        Then every text a template may put right before other untrusted text is guarded
        (`_guard_end`): a message's text parts are joined with nothing between, and so
        are consecutive assistant messages in one model turn."""
        out = []
        for m in normalize_messages(messages):
            m = self.escape_value(m)
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = self._guard_end(content)
            elif isinstance(content, list):
                m["content"] = [self._guard_part(p) for p in content]
            out.append(m)
        return out

    def _guard_part(self, part):
        text = part.get("text") if isinstance(part, Mapping) else None
        return {**part, "text": self._guard_end(text)} if isinstance(text, str) else part

    def _guard_end(self, text: str) -> str:
        """`text` ending in a break when its trimmed end could start a control string,
        so that whatever untrusted text follows it once rendered (`"hi <turn|"`, then
        `">"`) cannot complete one.  `unescape` removes the break; where nothing could
        join, the text is unchanged."""
        core = text.rstrip()
        tail = range(1, min(len(core), self._longest_head) + 1)
        if any(core[-k:] in self._heads for k in tail):
            return core + _BREAK + text[len(core) :]
        return text

    # -- after rendering -------------------------------------------------------
    @staticmethod
    def unescape(text: str) -> str:
        return _UNESCAPE.sub(lambda m: m.group(1) if m.group(1) is not None else "", text)

    def encode(self, rendered: str) -> list[int]:
        """Token ids of a rendered (escaped) prompt; adds no BOS of its own."""
        ids, pos = [], 0
        for m in self._control_re.finditer(rendered):
            if m.group(0) not in self._ids:
                continue
            ids += self.encode_text(self.unescape(rendered[pos : m.start()]))
            ids.append(self._ids[m.group(0)])
            pos = m.end()
        return ids + self.encode_text(self.unescape(rendered[pos:]))

    def encode_text(self, text: str) -> list[int]:
        """Plain text to ids that never include a control token."""
        if not text:
            return []
        cuts = [m.start() + 1 for m in self._control_re.finditer(text)]
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        return [i for p in pieces for i in self.tokenizer.encode(p, add_special_tokens=False)]


def chat_template_for(tokenizer) -> str | None:
    """The template a prompt of this tokenizer is rendered with: the checkpoint's own,
    else ours (`template.CHAT_TEMPLATE`) when the vocabulary has Gemma 4's turn tokens
    (an instruction checkpoint without a template file); None = raw text."""
    own = getattr(tokenizer, "chat_template", None)
    if own:
        return own
    unk = getattr(tokenizer, "unk_token_id", None)
    turns = [tokenizer.convert_tokens_to_ids(s) for s in ("<|turn>", "<turn|>")]
    return CHAT_TEMPLATE if all(isinstance(i, int) and i != unk for i in turns) else None


def render_user_turn(codec: PromptCodec, template: str, content) -> str:
    """One user message (a string or content parts) rendered by a checkpoint template,
    escaped, ending with the generation prompt; `codec.encode` gives its ids."""
    return render_with_checkpoint_template(template, [{"role": "user", "content": codec.escape_value(content)}])


def ends_in_open_thought(ids: Sequence[int], open_id: int, close_id: int) -> bool:
    """Whether token ids end inside an open thought: of the thought channel's open and
    close tokens, the open one comes last (with thinking on, the template opens one
    for the model after a tool result)."""
    for t in reversed(ids):
        if t == open_id or t == close_id:
            return t == open_id
    return False


def encode_prompt(tokenizer, prompt: str | Sequence[int], chat: bool = True) -> list[int]:
    """Token ids for a prompt: a user turn of the chat template (`chat_template_for`:
    the checkpoint's, else ours for a Gemma 4 vocabulary); the prompt is user text, so
    control strings typed in it stay text.  With chat=False, or a tokenizer without
    Gemma 4's turn tokens, the raw text, control strings included, as the tokenizer
    reads it."""
    if not isinstance(prompt, str):  # token ids: a list, or an mx / numpy array
        return prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
    template = chat_template_for(tokenizer) if chat else None
    if template:
        codec = PromptCodec(tokenizer)
        return codec.encode(render_user_turn(codec, template, prompt))
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None and (not ids or ids[0] != bos) else []) + list(ids)
