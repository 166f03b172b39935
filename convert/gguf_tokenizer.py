"""The HF tokenizer and chat template of a Gemma 4 GGUF, rebuilt from `tokenizer.ggml.*`.

What llama.cpp's converter writes for Gemma 4 (its `Gemma4Model.set_vocab`, reading the
HF tokenizer.json through gguf-py's `LlamaHfVocab` and `SpecialVocab`):
- `tokenizer.ggml.model` = "gemma4": a BPE over raw UTF-8 with "▁" for spaces and
  byte fallback (`<0xNN>` tokens), i.e. the HF tokenizer.json's BPE model;
- `tokenizer.ggml.tokens`: every HF token text, by id;
- `tokenizer.ggml.token_type`: 6 (byte) for `<0xNN>`, 3 (control) for the HF special
  tokens, 4 (user-defined) for the control strings llama.cpp must render (`<|channel>`,
  `<|tool_call>`, `<|"|>`, ...), 1 (normal) otherwise;
- `tokenizer.ggml.merges`: "left right" strings in rank order (a space inside a part
  spelled U+0120); `tokenizer.ggml.scores`: a placeholder (-1000), not used here;
- `tokenizer.ggml.{bos,eos,unknown,padding,mask}_token_id`, `add_bos_token` (true:
  llama.cpp adds BOS for every Gemma 4 GGUF) and `tokenizer.chat_template`.

From these this writes tokenizer.json in the shape of Gemma's own (normalizer " " ->
"▁", BPE with byte fallback, decoder "▁" -> " " / byte fallback / fuse), every
control, user-defined, unknown or unused token a special added token at its id;
tokenizer_config.json (roles, Gemma 4's named control tokens, the other special
tokens); chat_template.jinja (and additional_chat_templates/NAME.jinja).  Not in a
GGUF, so not rebuilt: which normal tokens the HF file also listed as added tokens.
Bad metadata is refused in one line naming the key.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from gemma4_mlx.prompt.template import STOP_STRINGS

from .errors import ConvertError

K = "tokenizer.ggml."
TEMPLATE = "tokenizer.chat_template"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPECIAL = {UNKNOWN, CONTROL, USER_DEFINED, UNUSED}
ROLES = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
    "mask": "mask_token_id",
}
# Gemma 4's named control tokens, as its tokenizer_config.json names them
NAMED = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "sot_token": "<|turn>",
    "eot_token": "<turn|>",
    "soc_token": "<|channel>",
    "eoc_token": "<channel|>",
    "think_token": "<|think|>",
    "escape_token": '<|"|>',
    "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>",
    "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>",
    "std_token": "<|tool>",
    "etd_token": "<tool|>",
}
# llama.cpp ends generation on these besides EOS whenever a vocabulary has them
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[tuple[str, str]]
    roles: dict[str, int]  # "bos" -> id, ...
    template: str | None = None
    named_templates: dict[str, str] = field(default_factory=dict)
    tokenizer: object = None  # the built `tokenizers.Tokenizer`

    @property
    def special_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.types) if t in _SPECIAL]

    def eos_ids(self) -> list[int]:
        """EOS and the other end-of-generation tokens llama.cpp stops on."""
        index = {t: i for i, t in enumerate(self.tokens)}
        ids = [self.roles["eos"]] if "eos" in self.roles else []
        ids += [index[t] for t in STOP_STRINGS if t in index and self.types[index[t]] in _SPECIAL]
        return list(dict.fromkeys(ids))

    def summary(self) -> dict:
        return {
            "from": "tokenizer.ggml.*",
            "model": "gemma4",
            "tokens": len(self.tokens),
            "merges": len(self.merges),
            "special_tokens": len(self.special_ids),
            "chat_template": self.template is not None,
            **({"named_chat_templates": sorted(self.named_templates)} if self.named_templates else {}),
        }


def read_vocab(g, rows: int) -> Vocab | None:
    """The GGUF's vocabulary, checked; None when it has no `tokenizer.ggml.tokens`.
    rows: the token embedding's row count (every token id must have a row)."""
    md = g.metadata
    if K + "tokens" not in md:
        return None
    model = md.get(K + "model")
    if model != "gemma4":
        raise ConvertError(
            f"{g.path}: metadata key {K}model is {model!r}; only 'gemma4' (llama.cpp's "
            "Gemma 4 BPE vocabulary) can be rebuilt"
        )
    tokens = _tokens(g, rows)
    types = md.get(K + "token_type")
    if not (
        isinstance(types, list)
        and len(types) == len(tokens)
        and all(type(t) is int and NORMAL <= t <= BYTE for t in types)
    ):
        raise ConvertError(
            f"{g.path}: metadata key {K}token_type must list a type 1-6 for each of the {len(tokens)} tokens"
        )
    index = {t: i for i, t in enumerate(tokens)}
    vocab = Vocab(tokens, types, _merges(g, index), _roles(g, len(tokens)))
    vocab.template, vocab.named_templates = _templates(g)
    try:  # built now, so that a vocabulary it cannot take fails before any weight is read
        vocab.tokenizer = _tokenizer(vocab)
    except Exception as e:  # the tokenizers library's own complaint, in one line
        raise ConvertError(
            f"{g.path}: metadata keys {K}*: cannot build a tokenizer ({' '.join(str(e).split())})"
        ) from None
    return vocab


