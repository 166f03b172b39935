"""The raw bytes of one token, for OpenAI's `logprobs[].bytes`.

A token's decoded text is not its bytes: a token holding part of a multi-byte
character decodes to U+FFFD, and clients put such tokens back together from their
bytes.  The bytes are read from the vocabulary piece, the way the tokenizer's own
decoder would read it, for the two decoders mlx-lm's wrapper tells apart:
- SentencePiece-style (Gemma's): "▁" is a space, "<0xNN>" is the byte NN (byte
  fallback), any other piece is its UTF-8;
- byte-level BPE (GPT-2's): every character of the piece stands for one byte through
  a fixed table (printable bytes as themselves, the others shifted above U+0100).
Any other decoder (or a piece outside the table): the UTF-8 of the decoded text.
"""

from __future__ import annotations

import functools
import re

from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def byte_level_table() -> dict[str, int]:
    """character -> byte of byte-level BPE vocabularies: the 188 printable bytes
    (! .. ~, ¡ .. ¬, ® .. ÿ) stand for themselves; the other 68, in byte order, are
    the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(0x100 + n): b for n, b in enumerate(shifted)})
    return table


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes token id `token` stands for (mlx-lm TokenizerWrapper)."""
    detok = tokenizer.detokenizer
    if isinstance(detok, (SPMStreamingDetokenizer, BPEStreamingDetokenizer)):
        piece = tokenizer.convert_ids_to_tokens(int(token))
        if isinstance(piece, str):
            if isinstance(detok, SPMStreamingDetokenizer):
                fallback = _BYTE_PIECE.fullmatch(piece)
                return bytes([int(fallback[1], 16)]) if fallback else piece.replace("\u2581", " ").encode()
            table = byte_level_table()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
    return tokenizer.decode([int(token)]).encode()
