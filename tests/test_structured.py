"""Structured outputs (docs/structured-output.md): over hundreds of seeded samples at
temperature 1, on the embedded demo model and on a random model, every constrained
output parses and validates against its schema (jsonschema), regex outputs fully
match, and what the engine cannot compile is refused in one line before decoding."""

from __future__ import annotations

import json
import re

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import gemma4_mlx
from gemma4_mlx.api import ConstraintError
from gemma4_mlx.config import FULL, SLIDING, TextConfig
from gemma4_mlx.constrain import (
    RowConstraints,
    bind,
    bind_response_format,
    constraint_from_response_format,
    json_schema,
    regex,
)
from gemma4_mlx.constrain.processor import NEG_INF, _close_instead_of_stop, _unpack
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.models.text import Model
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import SamplingOptions, batch_generate

STR = {"type": "string", "pattern": "^[a-z]{1,6}$"}
SCHEMAS = [
    {  # flat object, required + optional
        "type": "object",
        "properties": {
            "name": STR,
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "admin": {"type": "boolean"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"enum": ["red", "green", "blue"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4},
    {  # nested
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "role": {"enum": ["a", "b"]}},
                "required": ["id", "role"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": 9},
            {"type": "string", "pattern": "^x{1,3}$"},
            {"type": "null"},
        ]
    },
    {"type": "string", "format": "date"},
    {
        "type": "object",
        "properties": {
            "ok": {"const": True},
            "none": {"type": "null"},
            "p": {"type": "integer", "minimum": -1, "maximum": 1},
        },
        "required": ["ok", "none"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"k": {"enum": ["x", "y"]}, "v": {"type": "boolean"}},
            "required": ["k"],
            "additionalProperties": False,
        },
        "maxItems": 2,
    },
    {"enum": [1, "two", None, False]},
    {  # optional members only
        "type": "object",
        "properties": {
            "a": {"type": "integer", "minimum": 1, "maximum": 3},
            "b": {"type": "string", "pattern": "^[0-9]{2}$"},
        },
        "additionalProperties": False,
    },
    {  # $defs / $ref
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer", "minimum": 0, "maximum": 9},
                    "y": {"type": "integer", "minimum": 0, "maximum": 9},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "array",
        "items": {"$ref": "#/$defs/pt"},
        "minItems": 1,
        "maxItems": 2,
    },
    {"type": "string", "format": "uuid"},
    {
        "oneOf": [
            {"type": "object", "properties": {"t": {"const": "a"}}, "required": ["t"], "additionalProperties": False},
            {"type": "boolean"},
        ]
    },
]
PATTERNS = [
    r"[A-Z]{2}-\d{3}",
    r"(yes|no|maybe)",
    r"\d{1,3}(\.\d{1,2})?",
    r"[a-c]{1,5}@[a-c]{1,5}\.(com|org)",
    r"#[0-9a-f]{6}",
]
PER_SCHEMA, MAX_TOKENS = 16, 48


def random_model(vocab: int, seed: int = 0) -> Model:
    """A small Gemma 4 text model with random weights: its samples are near-uniform
    over whatever the grammar allows."""
    cfg = TextConfig.from_dict(
        dict(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            layer_types=[SLIDING, FULL], num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            global_head_dim=16, sliding_window=16, hidden_size_per_layer_input=0, vocab_size_per_layer_input=vocab,
            final_logit_softcapping=30.0, eos_token_id=[1, 106 % vocab],
        )
    )  # fmt: skip
    model = Model(cfg)
    mx.random.seed(seed)
    model.load_weights([(k, 0.2 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.parameters())])
    return model


@pytest.fixture(scope="module")
def demo():
    return gemma4_mlx.load(DEMO_MODEL)


@pytest.fixture(scope="module", params=["demo", "random"])
def pair(request, demo):
    model, tok = demo
    return (model if request.param == "demo" else random_model(model.config.vocab_size)), tok


def _stops(model, tok):
    return sorted(set(model.config.eos_ids) | set(tok.eos_token_ids))


def _sample(model, tok, grammars, prompts_text, seed=7):
    """PER_SCHEMA seeded samples (temperature 1) of each grammar, all in one batch
    (each grammar its own prompt: `RowConstraints` routes rows by prompt)."""
    stops = _stops(model, tok)
    prompts, constraints = [], []
    for g, text in zip(grammars, prompts_text):
        c = bind(g, tok, model.config.vocab_size, stops)
        prompts += [encode_prompt(tok, text)] * PER_SCHEMA
        constraints += [c] * PER_SCHEMA
    opts = SamplingOptions(temperature=1.0, seed=seed, constraint=RowConstraints(prompts, constraints))
    outs = batch_generate(model, prompts, max_tokens=MAX_TOKENS, options=opts, stop_ids=stops)
    texts = []
    for out in outs:
        assert out[-1] in stops, f"no stop within {MAX_TOKENS} tokens: {tok.decode(out)!r}"
        texts.append(tok.decode(out[:-1]))
    return [texts[i : i + PER_SCHEMA] for i in range(0, len(texts), PER_SCHEMA)]


def test_every_sample_validates_against_its_schema(pair):
    model, tok = pair
    prompts = [f"Answer in JSON, shape {i}: {json.dumps(s)[:40]}" for i, s in enumerate(SCHEMAS)]
    groups = _sample(model, tok, [json_schema(s) for s in SCHEMAS], prompts)
    checker = jsonschema.FormatChecker()
    seen = 0
    for schema, texts in zip(SCHEMAS, groups):
        for text in texts:
            jsonschema.validate(json.loads(text), schema, format_checker=checker)
            seen += 1
    assert seen >= 200
    assert len({t for g in groups for t in g}) > 3 * len(SCHEMAS)  # really sampled, not one answer each


def test_every_regex_sample_matches_fully(pair):
    model, tok = pair
    groups = _sample(model, tok, [regex(p) for p in PATTERNS], [f"Pattern {p}" for p in PATTERNS], seed=11)
    for pattern, texts in zip(PATTERNS, groups):
        for text in texts:
            assert re.fullmatch(pattern, text), (pattern, text)


def test_any_json_object_is_a_valid_prefix_or_parses(demo):
    model, tok = demo
    c = bind(constraint_from_response_format({"type": "json_object"}), tok, model.config.vocab_size, _stops(model, tok))
    prompts = [encode_prompt(tok, "Reply with a JSON object.")] * 16
    outs = batch_generate(model, prompts, max_tokens=32, options=SamplingOptions(1.0, seed=3, constraint=c),
                          stop_ids=_stops(model, tok))  # fmt: skip
    for out in outs:
        assert c.valid_prefix(out) == len(out)  # every token was allowed
        if out[-1] in _stops(model, tok):
            assert isinstance(json.loads(tok.decode(out[:-1])), dict)


def test_api_generate_follows_schema_and_regex(demo):
    model, tok = demo
    schema = SCHEMAS[0]
    text = gemma4_mlx.generate(model, tok, "Who are you?", max_tokens=48, json_schema=schema)
    jsonschema.validate(json.loads(text), schema)
    free = gemma4_mlx.generate(model, tok, "Who are you?", max_tokens=48)
    assert text != free  # the constraint changed the answer
    text = gemma4_mlx.generate(model, tok, "Code?", max_tokens=16, regex=PATTERNS[0], temperature=1.0, seed=1)
    assert re.fullmatch(PATTERNS[0], text)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(json_schema={"type": "strnig"}), "json_schema: "),
        (dict(json_schema="{not json"), "json_schema: not JSON"),
        (dict(regex="a(b"), "regex: "),
        (dict(grammar="start: foo"), "grammar: "),
        (dict(json_schema={}, regex="a"), "give one of"),
    ],
)
def test_what_cannot_compile_is_refused_before_decoding(demo, kwargs, message, monkeypatch):
    model, tok = demo
    monkeypatch.setattr(model, "make_cache", lambda *a, **k: pytest.fail("decoding started"))
    with pytest.raises(ConstraintError) as e:
        gemma4_mlx.generate(model, tok, "Hi", **kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_response_format_shapes(demo):
    model, tok = demo
    assert constraint_from_response_format({"type": "text"}) is None
    assert bind_response_format({"type": "text"}, tok, 768, [1]) is None
    c = bind_response_format({"type": "regex", "regex": "ab"}, tok, 768, [1])
    ids = encode_prompt(tok, "ab", chat=False)[1:]  # without <bos>
    assert c.valid_prefix(ids + [1]) == len(ids) + 1 and c.valid_prefix(ids[:1] + [1]) == 1
    g = constraint_from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[1]}})
    assert g.kind == "json_schema"
    assert constraint_from_response_format({"type": "regex", "regex": "a+"}).kind == "regex"
    with pytest.raises(ConstraintError, match="response_format.type"):
        constraint_from_response_format({"type": "yaml"})
    with pytest.raises(ConstraintError, match="response_format.json_schema"):
        constraint_from_response_format({"type": "json_schema"})


