"""The heartbeat's reading of its link (gemma4_mlx/heartbeat.py): a peer that ends
without a goodbye is named the same way whether its kernel closed the link or reset
it (a SIGKILLed process with unread bytes resets), and a goodbye ends the watch."""

import socket
import struct

import pytest

from gemma4_mlx import heartbeat


class Died(Exception):
    pass


@pytest.fixture
def died(monkeypatch):
    def die(rank, why):
        raise Died(f"rank {rank}: {why}")

    monkeypatch.setattr(heartbeat, "_die", die)


def linked_pair():
    server = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    server.close()
    conn.settimeout(5)
    return conn, peer


def watch(conn):
    return heartbeat._receive(conn, {"bye": False}, 0, "another rank")


def test_a_reset_link_reads_as_the_peer_exiting(died):
    conn, peer = linked_pair()
    conn.sendall(heartbeat.BEAT * 4)  # bytes the peer never reads: its close becomes a reset
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    with pytest.raises(Died, match=r"^rank 0: another rank exited or its link dropped$"):
        watch(conn)


def test_a_closed_link_reads_as_the_peer_exiting(died):
    conn, peer = linked_pair()
    peer.sendall(heartbeat.BEAT)
    peer.close()
    with pytest.raises(Died, match=r"^rank 0: another rank exited or its link dropped$"):
        watch(conn)


def test_a_goodbye_ends_the_watch_quietly(died):
    conn, peer = linked_pair()
    peer.sendall(heartbeat.BEAT + heartbeat.BYE)
    peer.close()
    state = {"bye": False}
    heartbeat._receive(conn, state, 0, "another rank")
    assert state["bye"]
