"""Request bodies of the HTTP API (OpenAI completions/chat and SGLang's native /generate).

Unknown fields are ignored (as OpenAI and SGLang do); fields we know but cannot honour
(`n > 1`, `logprobs`, penalties, `tools`, ...) are refused with a 400 naming the field by
`unsupported_fields`. Numbers must be finite (NaN/inf -> 400).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    """Send a final chunk with `usage` and empty `choices`."""
    continuous_usage_stats: bool = False
    """Attach `usage` to every chunk."""


class _OpenAISampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    # SLO annotation, SGLang 0.5.23 style
    custom_params: dict[str, Any] | None = None
    priority: int | None = None
    rid: str | None = None
    user: str | None = None
    # known but unsupported unless default
    best_of: int | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    top_k: int = -1
    min_p: float = 0.0
    min_tokens: int = 0
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    continue_final_message: bool = False


class GenerateSampling(_Body):
    """SGLang's `sampling_params` dict as the frontend and bench_serving send it."""

    max_new_tokens: int = Field(default=128, ge=0)
    min_new_tokens: int = 0
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: Any = None
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None
    seed: int | None = Field(default=None, alias="sampling_seed")
    custom_params: dict[str, Any] | None = None

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


class GenerateRequest(_Body):
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: GenerateSampling = Field(default_factory=GenerateSampling)
    stream: bool = False
    rid: str | None = None
    priority: int | None = None
    custom_params: dict[str, Any] | None = None
    """Convenience alias of `sampling_params.custom_params` (SGLang carries it there)."""
    return_logprob: bool = False


# field -> value it must have (anything else is refused); None means "absent or null"
_MUST_BE_DEFAULT = {
    "n": 1,
    "best_of": None,
    "logprobs": None,
    "top_logprobs": None,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": None,
    "min_p": 0.0,
    "min_tokens": 0,
    "min_new_tokens": 0,
    "regex": None,
    "json_schema": None,
    "ebnf": None,
    "stop_regex": None,
    "echo": False,
    "suffix": None,
    "tools": None,
    "return_logprob": False,
}


def unsupported_fields(body: BaseModel, prefix: str = "") -> tuple[str, str] | None:
    """(field, message) for the first field set to something this server cannot do."""
    for name, default in _MUST_BE_DEFAULT.items():
        if name not in type(body).model_fields:
            continue
        value = getattr(body, name)
        if name == "best_of" and value == 1:
            continue
        if name == "logprobs" and value is False:
            continue
        if name == "tools" and value == []:
            continue
        if value != default and not (default is None and value in ("", [], {})):
            return prefix + name, f"unsupported value {value!r} (this server supports only {default!r})"
    top_k = getattr(body, "top_k", -1)
    if top_k not in (-1, 0, None):
        return prefix + "top_k", f"unsupported value {top_k!r} (top-k sampling is not implemented; use top_p)"
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        return prefix + "response_format", f"unsupported type {fmt.get('type')!r} (only 'text')"
    return None