def _tokens(g, rows: int) -> list[str]:
    tokens = g.metadata[K + "tokens"]
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) and t for t in tokens)):
        raise ConvertError(f"{g.path}: metadata key {K}tokens must be a non-empty list of non-empty strings")
    if len(tokens) > rows:
        raise ConvertError(
            f"{g.path}: metadata key {K}tokens lists {len(tokens)} tokens; token_embd.weight has {rows} rows"
        )
    if len(set(tokens)) != len(tokens):
        seen = set()
        dup = next(i for i, t in enumerate(tokens) if t in seen or seen.add(t))
        raise ConvertError(f"{g.path}: metadata key {K}tokens repeats token {tokens[dup]!r} (id {dup})")
    return tokens


def _merges(g, index: dict[str, int]) -> list[tuple[str, str]]:
    merges = g.metadata.get(K + "merges")
    if not isinstance(merges, list) or not merges or not all(isinstance(m, str) for m in merges):
        raise ConvertError(
            f"{g.path}: metadata key {K}merges must be a non-empty list of strings "
            "(the BPE merges of a gemma4 vocabulary)"
        )
    out = []
    for n, m in enumerate(merges):
        cut = m.find(" ", 1)  # as llama.cpp splits them: a part never starts with a space
        pair = (_part(m[:cut], index), _part(m[cut + 1 :], index)) if cut > 0 else (None, None)
        if None in pair or pair[0] + pair[1] not in index:
            raise ConvertError(
                f"{g.path}: metadata key {K}merges entry {n} ({m!r}) is not 'LEFT RIGHT' "
                f"with LEFT, RIGHT and LEFTRIGHT all in {K}tokens"
            )
        out.append(pair)
    return out


def _part(text: str, index: dict[str, int]) -> str | None:
    """A merge part as a vocabulary token (gguf-py spells a space inside one U+0120)."""
    if text in index:
        return text
    spaced = text.replace("\u0120", " ")
    return spaced if spaced in index else None


def _roles(g, n: int) -> dict[str, int]:
    roles = {}
    for role, key in ROLES.items():
        v = g.metadata.get(K + key)
        if v is None:
            continue
        if type(v) is not int or not 0 <= v < n:
            raise ConvertError(f"{g.path}: metadata key {K}{key} is {v!r}; expected a token id below {n}")
        roles[role] = v
    return roles


def _templates(g) -> tuple[str | None, dict[str, str]]:
    named = {}
    for key, v in g.metadata.items():
        if key != TEMPLATE and not key.startswith(TEMPLATE + "."):
            continue
        if not isinstance(v, str):
            raise ConvertError(f"{g.path}: metadata key {key} must be a string (a Jinja chat template)")
        name = key[len(TEMPLATE) + 1 :]
        if key != TEMPLATE and (not _NAME.match(name) or name == "default"):
            raise ConvertError(f"{g.path}: metadata key {key}: {name!r} is not a usable template name")
        if key != TEMPLATE:
            named[name] = v
    return g.metadata.get(TEMPLATE), named


# -- writing ---------------------------------------------------------------------------


def write(vocab: Vocab, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and the chat template(s) into `out`."""
    vocab.tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_config(vocab), indent=2, ensure_ascii=False) + "\n")
    if vocab.template is not None:
        (out / "chat_template.jinja").write_text(vocab.template, encoding="utf-8")
    if vocab.named_templates:
        folder = out / "additional_chat_templates"
        folder.mkdir()
        for name, text in vocab.named_templates.items():
            (folder / f"{name}.jinja").write_text(text, encoding="utf-8")


def _tokenizer(vocab: Vocab) -> Tokenizer:
    unk = vocab.tokens[vocab.roles["unk"]] if "unk" in vocab.roles else None
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    tok = Tokenizer(BPE(vocab=ids, merges=vocab.merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(vocab.tokens[i], special=True, normalized=False) for i in vocab.special_ids])
    if "bos" in vocab.roles:  # llama.cpp adds BOS for every Gemma 4 GGUF
        bos = vocab.tokens[vocab.roles["bos"]]
        tok.post_processor = processors.TemplateProcessing(
            single=[bos, "$A"], pair=[bos, "$A", bos, "$B:1"], special_tokens=[(bos, vocab.roles["bos"])]
        )
    return tok


def _config(vocab: Vocab) -> dict:
    special = {vocab.tokens[i] for i in vocab.special_ids}
    cfg = {
        "tokenizer_class": "GemmaTokenizer",
        "add_bos_token": "bos" in vocab.roles,
        "add_eos_token": False,
        "padding_side": "left",
    }
    roles = {f"{role}_token": vocab.tokens[i] for role, i in vocab.roles.items()}
    named = {name: text for name, text in NAMED.items() if text in special}
    cfg.update(roles, **named)
    named = {*roles.values(), *named.values()}
    cfg["extra_special_tokens"] = [vocab.tokens[i] for i in vocab.special_ids if vocab.tokens[i] not in named]
    return cfg
