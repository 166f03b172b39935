"""The terminal's slash commands.  Every command's error is one line and the
session goes on: a bad `/save` path must not lose the conversation."""

from __future__ import annotations

from pathlib import Path

from gemma4_mlx.media.image import check_budget
from gemma4_mlx.media.prepare import as_media, processor_for

HELP = """commands:
  /think on|off   thinking mode          /system TEXT   set the system prompt (resets)
  /thoughts       show the last thoughts  /reset         forget the conversation
  /save FILE      save the conversation   /help          this text
  /image PATH     attach an image to your next message (also /audio PATH, /video PATH)
  /budget N       soft tokens per image: 70, 140, 280, 560 or 1120
  /exit           quit (or Ctrl-D); Ctrl-C stops the current reply
keys: Up/Down history, Ctrl-R search, Tab completes commands and paths, Alt-Enter new line"""

USAGE = {
    "/think": "/think on|off",
    "/system": "/system TEXT",
    "/thoughts": "/thoughts",
    "/reset": "/reset",
    "/save": "/save FILE",
    "/help": "/help",
    "/image": "/image PATH",
    "/audio": "/audio PATH",
    "/video": "/video PATH",
    "/budget": "/budget N",
    "/exit": "/exit",
    "/quit": "/quit",
}
MEDIA = {"/image": ("image", "images"), "/audio": ("audio", "audio"), "/video": ("video", "videos")}
PATH_COMMANDS = ("/image", "/audio", "/video", "/save")  # their argument completes as a path
ONE_LINE = (*PATH_COMMANDS, "/budget")  # a path or a value: a line break in it is a paste gone wrong


class UsageError(Exception):
    """A command given the wrong arguments."""


class Commands:
    """Slash commands of `Terminal` (which provides chat, console, pending,
    image_budget and last_thoughts)."""

    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        name, arg = (line.split(maxsplit=1) + [""])[:2]
        arg = arg.strip()
        if name in ONE_LINE and ("\n" in arg or "\r" in arg):  # a paste that began with `/save a`
            self.error(f"{name}: the argument must fit on one line")
            return True
        if name in ("/exit", "/quit"):
            return False
        handler = getattr(self, "cmd_" + name[1:], None) if name in USAGE else None
        if handler is None:
            self.error(f"unknown command {name}")
            self.console.print(HELP, markup=False)
            return True
        try:
            handler(arg)
        except UsageError:
            self.error(f"usage: {USAGE[name]}")
        except ValueError as e:  # bad media, budget: the message names the file or argument
            self.error(one_line(e))
        except Exception as e:  # the boundary: whatever failed, one line, and the chat goes on
            self.error(f"{name}: {one_line(e)}")
        return True

    def error(self, message: str) -> None:
        self.console.print(f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True)

    def note(self, message: str) -> None:
        self.console.print(message, style="dim", markup=False, highlight=False, soft_wrap=True)

    # -- the commands (cmd_NAME(arg)) ------------------------------------------
    def cmd_help(self, arg: str) -> None:
        self.console.print(HELP, markup=False)

    def cmd_think(self, arg: str) -> None:
        if arg not in ("on", "off"):
            raise UsageError
        self.chat.thinking = arg == "on"
        self.note(f"thinking {arg}")

    def cmd_system(self, arg: str) -> None:
        self.chat.system = arg or None
        self.chat.reset()
        self.note("system prompt set; conversation reset" if arg else "system prompt cleared; conversation reset")

    def cmd_reset(self, arg: str) -> None:
        self.chat.reset()
        self.note("conversation reset")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise UsageError
        path = Path(arg).expanduser()
        self.chat.save(path)
        self.note(f"saved to {path}")

    def cmd_thoughts(self, arg: str) -> None:
        self.note(self.last_thoughts or "(no thoughts in the last reply)")

    def cmd_budget(self, arg: str) -> None:
        if not arg:
            raise UsageError
        self.image_budget = check_budget(int(arg) if arg.isdecimal() else arg, "/budget")  # "²" is a digit
        self.note(f"image budget {self.image_budget}")

    def _attach(self, name: str, arg: str) -> None:
        if not arg:
            raise UsageError
        kind, key = MEDIA[name]
        path = Path(arg).expanduser()
        check_attachment(self.chat, kind, path)
        self.pending[key].append(str(path))
        n = sum(len(v) for v in self.pending.values())
        self.note(f"attached {path.name} ({n} for the next message)")

    def cmd_image(self, arg: str) -> None:
        self._attach("/image", arg)

    def cmd_audio(self, arg: str) -> None:
        self._attach("/audio", arg)

    def cmd_video(self, arg: str) -> None:
        self._attach("/video", arg)


def check_attachment(chat, kind: str, source) -> None:
    """MediaError now, not at the next message, when the chat's model cannot take
    `source` as `kind` ("image", "audio", "video")."""
    processor_for(chat.model).check(as_media(source, kind), chat.tokenizer)


def one_line(e: BaseException) -> str:
    """An exception as one line: an OSError as `path: reason`."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    text = " ".join(str(e).split())
    return text if isinstance(e, ValueError) and text else f"{type(e).__name__}: {text}".rstrip(": ")
