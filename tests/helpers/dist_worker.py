"""One rank of the sharded-parity check, started by `mlx.launch` (tests/test_distributed.py).

Every rank loads each listed checkpoint twice — sharded over the launch's group and
whole (group None, no collectives) — runs the same scenarios on both and rank 0 writes
what it measured (max logit differences, token lists) to the JSON file given as
argv[2].  The test process asserts on that file.
"""

from __future__ import annotations

import gemma4_mlx  # noqa: F401  (OpenBLAS before mlx.core)

# isort: split

import json
import random
import sys
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma4_mlx import ops, ranks
from gemma4_mlx.chat.mirror import FollowerChat, LeaderChat
from gemma4_mlx.chat.session import Chat
from gemma4_mlx.checkpoint.load import load, load_drafter, load_model
from gemma4_mlx.demo import DEMO_MODEL
from gemma4_mlx.runtime.generate import batch_generate, decode_step, prefill
from gemma4_mlx.speculative.loop import speculative_batch_generate
from gemma4_mlx.speculative.policy import DraftPolicy

PROMPT_LEN, CHUNK, STEPS = 20, 6, 12


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 256, n).tolist()


def diff(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))


def teacher_forced(model, prompt: list[int], tokens: list[int] | None):
    """Logits of the whole prompt at once, of a chunked prefill, and of decode steps
    past the window fed `tokens` (or the model's own greedy tokens when None)."""
    whole = model(mx.array([prompt]))
    cache = model.make_cache()
    last = prefill(model, mx.array([prompt]), cache, chunk_size=CHUNK)
    steps, fed = [last], []
    for i in range(STEPS):
        tok = int(mx.argmax(steps[-1][0])) if tokens is None else tokens[i]
        fed.append(tok)
        steps.append(decode_step(model, mx.array([tok]), cache))
    return whole, mx.stack(steps), fed


def param_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def auto_policy_run(part, drafter, rows, group) -> list:
    """draft_tokens="auto" with rank 1's policy choosing differently from rank 0's (as
    its own timings could): rank 0's draft length must be the one both ranks use."""
    own = DraftPolicy.choose
    if group.rank() == 1:
        DraftPolicy.choose = lambda self, B, left=None: 1
    try:
        return speculative_batch_generate(part, drafter, rows, max_tokens=10, draft_tokens="auto")
    finally:
        DraftPolicy.choose = own


def scenario(spec: dict, group) -> dict:
    """spec["stacked"]: the loader stacks q/k/v and gate/up (`models/fuse.py`; the
    default anyway) after cutting this rank's shard, and the GPU branches run (sorted
    experts, fused SDPA)."""
    before = ops.STACK_PROJECTIONS, ops.FORCE_GPU_BRANCHES
    if spec.get("stacked"):
        ops.STACK_PROJECTIONS = ops.FORCE_GPU_BRANCHES = True
    try:
        return _scenario(spec, group)
    finally:
        ops.STACK_PROJECTIONS, ops.FORCE_GPU_BRANCHES = before


def _scenario(spec: dict, group) -> dict:
    dtype = spec.get("dtype", "float32")
    full, _ = load_model(spec["model"], dtype)
    part, _ = load_model(spec["model"], dtype, group=group)
    prompt = ids(PROMPT_LEN, spec.get("seed", 0))
    w_s, steps_s, fed = teacher_forced(part, prompt, None)
    w_f, steps_f, fed_f = teacher_forced(full, prompt, fed)
    _, _, greedy_f = teacher_forced(full, prompt, None)
    rows = [prompt[:7], prompt[:13], prompt]
    out = {
        "whole": diff(w_s, w_f),
        "steps": diff(steps_s, steps_f),
        "greedy_sharded": fed,
        "greedy_whole": greedy_f,
        "batch_sharded": batch_generate(part, rows, max_tokens=8),
        "batch_whole": batch_generate(full, rows, max_tokens=8),
        "bytes_sharded": param_bytes(part),
        "bytes_whole": param_bytes(full),
        "vocab": int(w_s.shape[-1]),
        "stacked": "qkv_proj" in part.layers[0].self_attn and "gate_up_proj" in part.layers[0].mlp,
    }
    if spec.get("drafter"):
        drafter = load_drafter(spec["drafter"], dtype, target=part)
        out["spec_sharded"] = speculative_batch_generate(part, drafter, rows, max_tokens=10, draft_tokens=3)
        out["auto_sharded"] = auto_policy_run(part, drafter, rows, group)
        out["plain_sharded"] = batch_generate(part, rows, max_tokens=10)
        out["drafter_bytes_sharded"] = param_bytes(drafter)
        out["drafter_bytes_whole"] = param_bytes(load_drafter(spec["drafter"], dtype, target=full))
    return out


def chat_turns(chat) -> list[str]:
    """Turns, a tool result, turns stopped after some events (closed, left for the next
    turn to end, `stop()`), a reset: the texts, and the history before the reset."""
    out = [chat.send("What is the capital of France?").text]
    chat.add_tool_result(SimpleNamespace(id="call_1", name="lookup"), {"capital": "Paris"})
    out.append(chat.send("And of Italy?").text)
    events = chat.stream("What is 2 plus 3?")
    next(events), next(events)
    events.close()
    out.append(chat.send("What is 4 plus 4?").text)
    kept = chat.stream("What is 2 plus 2?")  # left unfinished: the next turn ends it
    next(kept)
    out.append(chat.send("Hello").text)
    stopped = chat.stream("What is 5 plus 1?")
    next(stopped), next(stopped)
    chat.stop()
    out.append(chat.send("And 1 plus 1?").text)
    out.append(str([m["content"] for m in chat.messages]))
    chat.reset()
    out.append(chat.send("What is the capital of Spain?").text)
    return out


def chat_scenario(group) -> dict | None:
    """`chat --distributed`'s sessions: rank 0 leads, the others follow; rank 0 also
    runs the same turns on the whole model for the expected texts."""
    model, tokenizer = load(str(DEMO_MODEL), group=group)
    if group.rank() != 0:
        FollowerChat(model, tokenizer, group=group).follow()
        return None
    whole, _ = load(str(DEMO_MODEL))
    leader = LeaderChat(model, tokenizer, group=group)
    sharded = chat_turns(leader)
    leader.finish()
    return {"sharded": sharded, "whole": chat_turns(Chat(whole, tokenizer))}


def main() -> None:
    group = mx.distributed.init()
    specs = json.loads(open(sys.argv[1]).read())
    chat = specs.pop("_chat", False)
    results = {name: scenario(spec, group) for name, spec in specs.items()}
    if chat:
        results["_chat"] = chat_scenario(group)
    results["_size"] = group.size()
    ranks.seed_alike(group)
    mine = [random.getrandbits(32) for _ in range(3)] + [int(mx.random.randint(0, 1 << 30, (1,)).item())]
    results["_draws"] = mx.distributed.all_gather(mx.array(mine, mx.int64)[None], group=group).tolist()
    if group.rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
