"""`serve --distributed`: the engine's scheduler on every rank (docs/distributed.md §6).

Rank 0 serves HTTP and runs the engine as usual, with its `batching.Scheduler` wrapped
in a `LeaderScheduler`: every job it adds, drops or abandons is written down, and
before each `step()` the list goes to the other ranks as JSON over `mx.distributed`.
Each other rank runs `follow`: the same scheduler settings, the same jobs rebuilt from
their specs (prompt ids, prefix keys, sampling options with the seed rank 0 resolved,
the grammar's source for constrained decoding), the same operations in the same order,
then the same `step()` — so every rank computes its shard of the same batch.  Text,
stop strings, parsers and clients stay on rank 0; a stop string there becomes a drop
here at the next step, which is when a drop takes effect anyway.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields, replace

from gemma4_mlx import ranks
from gemma4_mlx.api import SamplingOptions
from gemma4_mlx.batching import Job, Scheduler
from gemma4_mlx.batching.thinking import ThinkingBudget
from gemma4_mlx.constrain import Constraint, Grammar, bind
from gemma4_mlx.server.errors import APIError

log = logging.getLogger("gemma4_mlx.server")

# SamplingOptions fields that travel as plain values (the constraint travels as its grammar).
_PLAIN = [f.name for f in fields(SamplingOptions) if f.name != "constraint"]


def job_spec(job: Job, job_id: int) -> dict:
    """What a follower needs to make the same `Job` (JSON data, never code)."""
    if job.media is not None:
        raise APIError(400, "images and audio are not served with --distributed yet (text only)", param="messages")
    options = {name: getattr(job.options, name) for name in _PLAIN}
    options["seed"] = job.sampler.seed  # rank 0's draw for an unseeded request
    c = job.options.constraint
    if c is not None and not isinstance(c, Constraint):
        raise APIError(400, "this output constraint cannot be sent to the other ranks (--distributed)")
    constraint = None
    if c is not None:
        g = c.grammar
        constraint = dict(kind=g.kind, source=g.source, what=g.what, vocab=c.vocab_size, stop=list(c.stop_ids))
        constraint["after"], constraint["opener"] = c.after, c.opener
    return {
        "id": job_id,
        "ids": list(job.ids),
        "keys": list(job.keys),
        "options": options,
        "constraint": constraint,
        "max_tokens": job.max_tokens,
        "stop_ids": sorted(job.stop_ids),
        "logprobs": job.logprobs,
        "thinking": None if job.thinking is None else asdict(job.thinking),
    }


def job_from_spec(spec: dict, tokenizer) -> Job:
    c = spec["constraint"]
    constraint = None
    if c is not None:
        grammar = Grammar(c["kind"], c["source"], c["what"])
        constraint = replace(bind(grammar, tokenizer, c["vocab"], c["stop"], c["after"]), opener=c["opener"])
    options = dict(spec["options"])
    if options.get("logit_bias"):  # JSON made its token ids strings
        options["logit_bias"] = {int(k): v for k, v in options["logit_bias"].items()}
    return Job(
        spec["ids"],
        spec["keys"],
        options=SamplingOptions(**options, constraint=constraint),
        max_tokens=spec["max_tokens"],
        stop_ids=frozenset(spec["stop_ids"]),
        logprobs=spec["logprobs"],
        thinking=None if spec["thinking"] is None else ThinkingBudget(**spec["thinking"]),
    )


class LeaderScheduler:
    """Rank 0's scheduler: the engine's calls, written down for the other ranks."""

    def __init__(self, scheduler: Scheduler, group):
        self.scheduler, self.group = scheduler, group
        self.ops: list = []
        self.ids: dict[Job, int] = {}
        self.next_id = 0

    def __getattr__(self, name):  # busy, peak_batch, rounds, ... read through
        return getattr(self.scheduler, name)

    def add(self, job: Job) -> None:
        spec = job_spec(job, self.next_id)  # APIError: this request fails, nothing is sent
        self.ids[job] = self.next_id
        self.next_id += 1
        self.ops.append(["add", spec])
        self.scheduler.add(job)

    def drop(self, job: Job) -> None:
        if job in self.ids:
            self.ops.append(["drop", self.ids.pop(job)])
        self.scheduler.drop(job)

    def abandon(self) -> list[Job]:
        self.ops.append(["abandon"])
        self.ids.clear()
        return self.scheduler.abandon()

    def step(self):
        ranks.broadcast_json(self.ops, self.group)
        self.ops = []
        progress = self.scheduler.step()
        for p in progress:
            if p.done:
                self.ids.pop(p.job, None)
        return progress

    def close(self) -> None:
        ranks.broadcast_json([["exit"]], self.group)


def follow(scheduler: Scheduler, tokenizer, group) -> None:
    """A rank other than 0: apply rank 0's operations, step, until it says "exit"."""
    jobs: dict[int, Job] = {}
    while True:
        for op in ranks.broadcast_json(None, group):
            if op[0] == "exit":
                return
            if op[0] == "add":
                jobs[op[1]["id"]] = job = job_from_spec(op[1], tokenizer)
                scheduler.add(job)
            elif op[0] == "drop" and op[1] in jobs:
                scheduler.drop(jobs.pop(op[1]))
            elif op[0] == "abandon":
                scheduler.abandon()
                jobs.clear()
        try:
            done = {id(p.job) for p in scheduler.step() if p.done}
        except Exception:  # rank 0 meets the same failure and abandons the batch too
            log.exception("generation failed")
            continue
        for key in [k for k, j in jobs.items() if id(j) in done]:
            del jobs[key]
