"""A heartbeat between the ranks of a distributed run (docs/distributed.md §7).

MLX's ring backend has no timeout: a peer whose machine froze or whose cable was
pulled closes no socket, and the other ranks wait inside a collective forever (and a
dead peer is not always turned into an error either).  So every rank other than 0
keeps one small TCP connection to rank 0, beside MLX's, and both ends send a byte
every second from a thread.  A connection that closes without a goodbye, or stays
silent for `GRACE` seconds, ends this rank with one line: no hang.  A normal exit says
goodbye first (`atexit`), so the others do not take it for a failure.

Only with a host file naming IP:port per rank (the ring backend, as `mlx.launch`
writes it); other backends run without a heartbeat.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

EVERY = 1.0  # seconds between beats
GRACE = float(os.environ.get("GEMMA4_MLX_HEARTBEAT_S", "15"))  # silence that ends a rank
PORT_OFFSET = 1000  # the heartbeat listens this far above rank 0's ring port
BEAT, BYE = b".", b"x"


def address(hostfile: str | None) -> tuple[str, int] | None:
    """Rank 0's heartbeat address from the ring host file, None without one."""
    if not hostfile:
        return None
    try:
        hosts = json.loads(Path(hostfile).read_text())
        ip, port = hosts[0][0].rsplit(":", 1)
        return ip, int(port) + PORT_OFFSET
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        return None


def listen(where: tuple[str, int]) -> socket.socket | None:
    """Rank 0's heartbeat socket, or None when the port is taken (then no heartbeat)."""
    try:
        return socket.create_server(("", where[1]))
    except OSError:
        return None


def start(rank: int, size: int, where: tuple[str, int], server: socket.socket | None = None) -> None:
    """Rank 0 (with `listen`'s socket) watches every other rank; the others connect
    to it and watch it."""
    if rank == 0:
        threading.Thread(target=_accept, args=(server, size - 1), daemon=True).start()
    else:
        _watch(_connect(where), rank, "rank 0")


def _accept(server: socket.socket, peers: int) -> None:
    for _ in range(peers):
        conn, _ = server.accept()
        _watch(conn, 0, "another rank")
    server.close()


def _connect(where: tuple[str, int]) -> socket.socket:
    deadline = time.monotonic() + 60
    while True:
        try:
            return socket.create_connection(where, timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                _die(None, f"cannot reach rank 0's heartbeat at {where[0]}:{where[1]}")
            time.sleep(0.2)


def _watch(conn: socket.socket, rank: int, peer: str) -> None:
    conn.settimeout(GRACE)
    state = {"bye": False}
    atexit.register(_goodbye, conn, state)
    threading.Thread(target=_send, args=(conn, state), daemon=True).start()
    threading.Thread(target=_receive, args=(conn, state, rank, peer), daemon=True).start()


def _send(conn: socket.socket, state: dict) -> None:
    while not state["bye"]:
        try:
            conn.sendall(BEAT)
        except OSError:
            return  # the receiving side says what happened
        time.sleep(EVERY)


def _receive(conn: socket.socket, state: dict, rank: int, peer: str) -> None:
    while True:
        try:
            data = conn.recv(64)
        except TimeoutError:
            if not state["bye"]:
                _die(rank, f"{peer} has been silent for {GRACE:.0f} s (a frozen machine or a dropped link)")
            return
        except ConnectionResetError:
            data = b""  # a killed peer's kernel may reset instead of closing: the same event
        except OSError as e:
            data = None if state["bye"] else _die(rank, f"the heartbeat link to {peer} broke ({e})")
        if not data:
            if not state["bye"]:
                _die(rank, f"{peer} exited or its link dropped")
            return
        if BYE in data:
            state["bye"] = True  # a normal end there: nothing more to watch
            return


def _goodbye(conn: socket.socket, state: dict) -> None:
    state["bye"] = True
    try:
        conn.sendall(BYE)
    except OSError:
        pass


def _die(rank: int | None, why: str) -> None:
    who = "" if rank is None else f"rank {rank}: "
    sys.stderr.write(f"\nerror: {who}{why}; stopping\n")  # MLX's own notes may have left a line open
    sys.stderr.flush()
    os._exit(1)
