"""Our chat template (gemma4_mlx/prompt/chat_template.jinja), shipped with checkpoints
that have none, renders exactly what the built-in renderer does: on every golden of
test_chat_format, on nested tool schemas, and on thousands of demo-corpus turns."""

import random

import pytest

from gemma4_mlx.demo.corpus import corpus
from gemma4_mlx.prompt.template import CHAT_TEMPLATE, render, render_with_checkpoint_template

from test_chat_format import EXCHANGE, MATRIX, PLAN_TRIP, get_weather, test_declaration_nested_schema_order

# the nested golden's tool, plus what it lacks: hoisted extra keys, type unions, item extras
NESTED = {
    **PLAN_TRIP,
    "parameters": {
        **PLAN_TRIP["parameters"],
        "properties": {
            **PLAN_TRIP["parameters"]["properties"],
            "extra": {"type": "object", "color": {"type": "string"}, "size": {"type": ["integer", "null"]}},
            "tags": {"type": "array", "items": {"type": ["string", "null"], "maxLength": 8, "example": None}},
            "Zeta": {"type": "boolean"},
            "cost": {"type": ["number", "null"], "nullable": True, "description": "Max spend"},
        },
    },
}


def both(messages, **kw):
    return render(messages, **kw), render_with_checkpoint_template(CHAT_TEMPLATE, messages, **kw)


@pytest.mark.parametrize("case", MATRIX, ids=[c[0] for c in MATRIX])
def test_goldens(case):
    _, messages, kw, expected = case
    kw = dict(kw)
    if "thinking" in kw:
        kw["thinking"] = kw.pop("thinking")
    ours, shipped = both(messages, **kw)
    assert shipped == ours == expected


@pytest.mark.parametrize("thinking", [False, True])
def test_tool_declarations(thinking):
    hello = [{"role": "user", "content": "Hi"}]
    for tools in ([NESTED], [EXCHANGE], [get_weather], [NESTED, EXCHANGE, get_weather]):
        ours, shipped = both(hello, tools=tools, thinking=thinking)
        assert shipped == ours


def test_demo_corpus_turns():
    rng = random.Random(0)
    checked = 0
    for conv in corpus(600, seed=3):
        msgs = conv["messages"]
        for i in range(1, len(msgs) + 1):
            for gen in (True, False):
                kw = dict(
                    tools=conv["tools"],
                    thinking=conv["thinking"],
                    add_generation_prompt=gen,
                    empty_thought_prefill=rng.random() < 0.3,
                )
                ours, shipped = both(msgs[:i], **kw)
                assert shipped == ours, (msgs[:i], kw)
                checked += 1
    assert checked > 3000


def test_nested_golden_through_the_template():
    """The nested-schema golden of test_chat_format holds for the template too."""
    test_declaration_nested_schema_order()  # our renderer
    ours, shipped = both([{"role": "user", "content": "Hi"}], tools=[NESTED])
    assert shipped == ours
