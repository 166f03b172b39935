"""Request bodies of the OpenAI and Anthropic APIs (pydantic).  Unknown fields are
accepted and ignored, as the APIs do; known fields are checked."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CHOICES = 16  # `n`: each choice is a row of the batch, and counts against the queue


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """An explicit null means "not given": the APIs document most fields as
        nullable and SDKs and proxies send nulls (`"stream": null`, `"n": null`).  A
        required field sent as null is then reported missing."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class Sampling(_Body):
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None


class OpenAISampling(Sampling):
    # token id (as a JSON key: a string) -> bias added to its logit, as OpenAI's
    logit_bias: dict[str, float] | None = None
    # choices per request: each its own generation (its own row in the batch)
    n: int = Field(1, ge=1, le=MAX_CHOICES)


# -- OpenAI -----------------------------------------------------------------------


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(OpenAISampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: int | None = Field(None, ge=0)  # vLLM's extension: most thinking tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None


class CompletionRequest(OpenAISampling):
    model: str
    prompt: str | list[str] | list[int]
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    echo: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens
    logprobs: int | None = Field(None, ge=0, le=20)


class ResponsesRequest(Sampling):
    """OpenAI's Responses API (responses kept in memory for `previous_response_id`)."""

    model: str
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    thinking_token_budget: int | None = Field(None, ge=0)  # as in Chat Completions (vLLM's extension)


# -- Anthropic --------------------------------------------------------------------


class AnthropicMessage(_Body):
    role: Literal["user", "assistant", "system"]  # system: the mid-conversation-system beta
    content: str | list[dict[str, Any]]


class ThinkingConfig(_Body):
    type: Literal["enabled", "disabled", "adaptive"] = "disabled"
    budget_tokens: int | None = Field(default=None, ge=0)  # any budget: Anthropic's own API wants >= 1,024


class CountTokensRequest(_Body):
    model: str
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(CountTokensRequest, Sampling):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
