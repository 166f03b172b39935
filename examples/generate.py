"""Stream a completion from a Gemma 4 checkpoint: python examples/generate.py MODEL "prompt"."""

import sys

import gemma4_mlx

model, tokenizer = gemma4_mlx.load(sys.argv[1])
for chunk in gemma4_mlx.stream_generate(model, tokenizer, sys.argv[2], max_tokens=200):
    print(chunk.text, end="", flush=True)
print()
print(chunk.stats.line(), file=sys.stderr)
