"""OpenAI's request bodies and error shape for `msfx serve` (field names and limits of the OpenAI API reference).

Requests are pydantic models: a field OpenAI documents but msfx does not implement is refused
(`extra="forbid"`, OpenAI's "Unrecognized request argument" error) rather than silently ignored.
"""
from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class OpenAIError(Exception):
    """An error answered as OpenAI answers it: HTTP `status` with
    `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type, "param": param, "code": code}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body}, status_code=self.status)


def parse(body: bytes, request_class: type[BaseModel]) -> BaseModel:
    """The JSON `body` as a `request_class`, whatever its content type (curl's `-d` sends none).

    Raises:
        OpenAIError: 400 for malformed JSON or the first field pydantic refuses.
    """
    try:
        return request_class.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e.errors()) from None


def validation_error(errors: list[dict]) -> OpenAIError:
    """The first of pydantic's `errors` as OpenAI's 400."""
    error = errors[0]
    where = [str(part) for part in error["loc"]]
    param = where[0] if where else None
    if error["type"] == "json_invalid":
        return OpenAIError(400, f"We could not parse the JSON body of your request ({error['msg']})")
    if error["type"] == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {'.'.join(where)}", param)
    if error["type"] == "missing":
        return OpenAIError(400, f"Missing required parameter: '{'.'.join(where)}'.", param)
    return OpenAIError(400, f"Invalid value for '{'.'.join(where) or 'body'}': {error['msg']}", param)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Sampling fields shared by chat and text completions. `temperature` 0 decodes greedily;
    above 0 samples from the softmax at that temperature, cut to the `top_p` nucleus (no top-k)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = Field(None, validate_default=True)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[int, float] | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, unused

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        for token, value in (bias or {}).items():
            if not -100 <= value <= 100:
                raise ValueError(f"bias {value} for token {token} is outside [-100, 100]")
        return bias


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; extra fields (`tool_calls`, ...) pass through to the chat template."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens

    def message_dicts(self) -> list[dict]:
        """The messages for `apply_chat_template`, text parts joined into one string."""
        out = []
        for message in self.messages:
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            out.append({**message.model_dump(exclude_none=True), "content": content or ""})
        return out


class CompletionRequest(_GenerationRequest):
    """A text completion of one prompt: a string, a list holding one string, or token ids."""

    prompt: str | list[int] | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"one prompt per request is supported, got {len(prompt)}")
            return prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        return prompt


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _texts(cls, texts: str | list[str]) -> list[str]:
        texts = [texts] if isinstance(texts, str) else texts
        if not texts or any(not t for t in texts):
            raise ValueError("input must be a non-empty string or a non-empty list of non-empty strings")
        return texts

