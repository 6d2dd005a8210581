"""A chat-completions request body -> one question about (at most) one clip, with its sampling.

The schema is OpenAI's, as its clients send it for audio input: a user message whose content
holds text parts and an `input_audio` part. The models answer one question about one clip with
no history, so anything else (several turns, a system prompt, several clips, parameters that
would change the answer and are not implemented) is refused by name rather than ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api_errors import ApiError
from .clips import decode_base64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AudioPayload(_Strict):
    data: str
    format: str


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: AudioPayload


class Message(_Strict):
    role: str
    content: str | list[Annotated[TextPart | AudioPart, Field(discriminator="type")]] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one answer per request; OpenAI's default
    user: str | None = None  # an end-user id, for the client's own records


@dataclass
class Question:
    """What the model is asked, and how to answer."""

    text: str
    audio: bytes | None
    audio_format: str | None
    audio_param: str | None  # where the clip sits in the request, for error messages
    max_tokens: int | None
    settings: dict  # transformers generate() sampling arguments
    seed: int | None
    stream: bool
    include_usage: bool
    batch_key: tuple = field(default=())


def _param(loc: tuple) -> str:
    """pydantic's ('messages', 0, 'content', 1, 'input_audio') -> messages[0].content[1].input_audio"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[tagged-union[TextPart,AudioPart]]", "none"):
            continue  # pydantic's names of union members, not places in the request
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_error(err: ValidationError) -> ApiError:
    first = err.errors(include_url=False)[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"{param}: not a parameter this server supports", param, "unsupported_parameter")
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first['msg']}", None, "invalid_json")
    where = f"{param}: " if param else ""
    return ApiError(400, f"{where}{first['msg']}", param or None, "invalid_value")


def read_chat(body: bytes, model_name: str, defaults: dict, max_positions: int) -> Question:
    """The request's question, clip and sampling; ApiError naming the field when it is not usable."""
    try:
        req = ChatRequest.model_validate_json(body)
    except ValidationError as err:
        raise _schema_error(err) from None
    if req.model != model_name:
        raise ApiError(
            404,
            f"model {req.model!r} is not served here; this server serves {model_name!r}",
            "model",
            "model_not_found",
        )
    if len(req.messages) != 1 or req.messages[0].role != "user":
        roles = ", ".join(m.role for m in req.messages)
        raise ApiError(
            400,
            f"send one user message (the question, with its clip): this model answers one question "
            f"about one clip with no system prompt or history; got roles [{roles}]",
            "messages",
            "unsupported_conversation",
        )
    content = req.messages[0].content
    parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
    texts = [p.text for p in parts if isinstance(p, TextPart)]
    audios = [(i, p) for i, p in enumerate(parts) if isinstance(p, AudioPart)]
    question = "\n".join(t.strip() for t in texts if t.strip())
    if not question:
        raise ApiError(
            400,
            "no question: the user message needs a text part that asks something",
            "messages[0].content",
            "missing_question",
        )
    if len(audios) > 1:
        raise ApiError(
            400,
            f"{len(audios)} input_audio parts; send one clip per request",
            "messages[0].content",
            "too_many_audio_parts",
        )
    audio = fmt = param = None
    if audios:
        index, part = audios[0]
        param = f"messages[0].content[{index}].input_audio"
        fmt = part.input_audio.format.lower()
        audio = decode_base64(part.input_audio.data, param)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > max_positions:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} is over the model's {max_positions} positions",
            "max_tokens",
            "invalid_value",
        )
    settings = sampling(req.temperature, req.top_p, defaults)
    # Greedy requests, and unseeded sampled ones with the same settings, share batches; a seeded
    # sampled request runs alone, so that its answer depends on its seed and nothing else.
    key = tuple(sorted(settings.items()))
    if settings.get("do_sample") and req.seed is not None:
        key = (*key, ("alone", object()))
    return Question(
        text=question,
        audio=audio,
        audio_format=fmt,
        audio_param=param,
        max_tokens=max_tokens,
        settings=settings,
        seed=req.seed,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        batch_key=key,
    )


def sampling(temperature: float | None, top_p: float | None, defaults: dict) -> dict:
    """generate() arguments: temperature 0 is greedy (as `gama-ds generate --greedy`), what is not
    given comes from the export's (else the reference's) sampling settings."""
    if temperature == 0:
        return {"do_sample": False}
    settings = dict(defaults)
    if temperature is None and top_p is None:
        return settings
    settings["do_sample"] = True
    if temperature is not None:
        settings["temperature"] = temperature
    if top_p is not None:
        settings["top_p"] = top_p
    return settings
