"""OpenAI-compatible request bodies (strictly typed) and their translation to SamplingParams.

Fields OpenAI defines but the engine cannot honour (n > 1, best_of, echo, logit_bias, tools,
non-text response formats, suffix) are refused with a 400 rather than silently ignored; unknown
fields are ignored, as OpenAI clients send new ones over time. Extensions beyond OpenAI: top_k,
min_p, repetition_penalty, ignore_eos, stop_token_ids, sparse_prefill (false: dense prefill for this request).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from jaxinfer.sampling_params import SamplingParams
from jaxinfer.serve.frontend import invalid

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
OPENAI_DEFAULT_TEMPERATURE = 1.0


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    sparse_prefill: bool = True

    def check_supported(self) -> None:
        if self.n != 1:
            raise invalid(f"n={self.n} is not supported; only n=1")
        if self.logit_bias:
            raise invalid("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options is only allowed when stream is true")

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: Mapping[str, Any]) -> SamplingParams:
        """The request's fields over ``defaults`` (the model's own) over OpenAI's convention."""
        values: dict[str, Any] = {"temperature": OPENAI_DEFAULT_TEMPERATURE, **defaults}
        for name in ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "top_k", "min_p",
                     "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if max_tokens is not None:
            values["max_tokens"] = max_tokens
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        try:
            return SamplingParams(**values, stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
                                  ignore_eos=self.ignore_eos, logprobs=logprobs, sparse_prefill=self.sparse_prefill)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise invalid("echo is not supported")
        if self.best_of not in (None, 1):
            raise invalid(f"best_of={self.best_of} is not supported; only 1")
        if self.suffix:
            raise invalid("suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise invalid("prompt must not be empty")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        return list(prompt)

    def to_params(self, defaults: Mapping[str, Any]) -> SamplingParams:
        max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        return self.sampling_params(max_tokens, self.logprobs, defaults)


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise invalid("tools are not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise invalid("tool_choice is not supported")
        if self.response_format and self.response_format.get("type") != "text":
            raise invalid("response_format other than text is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid("top_logprobs requires logprobs to be true")

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def to_params(self, context_room: int, defaults: Mapping[str, Any]) -> SamplingParams:
        """``context_room``: tokens left in the context after the prompt (the default max_tokens)."""
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max(1, context_room) if max_tokens is None else max_tokens, logprobs, defaults)