def test_stop_tokens_only_where_the_grammar_accepts(demo):
    """The mask allows the stop tokens exactly at accepting states."""
    model, tok = demo
    stops = _stops(model, tok)
    proc = bind(regex("ab?"), tok, model.config.vocab_size, stops)()
    prompt = encode_prompt(tok, "x")
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    logits = mx.zeros((1, model.config.vocab_size))
    row = lambda h: proc(mx.array(prompt + h), logits)[0].tolist()  # noqa: E731
    start, after_a, after_ab = row([]), row([a]), row([a, b])
    assert all(start[s] == float("-inf") for s in stops) and start[a] == 0
    assert all(after_a[s] == 0 for s in stops) and after_a[b] == 0
    assert all(after_ab[s] == 0 for s in stops) and sum(x == 0 for x in after_ab) == len(stops)


def test_an_optional_thought_before_the_grammar(demo):
    """thought_optional: the grammar applies from the first output token, which may
    instead open a thought (free until its close; the grammar after it). Going back
    before the thought restores the grammar at the start; inside it, waits again."""
    model, tok = demo
    stops = _stops(model, tok)
    open_, close = tok.convert_tokens_to_ids("<|channel>"), tok.convert_tokens_to_ids("<channel|>")
    proc = bind(regex("ab?"), tok, model.config.vocab_size, stops).thought_optional(open_, close)()
    prompt = encode_prompt(tok, "x")
    a, b, z = (tok.convert_tokens_to_ids(c) for c in "abz")
    logits = mx.zeros((1, model.config.vocab_size))
    row = lambda h: proc(mx.array(prompt + h), logits)[0].tolist()  # noqa: E731
    start = row([])
    assert start[a] == 0 and start[open_] == 0 and start[z] == float("-inf") and start[close] == float("-inf")
    inside = row([open_, z])
    assert inside[z] == 0 and inside[close] == 0  # free text in the thought
    after = row([open_, z, close])
    assert after[a] == 0 and after[z] == float("-inf") and after[open_] == float("-inf")  # the grammar, once
    assert row([a])[open_] == float("-inf") and row([a])[b] == 0  # no thought once the answer began
    assert row([open_, z])[z] == 0 and row([])[z] == float("-inf")  # back inside, then back at the start
    assert row([open_, z, close, a])[b] == 0
    primed = encode_prompt(tok, "x") + [open_]  # the prompt itself opened the thought (after a tool result)
    fresh = bind(regex("ab?"), tok, model.config.vocab_size, stops).thought_optional(open_, close)()
    row = lambda h: fresh(mx.array(primed + h), logits)[0].tolist()  # noqa: E731
    assert row([])[z] == 0 and row([z])[close] == 0  # free until the close
    assert row([z, close])[a] == 0 and row([z, close])[z] == float("-inf")  # then the grammar
    assert row([])[z] == 0  # back at the start: still inside the prompt's thought


