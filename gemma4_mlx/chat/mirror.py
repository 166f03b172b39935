"""A chat split over several ranks (`chat --distributed`, docs/distributed.md §6).

Rank 0 runs the terminal (or the one-shot turn) with a `LeaderChat`; every other rank
runs a `FollowerChat` that does what rank 0's session does, so that each rank's model
computes its shard of the same forward passes.  Rank 0 sends, as JSON over
`mx.distributed` (`ranks.broadcast_json`):
- "stream": the turn's text and media paths, with the session settings a slash command
  may have changed (system prompt, thinking, thinking budget);
- "next" before every event it pulls from the turn's stream, "stop" when it closes the
  stream early (Ctrl-C): the followers pull and stop at the same token;
- "append": a tool result (tools run on rank 0 only; the others get the message);
- "reset", and "exit" at the end.
Everything else a turn does (rendering, cache reuse, sampling, parsing) is
deterministic given the same logits, which every rank has (docs/distributed.md §2).
"""

from __future__ import annotations

import threading

from gemma4_mlx import ranks
from gemma4_mlx.chat.session import Chat

# Settings a slash command can change between turns (chat/commands.py).
SETTINGS = ("system", "thinking", "thinking_budget")
MEDIA_ARGS = ("images", "audio", "videos")


def _paths(value, name: str) -> list[str] | None:
    """Media of a distributed turn travel as paths: every rank reads the same file."""
    if value is None:
        return None
    items = list(value)
    if not all(isinstance(v, str) for v in items):
        raise ValueError(f"{name}: a distributed chat takes media as file paths (every rank reads the file)")
    return items


class LeaderChat(Chat):
    """Rank 0's session: a `Chat` that tells the other ranks what it does."""

    def __init__(self, *args, group, **kwargs):
        self._group, self._ready = group, False
        self._stop_paced = threading.Event()  # stop() from another thread: ends at an event, on every rank
        super().__init__(*args, **kwargs)
        self._ready = True

    def _tell(self, message: dict) -> None:
        ranks.broadcast_json(message, self._group)

    def reset(self) -> None:
        if getattr(self, "_ready", False):
            self._tell({"op": "reset"})
        super().reset()

    def add_tool_result(self, call, result) -> None:
        super().add_tool_result(call, result)
        self._tell({"op": "append", "message": self.messages[-1]})

    def stream(self, text=None, images=None, audio=None, videos=None, image_budget=None, response_format=None):
        media = {k: _paths(v, k) for k, v in zip(MEDIA_ARGS, (images, audio, videos))}
        if response_format is not None and not isinstance(response_format, dict):
            raise ValueError("response_format: a distributed chat takes it as a dict (sent to every rank)")
        self.stop()  # an unfinished turn ends on every rank before the next is announced
        self._stop_paced.clear()
        self._tell(
            {
                "op": "stream",
                "args": dict(text=text, image_budget=image_budget, response_format=response_format, **media),
                "settings": {k: getattr(self, k) for k in SETTINGS},
            }
        )
        turn = super().stream(text, response_format=response_format, image_budget=image_budget, **media)
        self._streaming = self._paced(turn)  # what stop() closes: the followers are told
        return self._streaming

    def stop(self) -> None:
        """`Chat.stop` on every rank.  From another thread than the reader's it asks
        `_paced` to end the turn at the next event, where the followers stop too (the
        turn's own token-level stop would leave them a token apart)."""
        if self._streaming is not None and not self._closable_here(self._streaming):
            self._stop_paced.set()
            return
        super().stop()

    def _paced(self, events):
        """The turn's events, each announced to the followers before it is pulled.
        Ctrl-C waits for the event boundary (`ranks.deferred_interrupt`): stopping in
        the middle of a forward pass would leave the other ranks inside a collective."""
        with ranks.deferred_interrupt() as interrupted:
            try:
                while not interrupted():
                    if self._stop_paced.is_set():
                        self._stop(events)
                        return
                    self._tell({"op": "next"})
                    try:
                        event = next(events)
                    except StopIteration:
                        return
                    yield event
            except GeneratorExit:  # the caller stopped reading
                self._stop(events)
                raise
            # an exception from the turn itself is not caught: the followers meet it at the same event
            self._stop(events)
            raise KeyboardInterrupt

    def _stop(self, events) -> None:
        self._tell({"op": "stop"})
        events.close()

    def finish(self) -> None:
        """The session is over: the followers return from `follow`."""
        self._tell({"op": "exit"})


class FollowerChat(Chat):
    """A session on rank 1..N-1, driven by rank 0's `LeaderChat` (`follow`)."""

    def __init__(self, *args, group, **kwargs):
        self._group = group
        super().__init__(*args, **kwargs)

    def _hear(self) -> dict:
        return ranks.broadcast_json(None, self._group)

    def follow(self) -> None:
        while True:
            message = self._hear()
            op = message["op"]
            if op == "exit":
                return
            if op == "reset":
                super().reset()
            elif op == "append":
                self.messages.append(message["message"])
            elif op == "stream":
                for k, v in message["settings"].items():
                    setattr(self, k, v)
                self._follow_turn(message["args"])

    def _follow_turn(self, args: dict) -> None:
        events = super().stream(**args)
        while self._hear()["op"] == "next":
            try:
                next(events)
            except StopIteration:
                return
            except ValueError:  # bad media: rank 0 met the same error and went on
                return
        events.close()
