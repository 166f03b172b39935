"""Guarded text: a "<" written by ordinary tokens stands as U+E002, so the parser reads
no control string in it (`output_text`); `unguard` gives back what was written."""

from __future__ import annotations

import dataclasses
import re

_LT = "\ue002"  # stands for a "<" written by ordinary tokens
_QUOTE = "\ue001"
_UNGUARD = re.compile(f"{_QUOTE}(.)|{_LT}", re.S)


def guard(text: str) -> str:
    return text.replace(_QUOTE, _QUOTE + _QUOTE).replace(_LT, _QUOTE + _LT).replace("<", _LT)


def unguard(text: str) -> str:
    return _UNGUARD.sub(lambda m: m.group(1) if m.group(1) is not None else "<", text)


def unguard_value(value):
    """Every string in a parsed tool-call value (dict keys and list items included)."""
    if isinstance(value, str):
        return unguard(value)
    if isinstance(value, dict):
        return {unguard_value(k): unguard_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unguard_value(v) for v in value]
    return value


def unguard_call(call):
    """A `ToolCall` parsed from guarded text, with its strings as the model wrote them.
    Its warnings quote slices with repr, which spells a guarded "<" as the escape
    text `\\ue002`: that is put back too (a diagnostic, so a literal U+E001 / U+E002
    the model wrote may read differently there)."""
    return dataclasses.replace(
        call,
        name=unguard(call.name),
        raw_name=unguard(call.raw_name),
        raw=unguard(call.raw),
        arguments=unguard_value(call.arguments),
        warnings=[_unguard_repr(w) if isinstance(w, str) else w for w in call.warnings],
    )


def _unguard_repr(text: str) -> str:
    return unguard(text).replace("\\ue002", "<").replace("\\ue001", "")
