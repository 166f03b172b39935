"""Structured outputs: JSON schema, regex and grammar constraints on decoding,
with llguidance as the engine (docs/structured-output.md)."""

from gemma4_mlx.constrain.constraint import Constraint, RowConstraints, bind, bind_response_format, engine_tokenizer
from gemma4_mlx.constrain.grammar import (
    ConstraintError,
    Grammar,
    constraint_from_response_format,
    grammar_from,
    json_object,
    json_schema,
    lark,
    regex,
)
from gemma4_mlx.constrain.processor import ConstraintProcessor

__all__ = [
    "Constraint",
    "ConstraintError",
    "ConstraintProcessor",
    "Grammar",
    "RowConstraints",
    "bind",
    "bind_response_format",
    "constraint_from_response_format",
    "engine_tokenizer",
    "grammar_from",
    "json_object",
    "json_schema",
    "lark",
    "regex",
]
