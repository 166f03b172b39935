"""A constrained row's cost per decode step, on the host and in the logits ops, for
an agent's request (docs/structured-output.md §6): Codex declares `apply_patch` with
a Lark grammar and a `shell` function, so every row it sends is constrained by the
tool-call grammar (thinking on: an optional thought first).

The processor is driven as the server drives it (`apply_processors`, one row, the
history as the batch keeps it) along three walks on the synthetic Gemma-shaped
262,144-piece vocabulary of bench_structured.py: a thought (free until its close),
a text answer, and an `apply_patch` call whose patch follows the nested grammar.
At each step the walk takes the longest allowed piece of the target text, so every
step is a real mask.  Each step is timed to the evaluated logits (the mask's MLX
ops included), with histories of 100 and 20,000 prompt tokens; best of --rounds.

    python bench/bench_agent_steps.py [--rounds 3] [--as-arrays]

--as-arrays hands the processor an mx.array per step, as the server did before
lists were passed through (run it against an older checkout with PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import gemma4_mlx  # OpenBLAS first

# isort: split
import llguidance as llg
import mlx.core as mx
import numpy as np
from bench_structured import V, gemma_shaped_tokenizer

from gemma4_mlx.constrain import Constraint
from gemma4_mlx.constrain.tools import INPUT_FORMAT, tool_call_grammar
from gemma4_mlx.prompt.template import SPECIAL_TOKENS
from gemma4_mlx.runtime.generate import apply_processors

ROOT = Path(__file__).parent.parent
SHELL = {
    "type": "function",
    "function": {
        "name": "shell",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "array", "items": {"type": "string"}}, "workdir": {"type": "string"}},
            "required": ["command"],
        },
    },
}
TEXT = "Sure. I will look at the repository first, then write the file you asked for. " * 3
PATCH = "*** Begin Patch\n*** Add File: hello.py\n+def main():\n+    print('hello world')\n+\n+main()\n*** End Patch\n"


def agent_constraint(engine) -> Constraint:
    """The server's constraint for Codex's tools: loose schemas, an optional thought first."""
    codex = json.loads((ROOT / "tests/captured/codex_apply_patch_tool.json").read_text())
    patch_tool = {
        "name": "apply_patch",
        INPUT_FORMAT: {"syntax": "lark", "definition": codex["format"]["definition"]},
        "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]},
    }
    grammar = tool_call_grammar([SHELL, {"type": "function", "function": patch_tool}], SPECIAL_TOKENS.get, loose=True)
    controls = tuple(i for i in range(V) if engine.is_special_token(i) and i not in (1, 106))
    c = Constraint(grammar, engine, V, (1, 106), controls=controls)
    return c.thought_optional(SPECIAL_TOKENS["<|channel>"], SPECIAL_TOKENS["<channel|>"])


class Walker:
    """Steps a processor along target segments (control ids or text), taking at each
    step the longest allowed vocabulary piece that starts the remaining text."""

    def __init__(self, engine):
        self.pieces: dict[bytes, list[int]] = {}
        for i in range(V):
            if not engine.is_special_token(i):
                self.pieces.setdefault(engine.decode_bytes([i]), []).append(i)

    def next_token(self, allowed: np.ndarray, segs: list) -> int:
        if isinstance(segs[0], int):
            assert allowed[segs[0]], f"control token {segs[0]} refused"
            return segs.pop(0)
        b = segs[0]
        for k in range(min(16, len(b)), 0, -1):
            i = next((i for i in self.pieces.get(b[:k], []) if allowed[i]), None)
            if i is not None:
                segs[0:1] = [b[k:]] if b[k:] else []
                return i
        raise AssertionError(f"no allowed piece starts {b[:20]!r}")

    def walk(self, proc, prompt: list[int], segs: list, as_arrays: bool) -> np.ndarray:
        segs = [s if isinstance(s, int) else s.encode() for s in segs]
        logits, out, times = mx.zeros((1, V)), [], []
        while True:
            history = prompt + out
            t0 = time.perf_counter()
            row = apply_processors(logits, [mx.array(history) if as_arrays else history], [proc])
            mx.eval(row)
            times.append(time.perf_counter() - t0)
            if not segs:
                return np.array(times) * 1e3
            out.append(self.next_token(np.array(row[0]) == 0, segs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--as-arrays", action="store_true")
    args = ap.parse_args()
    print(f"gemma4-mlx from {Path(gemma4_mlx.__file__).parent}; mlx {mx.__version__}, llguidance {llg.__version__}")
    print(f"{os.cpu_count()} CPU cores ({platform.machine()}), load average {os.getloadavg()[0]:.2f}")
    tj, _ = gemma_shaped_tokenizer(ROOT / "bench" / "_work")
    engine = llg.LLTokenizer(tj, n_vocab=V, eos_token=1)
    constraint, walker = agent_constraint(engine), Walker(engine)
    q, o, c = (SPECIAL_TOKENS[s] for s in ('<|"|>', "<|tool_call>", "<tool_call|>"))
    walks = {
        "thought, then text": [SPECIAL_TOKENS["<|channel>"], "thought\n" + TEXT, SPECIAL_TOKENS["<channel|>"], "Ok."],
        "text answer": [TEXT],
        "apply_patch call": [o, "call:apply_patch{input:", q, PATCH, q, "}", c],
    }
    histories = "mx.array per step" if args.as_arrays else "lists"
    print(f"\n== one constrained row, V = {V:,}, histories as {histories}: ms per step, best of {args.rounds} ==")
    for prompt_len in (100, 20_000):
        prompt = list(range(300, 300 + prompt_len))
        for name, segs in walks.items():
            runs = [walker.walk(constraint(), prompt, segs, args.as_arrays) for _ in range(args.rounds)]
            best = min(runs, key=np.mean)
            print(
                f"prompt {prompt_len:6,d} | {name:18s} | {len(best) - 1:4d} tokens"
                f" | mean {best.mean():6.2f} ms, median {np.median(best):6.2f} ms, max {best.max():6.2f} ms"
            )
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
