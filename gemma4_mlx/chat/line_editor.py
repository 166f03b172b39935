"""The interactive prompt: prompt_toolkit's line editor.  Arrow keys edit the line,
Up/Down and Ctrl-R recall earlier lines (kept in a history file across sessions),
a multi-line paste stays one message (bracketed paste; Alt-Enter types a new
line), Tab completes slash commands and the paths after /image, /audio, /video
and /save.  Where stdin or stdout is no terminal, lines are read plainly."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from gemma4_mlx.chat.commands import PATH_COMMANDS, USAGE

HISTORY_ENV = "GEMMA4_MLX_HISTORY"  # a history file to use instead of the default
PROMPT = FormattedText([("ansigreen bold", "you ›"), ("", " ")])


def history_path() -> Path:
    """$GEMMA4_MLX_HISTORY, else $XDG_DATA_HOME/gemma4-mlx/history (default
    ~/.local/share/gemma4-mlx/history)."""
    if os.environ.get(HISTORY_ENV):
        return Path(os.environ[HISTORY_ENV]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "gemma4-mlx" / "history"


def open_history(path: Path) -> tuple[History, str | None]:
    """(the history, None) or (an in-memory one, why the file cannot be used)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):  # FileHistory appends on every line: fail now, not mid-prompt
            pass
    except OSError as e:
        return InMemoryHistory(), f"history not saved ({path}: {e.strerror or e})"
    return FileHistory(str(path)), None


class SlashCompleter(Completer):
    """Command names after a leading '/', paths after the commands that take one."""

    def __init__(self):
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        name, sep, arg = text.partition(" ")
        if not sep:
            for command in USAGE:
                if command.startswith(name):
                    yield Completion(command, start_position=-len(name), display_meta=USAGE[command])
        elif name in PATH_COMMANDS:
            arg = arg.lstrip()
            yield from self.paths.get_completions(Document(arg, len(arg)), complete_event)
        elif name == "/think":
            for word in ("on", "off"):
                if word.startswith(arg.lstrip()) and "\n" not in arg:
                    yield Completion(word, start_position=-len(arg.lstrip()))


def _bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("escape", "enter")
    def _newline(event):  # Alt-Enter: a new line in the same message
        event.current_buffer.insert_text("\n")

    return kb


def line_reader(warn: Callable[[str], None]) -> Callable[[], str]:
    """A function reading one line (EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C);
    warn(message) is told when the history file cannot be used."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        return lambda: input("you › ")
    history, problem = open_history(history_path())
    if problem:
        warn(problem)
    session = PromptSession(
        history=history, completer=SlashCompleter(), complete_while_typing=False, key_bindings=_bindings()
    )
    return lambda: session.prompt(PROMPT)
