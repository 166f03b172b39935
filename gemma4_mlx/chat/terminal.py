"""`gemma4-mlx chat`: the interactive terminal front end of `Chat`."""

from __future__ import annotations

import importlib.util
import inspect
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from gemma4_mlx.chat.session import Chat, Reply
from gemma4_mlx.media.image import check_budget

HELP = """commands:
  /think on|off   thinking mode          /system TEXT   set the system prompt (resets)
  /thoughts       show the last thoughts  /reset         forget the conversation
  /save FILE      save the conversation   /help          this text
  /image PATH     attach an image to your next message (also /audio PATH, /video PATH)
  /budget N       soft tokens per image: 70, 140, 280, 560 or 1120
  /exit           quit (or Ctrl-D); Ctrl-C stops the current reply"""


def load_tools(path: str) -> list:
    """Public functions defined in a Python file (type hints + docstrings declare them)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no such tools file")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{path}: failed to import ({type(e).__name__}: {e})") from None
    fns = [f for name, f in inspect.getmembers(module, inspect.isfunction)
           if f.__module__ == module.__name__ and not name.startswith("_")]
    if not fns:
        raise ValueError(f"{path}: defines no public functions")
    return fns


class Terminal:
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
            out.print(f"error: {e}", style="red", markup=False)
            return None
        out.print()
        if reply is not None:
            self.last_thoughts = reply.thinking
            s = reply.stats
            spec = s.speculative
            extra = ("" if spec is None or not spec.rounds else
                     f" | {spec.tokens_per_round:.2f} tokens/round, acceptance "
                     + (" ".join(f"{a:.2f}" for a in spec.acceptance()) or "-"))
            out.print(f"[{s.prompt_tokens} new prompt tokens, {s.prompt_tps:.0f} tok/s | "
                      f"{s.generation_tokens} generated, {s.generation_tps:.1f} tok/s | "
                      f"peak memory {s.peak_memory_gb:.2f} GB{extra}]", style="dim", markup=False)
        return reply

    def turn(self, text: str) -> None:
        reply = self.reply(text)
        for _ in range(8):  # tool loop
            if reply is None or not reply.tool_calls:
                return
            for call in reply.tool_calls:
                args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
                self.console.print(f"tool call: {call.name}({args})", style="bold cyan", markup=False)
                if call.name not in self.chat.functions:
                    result = {"error": f"unknown tool {call.name!r}"}
                elif self.assume_yes or self.confirm():
                    result = self.chat.call_tool(call)
                    self.console.print(f"result: {result!r}", style="cyan", markup=False)
                else:
                    result = {"error": "the user declined this tool call"}
                self.chat.add_tool_result(call, result)
            reply = self.reply(None)

    def confirm(self) -> bool:
        try:
            answer = self.console.input(escape("run it? [y/N] "))
        except (EOFError, KeyboardInterrupt):
            return False
        return answer.strip().lower() in ("y", "yes")

    # -- the loop --------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        c = self.chat
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/think" and arg in ("on", "off"):
            c.thinking = arg == "on"
            self.console.print(f"thinking {arg}", style="dim")
        elif cmd == "/system":
            c.system = arg or None
            c.reset()
            self.console.print("system prompt set; conversation reset", style="dim")
        elif cmd == "/reset":
            c.reset()
            self.console.print("conversation reset", style="dim")
        elif cmd == "/save" and arg:
            c.save(arg)
            self.console.print(f"saved to {arg}", style="dim")
        elif cmd in ("/image", "/audio", "/video") and arg:
            path = Path(arg).expanduser()
            if not path.is_file():
                self.console.print(f"error: {arg}: no such file", style="red", markup=False)
            else:
                self.pending[{"/image": "images", "/audio": "audio", "/video": "videos"}[cmd]].append(str(path))
                n = sum(len(v) for v in self.pending.values())
                self.console.print(f"attached {path.name} ({n} for the next message)", style="dim",
                                   markup=False)
        elif cmd == "/budget" and arg:
            try:
                self.image_budget = check_budget(int(arg) if arg.isdigit() else arg, "/budget")
                self.console.print(f"image budget {self.image_budget}", style="dim")
            except ValueError as e:
                self.console.print(f"error: {e}", style="red", markup=False)
        elif cmd == "/thoughts":
            self.console.print(self.last_thoughts or "(no thoughts in the last reply)",
                               style="dim", markup=False)
        else:
            self.console.print(HELP, markup=False)
        return True

    def loop(self) -> None:
        while True:
            try:
                line = self.console.input("[bold green]you ›[/] ")
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
    """Non-interactive: one turn (with the tool loop when --yes), answer on stdout."""
    reply = chat.run(text, confirm=None if assume_yes else (lambda call: False), **(media or {}))
    if as_json:
        print(json.dumps({
            "content": reply.text, "reasoning": reply.thinking,
            "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls],
            "finish_reason": reply.finish_reason,
            "stats": {"prompt_tokens": reply.stats.prompt_tokens,
                      "generation_tokens": reply.stats.generation_tokens,
                      "prompt_tps": reply.stats.prompt_tps,
                      "generation_tps": reply.stats.generation_tps,
                      "peak_memory_gb": reply.stats.peak_memory_gb,
                      **_speculative_stats(reply.stats.speculative)},
        }, ensure_ascii=False))
    else:
        print(reply.text)
        print(reply.stats.line(), file=sys.stderr)
    return 0


def _speculative_stats(spec) -> dict:
    if spec is None:
        return {}
    return {"speculative": {"rounds": spec.rounds, "tokens_per_round": spec.tokens_per_round,
                            "acceptance_by_position": spec.acceptance(),
                            "draft_tokens_used": {str(k): n for k, n in sorted(spec.k_used.items())}}}
