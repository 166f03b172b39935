"""How the embedded demo drafter is measured: the demo chats, and greedy acceptance
per draft position for K = 1..5 with a losslessness check against plain greedy
decoding (`measure`; its table goes into the drafter's README)."""

from __future__ import annotations

from gemma4_mlx.chat.session import STOP_STRINGS
from gemma4_mlx.demo.corpus import WEATHER_TOOL
from gemma4_mlx.prompt.template import render
from gemma4_mlx.runtime.generate import generate_tokens
from gemma4_mlx.speculative import loop as speculative
from gemma4_mlx.speculative.loop import SpecStats, speculative_batch_generate

DEMO_CHATS = [
    dict(messages=[{"role": "user", "content": "What is the capital of France?"}]),
    dict(messages=[{"role": "user", "content": "What is 7 plus 12?"}]),
    dict(messages=[{"role": "user", "content": "Hello!"}]),
    dict(messages=[{"role": "user", "content": "What's the weather in Tokyo?"}], tools=True),
    dict(messages=[{"role": "user", "content": "Name the capital of Kenya."}], thinking=True),
    dict(
        messages=[
            {"role": "user", "content": "What is the capital of Peru?"},
            {"role": "assistant", "content": "The capital of Peru is Lima."},
            {"role": "user", "content": "Add 9 and 15."},
            {"role": "assistant", "content": "9 plus 15 is 24."},
            {"role": "user", "content": "Hi there"},
        ]
    ),
    dict(
        messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Is it cold in Oslo?"}],
        tools=True,
        thinking=True,
    ),
    dict(messages=[{"role": "user", "content": "capital of Sweden?"}], tools=True),
    dict(
        messages=[
            {"role": "user", "content": "What is the weather like in Denver?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Denver"}}}
                ],
            },
            {"role": "tool", "name": "get_weather", "content": {"temperature": 17, "condition": "windy"}},
        ],
        tools=True,
    ),
]


def render_chat(tokenizer, chat: dict) -> list[int]:
    """Token ids of a demo chat prompt, rendered as `gemma4_mlx.prompt` renders it."""
    text = render(
        chat["messages"],
        tools=[WEATHER_TOOL] if chat.get("tools") else None,
        thinking=chat.get("thinking", False),
        add_generation_prompt=True,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def stop_ids(tokenizer, target) -> list[int]:
    ids = {tokenizer.convert_tokens_to_ids(s) for s in STOP_STRINGS}
    return sorted((ids - {None, tokenizer.unk_token_id}) | set(target.config.eos_ids))


def measure(
    target, drafter, tokenizer, ks=(1, 2, 3, 4, 5), max_tokens: int = 64, chats=DEMO_CHATS, draft_fn=None
) -> dict:
    """Greedy acceptance per draft position and tokens/round for each K, and whether
    the speculative output equals plain greedy decoding."""
    prompts = [render_chat(tokenizer, c) for c in chats]
    stops = stop_ids(tokenizer, target)
    plain = [list(generate_tokens(target, p, max_tokens=max_tokens, stop_ids=stops)) for p in prompts]
    out = {}
    saved = speculative.draft
    try:
        if draft_fn is not None:
            speculative.draft = draft_fn
        for K in ks:
            stats = SpecStats()
            spec = speculative_batch_generate(
                target, drafter, prompts, max_tokens=max_tokens, draft_tokens=K, stop_ids=stops, stats=stats
            )
            out[K] = dict(
                acceptance=stats.acceptance(),
                tokens_per_round=stats.tokens_per_round,
                rounds=stats.rounds,
                lossless=spec == plain,
            )
    finally:
        speculative.draft = saved
    return out


def format_measure(res: dict) -> str:
    lines = ["| K | acceptance by position | tokens/round | rounds | == greedy |", "|---|---|---|---|---|"]
    for K, r in res.items():
        acc = " ".join(f"{a:.2f}" for a in r["acceptance"])
        lines.append(
            f"| {K} | {acc} | {r['tokens_per_round']:.2f} | {r['rounds']} | {'yes' if r['lossless'] else 'NO'} |"
        )
    return "\n".join(lines)
