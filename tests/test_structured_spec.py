"""Constraints compose with speculative decoding (docs/structured-output.md §3): the
drafter's tokens are checked by the same per-position processor, so constrained
speculative output equals constrained plain output — greedy for one prompt and for
a ragged batch with mixed constraints, seeded sampling too — also when the drafts
break the grammar on purpose."""

from __future__ import annotations

import pytest

import gemma4_mlx
from gemma4_mlx.checkpoint.load import load_drafter
from gemma4_mlx.constrain import RowConstraints, bind, json_schema, regex
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.prompt.tokens import encode_prompt
from gemma4_mlx.runtime.generate import SamplingOptions, batch_generate, generate_tokens
from gemma4_mlx.speculative.loop import SpecStats, speculative_batch_generate, speculative_generate_tokens

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
QUESTIONS = ["What is the capital of Japan?", "Hello!", "What's the weather in Paris?", "Describe a person as JSON."]


@pytest.fixture(scope="module")
def setup():
    model, tok = gemma4_mlx.load(DEMO_MODEL)
    drafter = load_drafter(DEMO_DRAFTER, target=model)
    stops = sorted(set(model.config.eos_ids) | set(tok.eos_token_ids))
    return model, tok, drafter, stops


def _mixed(setup):
    """Ragged prompts, each row its own constraint (one row free)."""
    model, tok, _, stops = setup
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # ragged
    grammars = [
        json_schema(PERSON),
        regex(r"[A-Z][a-z]{1,8}( [a-z]{1,8}){0,3}\."),
        None,
        json_schema({"enum": ["x", "y"]}),
    ]
    cs = [None if g is None else bind(g, tok, model.config.vocab_size, stops) for g in grammars]
    return prompts, RowConstraints(prompts, cs)


@pytest.mark.parametrize(
    "grammar, accepted",
    [
        (json_schema(PERSON), False),  # the demo drafts words: every draft is refused
        (regex(r"The capital of [A-Z][a-z]+ is [A-Z][a-z]{1,5}\. Yes\."), True),  # its words fit, its stop does not
    ],
)
def test_greedy_constrained_speculative_equals_plain_one_prompt(setup, grammar, accepted):
    model, tok, drafter, stops = setup
    c = bind(grammar, tok, model.config.vocab_size, stops)
    ids = encode_prompt(tok, QUESTIONS[0])
    opts = SamplingOptions(constraint=c)
    plain = list(generate_tokens(model, ids, max_tokens=40, options=opts, stop_ids=stops))
    assert plain[-1] in stops
    stats = SpecStats()
    for k in (1, 3):
        spec = list(
            speculative_generate_tokens(
                model, drafter, ids, max_tokens=40, options=opts, stop_ids=stops, draft_tokens=k, spec_stats=stats
            )
        )
        assert spec == plain
    free = list(generate_tokens(model, ids, max_tokens=40, stop_ids=stops))
    assert free != plain  # the constraint is felt
    assert sum(stats.drafted_at) > sum(stats.accepted_at)  # drafts were refused
    assert (sum(stats.accepted_at) > 0) == accepted


def test_greedy_ragged_batch_with_mixed_constraints(setup):
    model, _, drafter, stops = setup
    prompts, rows = _mixed(setup)
    opts = SamplingOptions(constraint=rows)
    plain = batch_generate(model, prompts, max_tokens=40, options=opts, stop_ids=stops)
    spec = speculative_batch_generate(
        model, drafter, prompts, max_tokens=40, options=opts, stop_ids=stops, draft_tokens=3
    )
    assert spec == plain
    free = batch_generate(model, prompts, max_tokens=40, stop_ids=stops)
    assert free[2] == plain[2]  # the free row is untouched
    assert all(free[i] != plain[i] for i in (0, 1, 3))


def test_seeded_sampling_is_the_same_with_and_without_the_drafter(setup):
    model, _, drafter, stops = setup
    prompts, rows = _mixed(setup)
    prompts, opts = (
        prompts * 3,
        SamplingOptions(
            temperature=1.0, seed=5, constraint=RowConstraints(prompts * 3, [rows.table[tuple(p)] for p in prompts * 3])
        ),
    )
    plain = batch_generate(model, prompts, max_tokens=40, options=opts, stop_ids=stops)
    spec = speculative_batch_generate(
        model, drafter, prompts, max_tokens=40, options=opts, stop_ids=stops, draft_tokens=2
    )
    assert spec == plain
    assert plain[0] != plain[4]  # equal prompts, different samples


def test_drafts_that_break_the_grammar_are_rejected(setup):
    """Every draft replaced by tokens the grammar forbids (a control token, then a
    letter where JSON punctuation must come): output unchanged, nothing accepted."""
    model, tok, drafter, stops = setup
    c = bind(json_schema(PERSON), tok, model.config.vocab_size, stops)
    ids = encode_prompt(tok, QUESTIONS[3])
    opts = SamplingOptions(temperature=1.0, seed=9, constraint=c)
    plain = list(generate_tokens(model, ids, max_tokens=40, options=opts, stop_ids=stops))
    bad = [tok.convert_tokens_to_ids('<|"|>'), tok.convert_tokens_to_ids("Q")]
    stats = SpecStats()
    spec = list(
        speculative_generate_tokens(
            model, drafter, ids, max_tokens=40, options=opts, stop_ids=stops, draft_tokens=2, spec_stats=stats,
            draft_override=lambda rows, index, drafts: [bad[: len(d)] for d in drafts],
        )
    )  # fmt: skip
    assert spec == plain
    assert sum(stats.accepted_at) == 0 and sum(stats.drafted_at) > 0
