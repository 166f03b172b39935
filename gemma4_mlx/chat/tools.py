"""`--tools FILE`: the public functions of a Python file, checked at start-up, and
how a tool call and its outcome read on the terminal."""

from __future__ import annotations

import importlib.util
import inspect
import typing
from pathlib import Path

from gemma4_mlx.chat.session import ToolRun
from gemma4_mlx.prompt.arguments import ToolCall
from gemma4_mlx.prompt.template import tool_schema


def load_tools(path: str) -> list:
    """Public functions defined in a Python file (type hints + docstrings declare
    them).  Each must declare as a tool: a ValueError (one line, naming the function
    and the parameter) says which does not."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: no such tools file")
    spec = importlib.util.spec_from_file_location(file.stem, file)
    if spec is None:  # a suffix Python cannot import (.txt, none)
        raise ValueError(f"{path}: not a Python file (a tools file is a .py module)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ValueError(f"{path}: failed to import ({type(e).__name__}: {e})") from None
    fns = [
        f
        for name, f in inspect.getmembers(module, inspect.isfunction)
        if f.__module__ == module.__name__ and not name.startswith("_")
    ]
    if not fns:
        raise ValueError(f"{path}: defines no public functions")
    for fn in fns:
        problem = _undeclarable(fn)
        if problem:
            raise ValueError(f"{path}: tool {fn.__name__}: {problem}")
    return fns


def _undeclarable(fn) -> str | None:
    """Why `fn` cannot be declared as a tool, or None."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception as e:  # a forward reference that does not resolve, ...
        return f"its type hints do not resolve ({type(e).__name__}: {e})"
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"parameter {name!r}: *args / **kwargs cannot be declared as tool parameters"
        if name not in hints:
            return f"parameter {name!r} has no type hint (tools are declared from their type hints)"
    try:
        tool_schema(fn)
    except (TypeError, ValueError) as e:
        culprit = [n for n, t in hints.items() if n != "return" and repr(t) in str(e)]
        return f"parameter {culprit[0]!r}: {e}" if culprit else str(e)
    return None


def call_line(call: ToolCall) -> str:
    """`tool call: name(a=1, …)`; a call without a name shows what the model wrote."""
    if not call.name:
        return f"tool call without a function name: {call.raw.strip()!r}"
    args = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
    return f"tool call: {call.name}({args})"


def outcome_line(run: ToolRun, *, have_tools: bool, interactive: bool) -> str:
    """What became of a call that was not run ("" for one that ran or failed: its
    result is shown instead)."""
    if run.status in ("ran", "failed"):
        return ""
    hint = ""
    if run.status == "unknown_tool":
        hint = " (the model was told so)" if have_tools else " (no tools were given: start with --tools FILE)"
    elif run.status == "declined" and not interactive:
        hint = " (give --yes to run tool calls)"
    return f"not run: {run.detail}{hint}"
