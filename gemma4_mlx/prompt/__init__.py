"""Gemma 4 chat format: prompt rendering and tolerant output parsing (docs/chat-format.md)."""

from gemma4_mlx.prompt.parser import (
    CTRL_RE,
    Event,
    ParseResult,
    StreamParser,
    ToolCall,
    coalesce,
    parse,
    parse_call_block,
    parser_for_prompt,
)
from gemma4_mlx.prompt.template import (
    BOS,
    EMPTY_THOUGHT,
    SPECIAL_TOKENS,
    STOP_TOKEN_IDS,
    ChatTemplateError,
    format_declaration,
    format_value,
    normalize_messages,
    render,
    render_with_checkpoint_template,
    template_info,
)
from gemma4_mlx.prompt.tool_schema import tool_schema

__all__ = [
    "BOS",
    "CTRL_RE",
    "EMPTY_THOUGHT",
    "SPECIAL_TOKENS",
    "STOP_TOKEN_IDS",
    "ChatTemplateError",
    "Event",
    "ParseResult",
    "StreamParser",
    "ToolCall",
    "coalesce",
    "format_declaration",
    "format_value",
    "normalize_messages",
    "parse",
    "parse_call_block",
    "parser_for_prompt",
    "render",
    "render_with_checkpoint_template",
    "template_info",
    "tool_schema",
]
