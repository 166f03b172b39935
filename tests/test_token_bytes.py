"""A token's own bytes (`prompt/token_bytes.py`, OpenAI's `logprobs[].bytes`): over the
tokens of any text they add up to the text's UTF-8, also where a token holds only part
of a character (its decoded text is then U+FFFD).  Checked on both decoder kinds: the
demo's byte-level BPE and a tokenizer of Gemma's own shape (BPE with byte fallback,
"▁" for spaces) as transformers saves it."""

from __future__ import annotations

import pytest
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer

import gemma4_mlx
from gemma4_mlx.checkpoint.load import load_tokenizer
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.prompt.token_bytes import token_bytes

from test_gguf_tokenizer import write_source_tokenizer

TEXTS = ["日本語 😀 café ∑x", "a\tb\n  c", "ñ" * 3 + "🇯🇵", "plain ascii words"]


@pytest.fixture(scope="module")
def byte_level():
    tok = gemma4_mlx.load(DEMO_MODEL)[1]
    assert isinstance(tok.detokenizer, BPEStreamingDetokenizer)
    return tok


@pytest.fixture(scope="module")
def gemma_shaped(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    write_source_tokenizer(folder)
    tok = load_tokenizer(folder)
    assert isinstance(tok.detokenizer, SPMStreamingDetokenizer)
    return tok


@pytest.mark.parametrize("kind", ["byte_level", "gemma_shaped"])
@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_add_up_to_the_text(kind, text, request):
    tok = request.getfixturevalue(kind)
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tok, i) for i in ids]
    assert b"".join(pieces) == text.encode("utf-8")
    if not text.isascii():  # the case the field exists for: a token that is part of a character
        assert any(tok.decode([i]) == "\ufffd" for i in ids)
        partial = next(i for i in ids if tok.decode([i]) == "\ufffd")
        assert token_bytes(tok, partial) != "\ufffd".encode()


def test_control_tokens_are_their_text(byte_level, gemma_shaped):
    for tok in (byte_level, gemma_shaped):
        turn = tok.convert_tokens_to_ids("<|turn>")
        assert token_bytes(tok, turn) == b"<|turn>"
