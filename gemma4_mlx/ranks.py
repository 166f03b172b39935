"""Which process this is in a distributed run, and rank 0's input passed to the others
(docs/distributed.md §6).

Started by `mlx.launch`, every rank runs the same command; rank 0 alone reads the
terminal or the network, and what it read reaches the other ranks through the same
engine the model uses (`mx.distributed`), as JSON data: never code, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx

from gemma4_mlx import _blas, heartbeat

BACKENDS = ("any", "ring", "jaccl", "mpi")
# How MLX's backends word a broken link (a peer exited, a cable was pulled).
_LOST = ("connection to a peer was lost", "send/recv errors", "[jaccl] ", "[mpi] ")


class RankError(RuntimeError):
    """A distributed run that cannot start; the message says why in one line."""


def start(backend: str = "any"):
    """The group of this launch (`mx.distributed.init`); RankError when this process
    was not started by a launcher (a group of one)."""
    if backend not in BACKENDS:
        raise RankError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    group = mx.distributed.init(strict=False, backend=backend)
    if group.size() == 1:
        raise RankError(
            "--distributed: this is the only process; start every rank with "
            "`mlx.launch --hostfile hosts.json -- gemma4-mlx ... --distributed` (or `-n 2` on one machine)"
        )
    _blas.short_spin()  # ranks may share this machine's cores
    agree(mx.__version__, group, "MLX version")  # replicated maths must round alike everywhere
    seed_alike(group)
    on_termination(group)
    start_heartbeat(group)
    return group


def start_heartbeat(group) -> bool:
    """The heartbeat beside MLX's ring (`heartbeat`): no hang on a frozen peer or a
    dropped link.  Needs the ring's host file; all ranks learn from rank 0 whether its
    heartbeat port could be opened."""
    where = heartbeat.address(os.environ.get("MLX_HOSTFILE"))
    server = heartbeat.listen(where) if where is not None and group.rank() == 0 else None
    if not from_rank0(int(server is not None), group):
        return False
    heartbeat.start(group.rank(), group.size(), where, server)
    return True


def odd_rank(value: str, group) -> int | None:
    """The first rank whose `value` differs from rank 0's (compared by digest), or None."""
    mine = mx.array(list(hashlib.sha256(value.encode()).digest()), mx.int32)[None]
    every = mx.distributed.all_gather(mine, group=group).tolist()
    return next((r for r, v in enumerate(every) if v != every[0]), None)


def agree(value: str, group, what: str) -> None:
    """Every rank must hold the same `value`: RankError naming the first odd rank."""
    odd = odd_rank(value, group)
    if odd is not None:
        raise RankError(f"rank {odd} has a different {what} than rank 0; start every rank alike")


def from_rank0(value: int, group) -> int:
    """Rank 0's integer on every rank (the others' `value` is ignored): one `all_sum`
    to which only rank 0 contributes."""
    mine = value if group.rank() == 0 else 0
    return int(mx.distributed.all_sum(mx.array([mine], mx.int32), group=group).item())


def on_termination(group) -> None:
    """One line, not a hang, when the launcher stops this rank: `mlx.launch` sends
    SIGTERM to every other rank when one exits.  Ranks other than 0 ignore Ctrl-C:
    rank 0 decides when a reply stops (`chat.mirror`); the launcher's own exit on
    Ctrl-C reaches them as SIGTERM."""
    rank = group.rank()

    def stopped(sig, frame):
        sys.stderr.write(f"\nerror: rank {rank}: stopped: another rank exited or the launcher was stopped\n")
        sys.stderr.flush()
        os._exit(1)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stopped)
        if rank != 0:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def seed_alike(group) -> None:
    """Seed Python's and MLX's generators with rank 0's seed: unseeded sampling and
    random request seeds then draw the same numbers on every rank (the logits are the
    same on every rank, so the tokens are too and the caches stay in step)."""
    seed = int(broadcast_text(str(random.getrandbits(32)) if is_leader(group) else None, group))
    random.seed(seed)
    mx.random.seed(seed)


def is_leader(group) -> bool:
    return group is None or group.rank() == 0


def broadcast_text(text: str | None, group) -> str:
    """Rank 0's `text` on every rank (others pass None).  Two sums: the length, then
    the UTF-8 bytes, which only rank 0 contributes (adding zeros is exact)."""
    if group is None:
        return text or ""
    leader = is_leader(group)
    data = (text or "").encode("utf-8") if leader else b""
    n = from_rank0(len(data), group)
    buf = mx.array(list(data), mx.int32) if leader else mx.zeros((n,), mx.int32)
    out = mx.distributed.all_sum(buf, group=group) if n else buf
    return bytes(bytearray(int(b) for b in out.tolist())).decode("utf-8")


def broadcast_json(obj, group):
    """Rank 0's JSON-able `obj` on every rank."""
    return json.loads(broadcast_text(json.dumps(obj) if is_leader(group) else None, group))


def lost_peer(error: BaseException) -> bool:
    """True for the error MLX raises when another rank died or a link dropped."""
    return isinstance(error, RuntimeError) and any(s in str(error) for s in _LOST)


@contextmanager
def deferred_interrupt():
    """Ctrl-C noted, not raised, until the caller checks (`with ... as interrupted:
    interrupted()`): a rank must not leave a forward pass half-way while the others
    wait in its collectives.  Only the main thread can own the handler; elsewhere
    nothing changes."""
    hits: list[int] = []
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, lambda sig, frame: hits.append(sig))
    try:
        yield lambda: bool(hits)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def rank_of(group) -> int:
    return 0 if group is None else group.rank()
