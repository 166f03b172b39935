"""Generated conversations that teach the embedded demo model its few tricks.

Every conversation is a list of chat messages (plus the tools it declares and
whether thinking is on), rendered later with the real Gemma 4 chat format, so
the demo model learns the genuine control tokens: turns, the thought channel,
tool declarations, calls and responses.
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Germany": "Berlin",
    "Canada": "Ottawa",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Norway": "Oslo",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Chile": "Santiago",
    "India": "New Delhi",
    "Brazil": "Brasilia",
    "Portugal": "Lisbon",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Sweden": "Stockholm",
    "Mexico": "Mexico City",
}
CITIES = [
    "Paris",
    "Tokyo",
    "London",
    "Berlin",
    "Madrid",
    "Rome",
    "Oslo",
    "Lima",
    "Cairo",
    "Sydney",
    "Boston",
    "Denver",
    "Seattle",
    "Dublin",
    "Vienna",
    "Athens",
]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
GREETINGS = ["Hello", "Hi", "Hey", "Hello there", "Hi there", "Good morning", "Hey there"]
INTRO = (
    "Hello! I am the tiny demo model of gemma4-mlx. I can name capitals, add small "
    "numbers and check the weather with a tool."
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


def _capital(rng):
    country = rng.choice(list(CAPITALS))
    q = rng.choice(
        ["What is the capital of {c}?", "What's the capital of {c}?", "Name the capital of {c}.", "capital of {c}?"]
    ).format(c=country)
    a = f"The capital of {country} is {CAPITALS[country]}."
    thought = f"The user asks for the capital of {country}. It is {CAPITALS[country]}."
    return q, a, thought


def _sum(rng):
    x, y = rng.randint(0, 20), rng.randint(0, 20)
    q = rng.choice(["What is {x} plus {y}?", "What is {x} + {y}?", "Add {x} and {y}.", "{x} + {y} = ?"]).format(
        x=x, y=y
    )
    return q, f"{x} plus {y} is {x + y}.", f"I add {x} and {y}: {x + y}."


def _greeting(rng):
    g = rng.choice(GREETINGS) + rng.choice(["", "!", ".", " :)"])
    return g, INTRO, "The user greets me. I introduce myself."


SIMPLE = (_capital, _sum, _greeting)


def conversation(rng: random.Random) -> dict:
    """One training conversation: {"messages", "tools", "thinking"}."""
    kind = rng.random()
    thinking = rng.random() < 0.3
    messages = []
    if rng.random() < 0.3:
        messages.append(
            {
                "role": "system",
                "content": rng.choice(["You are a helpful assistant.", "Answer briefly.", "You are a friendly demo."]),
            }
        )
    if kind < 0.35:  # weather through the tool
        city = rng.choice(CITIES)
        temp, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
        q = rng.choice(
            ["What's the weather in {c}?", "What is the weather like in {c}?", "Is it cold in {c}?", "weather in {c}"]
        ).format(c=city)
        call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
        messages += [
            {"role": "user", "content": q},
            {
                "role": "assistant",
                "tool_calls": [call],
                **({"reasoning": f"I should call get_weather for {city}."} if thinking else {}),
            },
            {"role": "tool", "name": "get_weather", "content": {"temperature": temp, "condition": cond}},
            {
                "role": "assistant",
                "content": f"It is {temp} degrees and {cond} in {city}.",
                **({"reasoning": f"The tool reports {temp} degrees, {cond}."} if thinking else {}),
            },
        ]
        return {"messages": messages, "tools": [WEATHER_TOOL], "thinking": thinking}
    tools = [WEATHER_TOOL] if rng.random() < 0.3 else None  # tools declared but not needed
    for _ in range(rng.choice([1, 1, 2, 3])):
        q, a, thought = rng.choice(SIMPLE)(rng)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a, **({"reasoning": thought} if thinking else {})})
    return {"messages": messages, "tools": tools, "thinking": thinking}


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(n)]
