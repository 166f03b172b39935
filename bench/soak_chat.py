"""Chat soak on the embedded demo model (docs/hardening.md §5): N turns with tools and
thinking, without and with its MTP drafter.

Reports resident memory (RSS and MLX active memory) after loading, after a warm-up and
every few turns, to the end; at sampled turns checks the session's KV cache against a
fresh forward over the same tokens (the logits of a probe token, exact argmax and max
|difference|); and checks that a saved conversation, restored into a new session,
continues with the same reply as the original.  `Chat` has `save` but no `load`: the
restore sets the saved `messages` on a new session (its cache is rebuilt by prefill).

    make soak                       # or: python bench/soak_chat.py [--turns 40] [--check-every 5]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import gemma4_mlx  # noqa: F401  (OpenBLAS first)

# isort: split
import mlx.core as mx

from gemma4_mlx.api import load, load_drafter
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.demo import DEMO_DRAFTER, DEMO_MODEL
from gemma4_mlx.demo.corpus import CAPITALS, CITIES

MiB = 2**20


def get_weather(city: str) -> dict:
    """Get the current weather in a city.

    Args:
        city: City name
    """
    return {"temperature": 10 + len(city) % 15, "condition": "sunny"}


def rss() -> int:
    """Current resident set size (Linux /proc), else the peak (macOS ru_maxrss, bytes)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def sample(what: str, turn: int) -> tuple:
    """(label, turn, RSS, MLX active memory, MLX buffer cache), bytes."""
    return what, turn, rss(), mx.get_active_memory(), mx.get_cache_memory()


def user_turn(rng: random.Random) -> str:
    kind = rng.choice(["capital", "weather", "hello", "sum"])
    if kind == "capital":
        return f"What is the capital of {rng.choice(list(CAPITALS))}?"
    if kind == "weather":
        return f"What is the weather in {rng.choice(CITIES)}?"
    if kind == "sum":
        return f"What is {rng.randint(1, 9)} plus {rng.randint(1, 9)}?"
    return rng.choice(["Hello", "Hi there", "Good morning"])


def cache_check(chat: Chat, model) -> tuple[bool, float]:
    """(same argmax, max |logit difference|) of a probe token after the session's cache
    vs after a fresh forward over the session's cached tokens."""
    ids = [t for t in chat.cached if isinstance(t, int)]
    if len(ids) != len(chat.cached):
        raise ValueError("media in the cache: the fresh forward needs text only")
    probe = ids[-1]
    got = model(mx.array([[probe]]), cache=chat.cache)[0, -1].astype(mx.float32)
    chat.cache.trim(1)  # the probe is not part of the conversation
    fresh = model(mx.array([ids + [probe]]), cache=model.make_cache())[0, -1].astype(mx.float32)
    diff = mx.abs(got - fresh).max().item()
    return bool(mx.argmax(got).item() == mx.argmax(fresh).item()), diff


def restore(model, tok, saved: Path, drafter) -> Chat:
    data = json.loads(saved.read_text())
    chat = Chat(model, tok, system=data["system"], thinking=data["thinking"], tools=[get_weather], max_tokens=64)
    chat.drafter = drafter
    chat.messages = data["messages"]
    return chat


def soak(turns: int, check_every: int, with_drafter: bool, seed: int) -> dict:
    mem = [sample("start", 0)]
    model, tok = load(DEMO_MODEL)
    drafter = load_drafter(DEMO_DRAFTER, target=model) if with_drafter else None
    mem.append(sample("loaded", 0))
    chat = Chat(model, tok, thinking=True, tools=[get_weather], max_tokens=64, drafter=drafter)
    rng = random.Random(seed)
    checks, tool_calls, t0 = [], 0, time.perf_counter()
    for turn in range(1, turns + 1):
        reply = chat.run(user_turn(rng))
        tool_calls += len(reply.tool_runs)
        if turn == 3:
            mem.append(sample("warm", turn))
        elif turn % 10 == 0:
            mem.append(sample("turn", turn))
        if turn % check_every == 0:
            same, diff = cache_check(chat, model)
            checks.append((turn, len(chat.cached), same, diff))
    elapsed = time.perf_counter() - t0
    mem.append(sample("end", turns))
    # save / restore: the next reply must be the same from both sessions
    with tempfile.TemporaryDirectory() as d:
        saved = Path(d) / "chat.json"
        chat.save(saved)
        again = restore(model, tok, saved, drafter)
    probe = user_turn(rng)
    a, b = chat.run(probe), again.run(probe)
    return dict(
        drafter=with_drafter,
        turns=turns,
        seconds=elapsed,
        tool_calls=tool_calls,
        cached_tokens=len(chat.cached),
        memory=mem,
        checks=checks,
        restore_same=(a.text, a.thinking, [c.arguments for c in a.tool_calls])
        == (b.text, b.thinking, [c.arguments for c in b.tool_calls]),
    )


def report(r: dict) -> str:
    lines = [
        f"-- {'with' if r['drafter'] else 'without'} drafter: {r['turns']} turns in {r['seconds']:.1f} s, "
        f"{r['tool_calls']} tool calls, {r['cached_tokens']} tokens cached at the end",
        "   memory (RSS MiB / MLX active MiB / MLX buffer cache MiB):",
    ]
    for what, turn, rs, active, cached in r["memory"]:
        lines.append(f"     {what:7s} turn {turn:3d}: {rs / MiB:8.1f} / {active / MiB:7.2f} / {cached / MiB:7.2f}")
    for turn, n, same, diff in r["checks"]:
        lines.append(
            f"   cache vs fresh forward at turn {turn:3d} ({n} tokens): argmax same {same}, max |diff| {diff:.2e}"
        )
    lines.append(f"   save -> restore -> next reply identical: {r['restore_same']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=40)
    ap.add_argument("--check-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="10 turns, a check every 5")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    if args.quick:
        args.turns, args.check_every = 10, 5
    ok, text = True, []
    for with_drafter in (False, True):
        r = soak(args.turns, args.check_every, with_drafter, args.seed)
        text.append(report(r))
        print(text[-1], flush=True)
        ok &= r["restore_same"] and all(same for _, _, same, _ in r["checks"])
    if args.out:
        args.out.write_text("\n".join(text) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
