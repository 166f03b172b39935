"""Tool declarations from typed Python functions: the JSON schema (OpenAI shape) that
the chat template renders as a `<|tool>declaration:…` block (docs/chat-format.md §5.2)."""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Mapping

_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Params|Returns?|Yields?|Raises|Examples?|Notes?):\s*$")
_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(tp) -> dict:
    if tp in _PY_TYPES:
        return {"type": _PY_TYPES[tp]}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        schema = _json_type(rest[0]) if len(rest) == 1 else {"type": _json_type(rest[0])["type"]}
        return {**schema, "nullable": True} if len(rest) < len(args) else schema
    if origin is typing.Literal:
        kinds = {_PY_TYPES.get(type(a), "string") for a in args}
        return {"type": kinds.pop() if len(kinds) == 1 else "string", "enum": list(args)}
    if inspect.isclass(tp) and issubclass(tp, enum.Enum):
        return {"type": "string", "enum": [e.value for e in tp]}
    if tp in (list, tuple, set) or origin in (list, tuple, set, frozenset):
        schema = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = _json_type(args[0])
        return schema
    if tp is dict or origin is dict or (inspect.isclass(origin or tp) and issubclass(origin or tp, Mapping)):
        return {"type": "object"}
    raise TypeError(f"unsupported parameter type for a tool declaration: {tp!r}")


def _parse_docstring(doc: str) -> tuple[str, dict]:
    desc, args, section, current = [], {}, None, None
    for line in doc.splitlines():
        m = _SECTION.match(line)
        if m:
            section, current = m.group(1).lower(), None
            continue
        if section is None:
            desc.append(line.strip())
            continue
        if not section.startswith(("arg", "param")):
            continue
        am = re.match(r"^\s*(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$", line)
        if am and (current is None or len(line) - len(line.lstrip()) <= current[1]):
            current = (am.group(1).lstrip("*"), len(line) - len(line.lstrip()))
            args[current[0]] = am.group(3).strip()
        elif current and line.strip():
            args[current[0]] = (args[current[0]] + " " + line.strip()).strip()
    for m in re.finditer(r":param\s+(?:\w+\s+)?(\w+):\s*(.+)", doc):  # reST style as well
        args.setdefault(m.group(1), m.group(2).strip())
    text = " ".join(x for x in desc if x and not x.startswith(":param")).strip()
    return text, args


def tool_schema(fn) -> dict:
    """Tool declaration (OpenAI shape) from a typed Python function and its docstring."""
    hints = typing.get_type_hints(fn)
    desc, arg_docs = _parse_docstring(inspect.getdoc(fn) or "")
    props, required = {}, []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{fn.__name__}: *args/**kwargs cannot be declared as tool parameters")
        if name not in hints:
            raise TypeError(f"{fn.__name__}: parameter {name!r} needs a type hint")
        schema = _json_type(hints[name])
        props[name] = {"description": arg_docs[name], **schema} if arg_docs.get(name) else schema
        if p.default is p.empty:
            required.append(name)
    params = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    return {"type": "function", "function": {"name": fn.__name__, "description": desc, "parameters": params}}