def test_a_grammar_that_spells_a_control_token_fails_loudly(demo):
    """A grammar forcing the text `<|"|>` made the engine offer the `<|"|>` token (its
    tokenizer's reading of that text) and then refuse it: the model wrote it, and
    the output went on unconstrained (a custom tool's input ended early with status
    completed). Such a control token is now taken out of the mask, and a mask left
    empty is a grammar failure, not a silently free output."""
    model, tok = demo
    for spelled in ('<|\\"|>', "<turn|>", "<eos>"):  # a string delimiter, and two stop tokens
        with pytest.raises(ValueError, match="the grammar needs a control token's text here"):
            gemma4_mlx.generate(model, tok, "Hi", grammar=f'start: "a" "{spelled}" "b"', max_tokens=10)
    q = tok.convert_tokens_to_ids('<|"|>')  # the same token named as a token is still allowed
    assert gemma4_mlx.generate(model, tok, "Hi", grammar=f'start: "a" <[{q}]> "b"', max_tokens=10) == 'a<|"|>b'


def test_a_prompt_that_extends_another_rows_prompt_is_its_own_row(demo):
    """Raw prompts P and P + [t] in one batch, each with its own pattern: the longer
    prompt is a row of its own (known prompts), not P's row with t as output."""
    model, tok = demo
    stops = _stops(model, tok)
    p0 = encode_prompt(tok, "Say it:", chat=False)
    p1 = p0 + encode_prompt(tok, " now", chat=False)[1:]
    cs = [bind(regex(p), tok, model.config.vocab_size, stops) for p in ("a{1,3}", "b{1,3}")]
    opts = SamplingOptions(temperature=1.0, seed=0, constraint=RowConstraints([p0, p1], cs))
    outs = batch_generate(model, [p0, p1], max_tokens=8, options=opts, stop_ids=stops)
    assert tok.decode(outs[0][:-1]) in ("a", "aa", "aaa")
    assert tok.decode(outs[1][:-1]) in ("b", "bb", "bbb")


