"""Ask about an image, then an audio clip, in one chat:

    python examples/media_chat.py MODEL IMAGE [AUDIO]

MODEL is a Gemma 4 checkpoint with towers (e.g. google/gemma-4-E2B-it; audio needs
E2B/E4B). The image's soft-token budget can be raised for small print (1120).
"""

import sys

import gemma4_mlx

if len(sys.argv) < 3:
    sys.exit(__doc__)
model, tokenizer = gemma4_mlx.load(sys.argv[1])
chat = gemma4_mlx.Chat(model, tokenizer, max_tokens=256)
try:
    reply = chat.send("Describe this image in two sentences.", images=[sys.argv[2]], image_budget=560)
    print(reply.text, "\n", reply.stats.line(), sep="")
    if len(sys.argv) > 3:
        reply = chat.send("Now transcribe this clip.", audio=[sys.argv[3]])  # the image stays cached
        print(reply.text, "\n", reply.stats.line(), sep="")
except gemma4_mlx.MediaError as e:
    sys.exit(f"error: {e}")
