"""A chat session with a Python tool: python examples/chat_tools.py [MODEL].

Without MODEL it uses the embedded demo model, which knows a get_weather tool.
"""

import sys

import gemma4_mlx
from gemma4_mlx.demo import DEMO_MODEL


def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: City name
    """
    return {"temperature": 19, "condition": "sunny"}


model, tokenizer = gemma4_mlx.load(sys.argv[1] if len(sys.argv) > 1 else DEMO_MODEL)
chat = gemma4_mlx.Chat(model, tokenizer, tools=[get_weather])
for question in ["What is the capital of Italy?", "What's the weather in Rome?"]:
    reply = chat.run(question, confirm=lambda call: print(f"[calling {call.name}{call.arguments}]") or True)
    print(f"> {question}\n{reply.text}\n")