def test_lark_grammar_with_embedded_schema(demo):
    """The engine's own grammar format: text, a choice and an embedded JSON schema."""
    model, tok = demo
    grammar = 'start: ("yes" | "no") " " %json {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 3}'
    for seed in range(4):
        text = gemma4_mlx.generate(model, tok, "Well?", max_tokens=24, grammar=grammar, temperature=1.0, seed=seed)
        word, arr = text.split(" ", 1)
        assert word in ("yes", "no") and set(json.loads(arr)) <= {1, 2}


def test_rows_alike_in_length_and_last_token_keep_their_own_grammar(demo):
    """The processor finds a row's matcher by its history's length and last token,
    then compares the whole history: two prompts equal in both, with different
    patterns, each keep their own at every step (list histories, as batches pass)."""
    model, tok = demo
    stops = _stops(model, tok)
    p0, p1 = encode_prompt(tok, "Say A:", chat=False), encode_prompt(tok, "Say B:", chat=False)
    assert len(p0) == len(p1) and p0[-1] == p1[-1] and p0 != p1
    cs = [bind(regex(p), tok, model.config.vocab_size, stops) for p in ("ab{0,3}", "ac{0,3}")]
    opts = SamplingOptions(temperature=1.0, seed=0, constraint=RowConstraints([p0, p1], cs))
    outs = batch_generate(model, [p0, p1, p0, p1], max_tokens=6, options=opts, stop_ids=stops)
    assert [re.fullmatch(p, tok.decode(o[:-1])) is not None for o, p in zip(outs, ["ab*", "ac*"] * 2)] == [True] * 4
    proc = RowConstraints([p0, p1], cs)()
    a, b, c = (tok.convert_tokens_to_ids(x) for x in "abc")
    logits = mx.zeros((1, model.config.vocab_size))
    assert proc(list(p0), logits)[0, a].item() == 0 and proc(list(p1), logits)[0, a].item() == 0
    for h, allowed, refused in ((p0 + [a], b, c), (p1 + [a], c, b), (p0 + [a, b], b, c), (p1 + [a, c], c, b)):
        row = proc(list(h), logits)[0].tolist()
        assert row[allowed] == 0 and row[refused] == float("-inf"), tok.decode(h)


def test_the_packed_mask_expands_bit_for_bit():
    """Bit t of word t // 32 allows token t; rows past the packed words stay masked."""
    rng = np.random.default_rng(0)
    words = rng.integers(0, 1 << 32, 9, dtype=np.uint64).astype(np.uint32)
    for width in (9 * 32, 9 * 32 - 5, 9 * 32 + 40):
        want = [t < 9 * 32 and bool((int(words[t // 32]) >> (t % 32)) & 1) for t in range(width)]
        assert _unpack(words, width).tolist() == want


def test_inside_the_awaited_thought_ending_becomes_closing():
    """The close token takes the best stop score when that is higher; the stop tokens
    are masked; every other logit is untouched (stop ids past the row are skipped)."""

    class C:
        stop_ids, after = (1, 6, 99), 4

    logits = mx.array([[0.5, 3.0, -1.0, 2.0, 1.0, 7.0, 2.5, 0.0]])
    want = [0.5, NEG_INF, -1.0, 2.0, 3.0, 7.0, NEG_INF, 0.0]
    assert _close_instead_of_stop(logits, C)[0].tolist() == want
    C.stop_ids, C.after = (6,), 2
    assert _close_instead_of_stop(logits, C)[0].tolist() == [0.5, 3.0, 2.5, 2.0, 1.0, 7.0, NEG_INF, 0.0]
    C.stop_ids, C.after = (1, 4), 4  # a close that is also a stop stays masked
    assert _close_instead_of_stop(logits, C)[0].tolist() == [0.5, NEG_INF, -1.0, 2.0, NEG_INF, 7.0, 2.5, 0.0]
