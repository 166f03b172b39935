"""`gemma4-mlx chat`: the interactive terminal front end of `Chat`, and the
one-shot mode (`--prompt`, stdin)."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.markup import escape

from gemma4_mlx.chat.commands import HELP, Commands, check_attachment
from gemma4_mlx.chat.line_editor import line_reader
from gemma4_mlx.chat.session import Chat, Reply, ToolRun
from gemma4_mlx.chat.tools import call_line, load_tools, outcome_line

__all__ = ["HELP", "Terminal", "check_media", "load_tools", "one_shot"]

MEDIA_KINDS = {"images": "image", "audio": "audio", "videos": "video"}


def check_media(chat: Chat, media: dict) -> None:
    """Refuse the start-up media (--image, --audio, --video) before the first turn:
    MediaError, one line naming the real cause."""
    for key, kind in MEDIA_KINDS.items():
        for source in media.get(key) or []:
            check_attachment(chat, kind, source)


class Terminal(Commands):
    def __init__(self, chat: Chat, console: Console, *, assume_yes: bool = False):
        self.chat, self.console, self.assume_yes = chat, console, assume_yes
        self.last_thoughts = ""
        self.pending = {"images": [], "audio": [], "videos": []}  # media for the next message
        self.image_budget = None

    def attach(self, media: dict) -> None:
        for kind in self.pending:
            self.pending[kind] += list(media.get(kind) or [])
        self.image_budget = media.get("image_budget", self.image_budget)

    # -- one reply, streamed ---------------------------------------------------
    def reply(self, text: str | None) -> Reply | None:
        out, reply, mode = self.console, None, None
        media = {}
        if text is not None and any(self.pending.values()):
            media = dict(self.pending, image_budget=self.image_budget)
            self.pending = {k: [] for k in self.pending}
        stream = self.chat.stream(text, **media)
        try:
            for ev in stream:
                if ev.type == "reasoning" and ev.text:
                    if mode != "reasoning":
                        out.print("thinking: ", style="dim italic", end="")
                    out.print(ev.text, style="dim", end="", markup=False, highlight=False)
                    mode = "reasoning"
                elif ev.type == "content" and ev.text:
                    if mode == "reasoning":
                        out.print()
                    out.print(ev.text, end="", markup=False, highlight=False)
                    mode = "content"
                elif ev.type == "degenerate":
                    out.print(f"\n[degenerate output stopped: {ev.text}]", style="yellow", markup=False)
                elif ev.type == "reply":
                    reply = ev.reply
        except KeyboardInterrupt:
            stream.close()  # the session keeps what was generated so far
            out.print("\n[stopped]", style="yellow", markup=False)
            return None
        except ValueError as e:  # bad media (MediaError): the conversation is unchanged
            self.error(str(e))
            return None
        out.print()
        if reply is not None:
            self.last_thoughts = reply.thinking
            if reply.stats is not None:  # the line one-shot mode prints
                out.print(reply.stats.line(), style="dim", markup=False, highlight=False)
        return reply

    def turn(self, text: str) -> None:
        reply = self.reply(text)
        for _ in range(8):  # tool loop
            if reply is None or not reply.tool_calls:
                return
            if not self.run_calls(reply.tool_calls):
                return
            reply = self.reply(None)
        for call in reply.tool_calls if reply is not None else []:
            self.console.print(call_line(call), style="bold cyan", markup=False, highlight=False)
            self.show_outcome(ToolRun(call, "round_limit"))

    def run_calls(self, calls) -> bool:
        """Run (or refuse) each call and show what happened; False when Ctrl-C stopped a
        tool: every call left gets an "interrupted" result and the model is not asked to
        go on (the conversation stays consistent for the next message)."""
        for i, call in enumerate(calls):
            self.console.print(call_line(call), style="bold cyan", markup=False, highlight=False)
            try:
                run = self.chat.resolve_call(call, None if self.assume_yes else self.confirm)
            except KeyboardInterrupt:
                for left in calls[i:]:
                    self.chat.add_tool_result(left, {"error": "interrupted by the user"})
                self.console.print("[tool interrupted]", style="yellow", markup=False, highlight=False)
                return False
            self.show_outcome(run)
        return True

    def show_outcome(self, run: ToolRun) -> None:
        if run.status in ("ran", "failed"):
            self.console.print(f"result: {run.result!r}", style="cyan", markup=False, highlight=False)
        else:
            line = outcome_line(run, have_tools=bool(self.chat.functions), interactive=True)
            self.console.print(line, style="yellow", markup=False, highlight=False)

    def confirm(self, call=None) -> bool:
        try:
            answer = self.console.input(escape("run it? [y/N] "))
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")

    # -- the loop --------------------------------------------------------------
    def loop(self) -> None:
        read = line_reader(self.note)
        while True:
            try:
                line = read()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.turn(line)


def one_shot(chat: Chat, text: str, *, as_json: bool, assume_yes: bool, media: dict | None = None) -> int:
    """Non-interactive: one turn (with the tool loop; tools run only with --yes),
    the answer on stdout; thoughts, tool calls and statistics on stderr (or all of
    it as JSON)."""
    reply = chat.run(text, confirm=None if assume_yes else (lambda call: False), **(media or {}))
    if as_json:
        print(
            json.dumps(
                {
                    "content": reply.text,
                    "reasoning": reply.thinking,
                    "tool_calls": [_run_json(r) for r in reply.tool_runs],
                    "finish_reason": reply.finish_reason,
                    "stats": {
                        "prompt_tokens": reply.stats.prompt_tokens,
                        "generation_tokens": reply.stats.generation_tokens,
                        "prompt_tps": reply.stats.prompt_tps,
                        "generation_tps": reply.stats.generation_tps,
                        "peak_memory_gb": reply.stats.peak_memory_gb,
                        **_speculative_stats(reply.stats.speculative),
                    },
                },
                ensure_ascii=False,
                default=str,
            )
        )
        return 0
    for run in reply.tool_runs:
        print(call_line(run.call), file=sys.stderr)
        line = outcome_line(run, have_tools=bool(chat.functions), interactive=False)
        print(line or f"result: {run.result!r}", file=sys.stderr)
    if reply.thinking:
        print(f"thinking: {reply.thinking}", file=sys.stderr)
    print(reply.text)
    print(reply.stats.line(), file=sys.stderr)
    if reply.finish_reason == "length":  # a cut reply must not pass for a whole one
        print(f"(stopped at the token limit, --max-tokens {chat.max_tokens})", file=sys.stderr)
    return 0


def _run_json(run: ToolRun) -> dict:
    """A tool call of the turn and what became of it."""
    out = {"name": run.call.name, "arguments": run.call.arguments, "status": run.status}
    if run.status in ("ran", "failed"):
        out["result"] = run.result
    else:
        out["reason"] = run.detail
    return out


def _speculative_stats(spec) -> dict:
    if spec is None:
        return {}
    return {
        "speculative": {
            "rounds": spec.rounds,
            "tokens_per_round": spec.tokens_per_round,
            "acceptance_by_position": spec.acceptance(),
            "draft_tokens_used": {str(k): n for k, n in sorted(spec.k_used.items())},
        }
    }
