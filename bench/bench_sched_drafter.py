"""The batching scheduler with and without the MTP drafter, in process (no HTTP).

bench_serve.py measures the whole server; on the demo model its rounds take a few
milliseconds, so HTTP and the event loop move its drafter cells by more than the
drafter does.  This runs the same closed loop — C clients, each sending `--requests`
prompts of ~128 tokens back to back, 64 greedy tokens each — straight on
`batching.Scheduler`, and reports tokens/s and, per (rows, K) cell, how many rounds
ran and their median time: what the draft policy chose and what it cost.  Plain
and drafter schedulers alternate for `--rounds` rounds.

    python bench/bench_sched_drafter.py [--model DIR --drafter DIR] [--concurrency 1 4 8]
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import gemma4_mlx

# isort: split
from gemma4_mlx.batching import Job, Scheduler

DEMO = Path(gemma4_mlx.__file__).parent / "demo" / "gemma-4-demo"


class Timed(Scheduler):
    """A scheduler that records (rows, K, seconds) of every decode round."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log, self.k = [], 0

    def _draft_length(self, bonus):
        self.k = super()._draft_length(bonus)
        return self.k

    def _round(self):
        B, t0 = len(self.rows), time.perf_counter()
        out = super()._round()
        self.log.append((B, self.k, time.perf_counter() - t0))
        return out


def closed_loop(sched: Scheduler, prompts: list, C: int, per_client: int) -> float:
    """Tokens/s of C clients each sending per_client jobs one after another."""
    queue, live, tokens = list(prompts), {}, 0

    def submit(client):
        ids = queue.pop()
        live[client] = job = Job(ids, list(ids), max_tokens=64)
        sched.add(job)

    left = {c: per_client - 1 for c in range(C)}
    t0 = time.perf_counter()
    for c in range(C):
        submit(c)
    while live:
        tokens += sum(len(p.tokens) for p in sched.step())
        for c, job in list(live.items()):
            if job.finished:
                del live[c]
                if left[c]:
                    left[c] -= 1
                    submit(c)
    return tokens / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(DEMO))
    ap.add_argument("--drafter", default=str(DEMO) + "-assistant")
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="per client")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model, tok = gemma4_mlx.load(args.model, dtype="float32")
    drafter = gemma4_mlx.load_drafter(args.drafter, target=model)
    text = "<bos>" + "Question {i}: what is the capital of country number {i}? " * 8
    need = sum(args.concurrency) * args.requests + 1
    prompts = [tok.encode(text.format(i=i), add_special_tokens=False) for i in range(need)]
    print(f"scheduler closed loop, {args.model}: C clients x {args.requests} jobs, 64 greedy tokens each, float32")
    for r in range(args.rounds):
        for label, d in (("plain", None), ("drafter", drafter)):
            sched = Timed(model, drafter=d, max_batch=max(args.concurrency))
            closed_loop(sched, prompts[-1:], 1, 1)  # warm-up
            for C in args.concurrency:
                sched.log.clear()
                tps = closed_loop(sched, prompts[: C * args.requests], C, args.requests)
                cells = collections.defaultdict(list)
                for B, K, dt in sched.log:
                    cells[(B, K)].append(dt)
                shown = " ".join(
                    f"B{B}/K{K}: {len(v)} x {1e3 * statistics.median(v):.1f} ms" for (B, K), v in sorted(cells.items())
                )
                print(f"round {r} {label:<8} C={C:<2} {tps:7.1f} tok/s | {shown}", flush=True)


if __name__ == "__main__":
    main()
