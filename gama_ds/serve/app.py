"""The HTTP side: FastAPI routes over the batcher. Nothing here runs the model.

POST /v1/chat/completions  OpenAI's chat API for audio input, JSON or server-sent events
GET  /v1/models            the one model served (and /v1/models/{id})
POST /api/spectrogram      the fbank the model sees of a clip, for the page to draw
GET  /api/info, /health    what the page needs to know; readiness (no key needed)
GET  /metrics              Prometheus counters, batch sizes among them
GET  /                     the web page (static/)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api_errors import ApiError, too_large, unauthorized
from .batcher import Batcher, Job
from .chat import read_chat
from .clips import clip_features, decode_base64, spectrogram
from .options import ServeOptions

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def build_app(
    options: ServeOptions,
    batcher: Batcher,
    defaults: dict,
    max_new_tokens: int,
    max_positions: int,
    created: int,
) -> FastAPI:
    """`defaults`: generate()'s sampling settings for requests that give none; `max_new_tokens`:
    the answer's length limit for requests without max_tokens."""
    name = options.name
    limit = options.max_request_bytes

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield

    app = FastAPI(title="gama-ds serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        batcher.stats.reject(err.status)
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        body = ApiError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body()
        return JSONResponse(body, status_code=err.status_code)

    def authorise(request: Request) -> None:
        if options.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("this server needs an API key: send the header `Authorization: Bearer KEY`")
        if not hmac.compare_digest(token.strip().encode(), options.api_key.encode()):
            raise unauthorized("the API key is not this server's")

    async def read_json_body(request: Request) -> bytes:
        """The body, refused by its declared length and again while it arrives, before any parsing."""
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(
                415,
                f"send the request as application/json, not {kind or 'no content type'}",
                code="unsupported_media_type",
            )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ApiError(
                    400, f"Content-Length {declared!r} is not a byte count", code="invalid_content_length"
                )
            if int(declared) > limit:
                raise too_large(limit)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large(limit)
        return bytes(body)

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "gama-ds"}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(os.path.join(STATIC, "index.html"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/api/info")
    async def info():
        return {
            "model": name,
            "api_key_required": options.api_key is not None,
            "max_audio_s": options.max_audio_s,
            "max_request_mb": options.max_request_mb,
            "formats": ["wav", "mp3", "flac", "ogg"],
        }

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorise(request)
        if model_id != name:
            raise ApiError(
                404,
                f"model {model_id!r} is not served here; this server serves {name!r}",
                "model",
                "model_not_found",
            )
        return model_card()

    @app.get("/metrics")
    async def metrics(request: Request):
        authorise(request)
        return PlainTextResponse(prometheus(batcher))

    @app.post("/api/spectrogram")
    async def clip_spectrogram(request: Request):
        authorise(request)
        body = await read_json_body(request)
        try:
            clip = json.loads(body)
            data, fmt = clip["data"], str(clip["format"]).lower()
        except (ValueError, KeyError, TypeError):
            raise ApiError(
                400, 'send {"data": BASE64, "format": "wav"|"mp3"|"flac"|"ogg"}', code="invalid_value"
            ) from None
        raw = decode_base64(data, "clip")
        features = await run_in_threadpool(clip_features, raw, fmt, options.max_audio_s, "clip")
        return spectrogram(features)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorise(request)
        question = read_chat(await read_json_body(request), name, defaults, max_positions)
        features = None
        if question.audio is not None:
            # Decoding and fbank run in a worker thread: the loop keeps accepting requests meanwhile.
            features = await run_in_threadpool(
                clip_features,
                question.audio,
                question.audio_format,
                options.max_audio_s,
                question.audio_param,
            )
        job = Job(
            features=features,
            qa={"instruction": question.text, "input": ""},
            settings=question.settings,
            max_tokens=question.max_tokens or max_new_tokens,
            seed=question.seed,
            batch_key=question.batch_key,
            loop=asyncio.get_running_loop(),
        )
        batcher.submit(job)
        reply = Reply(name)
        if question.stream:
            return StreamingResponse(
                reply.events(job, question.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                kind, *payload = await job.events.get()
                if kind == "error":
                    raise payload[0]
                if kind == "done":
                    return reply.completion(job, *payload)
        finally:
            job.cancelled = True  # done already, or the client went away: nothing more to generate

    return app


class Reply:
    """OpenAI's response objects for one request."""

    def __init__(self, model: str):
        self.model = model
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _usage(self, job: Job, completion_tokens: int) -> dict:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": job.prompt_tokens + completion_tokens,
        }

    def completion(self, job: Job, text: str, reason: str, completion_tokens: int) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": reason,
                    "logprobs": None,
                }
            ],
            "usage": self._usage(job, completion_tokens),
            **self._tags(job),
        }

    @staticmethod
    def _tags(job: Job) -> dict:
        """Not OpenAI's: with a soft prompt, the tags the clip's prompt was given."""
        return {} if job.tags is None else {"tags": job.tags}

    def _chunk(self, delta: dict, reason: str | None = None, usage: dict | None = None, extra=None) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": []
            if usage
            else [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
        }
        if usage:
            chunk["usage"] = usage
        chunk.update(extra or {})
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def events(self, job: Job, include_usage: bool):
        """Server-sent events in OpenAI's chunk format, one per piece of text as it is generated."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                kind, *payload = await job.events.get()
                if kind == "delta":
                    yield self._chunk({"content": payload[0]})
                elif kind == "done":
                    _, reason, completion_tokens = payload
                    yield self._chunk({}, reason, extra=self._tags(job))
                    if include_usage:
                        yield self._chunk({}, usage=self._usage(job, completion_tokens))
                    break
                else:
                    yield f"data: {json.dumps(payload[0].body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = True


def prometheus(batcher: Batcher) -> str:
    stats = batcher.stats
    with stats.lock:
        lines = [
            "# HELP gama_ds_batches_total Generation batches run, by number of requests in the batch.",
            "# TYPE gama_ds_batches_total counter",
            *(f'gama_ds_batches_total{{size="{s}"}} {n}' for s, n in sorted(stats.batch_sizes.items())),
            "# HELP gama_ds_requests_total Requests answered.",
            "# TYPE gama_ds_requests_total counter",
            f"gama_ds_requests_total {stats.requests}",
            "# HELP gama_ds_generated_tokens_total Tokens generated.",
            "# TYPE gama_ds_generated_tokens_total counter",
            f"gama_ds_generated_tokens_total {stats.generated_tokens}",
            "# HELP gama_ds_rejected_total Requests refused, by HTTP status.",
            "# TYPE gama_ds_rejected_total counter",
            *(f'gama_ds_rejected_total{{status="{s}"}} {n}' for s, n in sorted(stats.rejected.items())),
            "# HELP gama_ds_queue_depth Requests waiting for a batch.",
            "# TYPE gama_ds_queue_depth gauge",
            f"gama_ds_queue_depth {batcher.waiting()}",
        ]
    return "\n".join(lines) + "\n"
