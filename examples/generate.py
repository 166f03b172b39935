"""Stream a completion from a Gemma 4 checkpoint:

    python examples/generate.py MODEL "prompt"

MODEL is a folder, a Hugging Face repo id or a short name (e2b-it, demo, ...).
"""

import sys

import gemma4_mlx

if len(sys.argv) != 3:
    sys.exit('usage: python examples/generate.py MODEL "prompt"   (MODEL: a folder, repo id or short name, e.g. demo)')
model, tokenizer = gemma4_mlx.load(sys.argv[1])
for chunk in gemma4_mlx.stream_generate(model, tokenizer, sys.argv[2], max_tokens=200):
    print(chunk.text, end="", flush=True)
print()
print(chunk.stats.line(), file=sys.stderr)
