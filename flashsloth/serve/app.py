"""
The FastAPI application of `flashsloth serve`: OpenAI-compatible `/v1/chat/completions` (plain and server-sent
events), `/v1/models`, `/health`, and the web page at `/`.

Requests are checked and their images processed in a thread pool, then queued on the `BatchingEngine`, whose worker
thread runs the model: the event loop never waits on the model, so `/health` answers while a batch runs.
"""

import asyncio
import json
import resource
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers.utils import logging

from .batching import BatchingEngine, Job
from .protocol import ApiError, ChatRequest, Limits, parse_chat_request


logger = logging.get_logger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
# How much of an oversize body is read (and dropped) before answering 413, so that the client reads the answer.
DRAIN_FACTOR = 4
# How often a plain (not streamed) request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerConfig:
    model_name: str
    context_length: int
    limits: Limits = field(default_factory=Limits)
    max_body_bytes: int = 16 * 2**20
    processor_kwargs: dict = field(default_factory=dict)


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    too_large = ApiError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes (flashsloth serve --max-body-mb). "
        "Send smaller or fewer images.",
        code="request_too_large",
    )
    if length is not None and length.isdigit() and int(length) > DRAIN_FACTOR * limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > DRAIN_FACTOR * limit:
            raise too_large
        if size <= limit:
            chunks.append(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def prepare_inputs(processor, chat: ChatRequest, config: ServerConfig) -> tuple[dict, int]:
    """The request's model inputs (a batch of one) and its answer's token budget; runs in a worker thread."""
    try:
        prompt = processor.apply_chat_template(chat.messages, add_generation_prompt=True)
    except TemplateError as error:
        raise ApiError(400, f"The messages cannot be rendered: {error}", param="messages") from error
    try:
        inputs = processor(images=chat.images or None, text=prompt, return_tensors="pt", **config.processor_kwargs)
    except ValueError as error:
        message = str(error).splitlines()[0]
        code = (
            "context_length_exceeded" if "more than the model accepts" in message or "max_length" in message else None
        )
        raise ApiError(400, f"The request cannot be processed: {message}", param="messages", code=code) from error
    prompt_tokens = inputs["input_ids"].shape[1]
    room = config.context_length - prompt_tokens
    requested = chat.settings.max_tokens
    if room < 1 or (requested is not None and requested > room):
        wanted = f"{requested} answer tokens" if requested is not None else "at least one answer token"
        raise ApiError(
            400,
            f"This model's context is {config.context_length} tokens; the prompt takes {prompt_tokens} (images "
            f"included), which leaves {max(room, 0)}, but the request needs {wanted}. Shorten the messages, send "
            "fewer images, or lower max_tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    return dict(inputs), min(requested or config.limits.max_tokens_cap, room)


def completion_chunk(request_id: str, created: int, model: str, delta: dict, finish_reason=None) -> str:
    chunk = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(chunk)}\n\n"


def create_app(engine: BatchingEngine, config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="FlashSloth", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine  # the loaded model and its batching, for code that embeds the app
    page = (STATIC_DIR / "index.html").read_text()
    vocab_size = engine.model.config.get_text_config().vocab_size

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        what = {
            404: f"There is no {request.url.path}.",
            405: f"{request.method} is not allowed on {request.url.path}.",
        }
        return error_response(ApiError(error.status_code, what.get(error.status_code, str(error.detail))))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return error_response(ApiError(400, f"Invalid request: {error.errors()}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        logger.error("unexpected error on %s: %s", request.url.path, error, exc_info=True)
        return error_response(ApiError(500, f"Internal server error: {type(error).__name__}: {error}"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        body = {
            "status": "ok",
            "model": config.model_name,
            "running": engine.running,
            "queued": engine.queued(),
            **engine.stats,
            # ru_maxrss is in KiB on Linux
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            # CPU time of the whole server process: what a load test compares when other jobs share the machine.
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
        }
        if torch.cuda.is_available():
            body["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return body

    @app.get("/v1/models")
    async def models():
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "flashsloth"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, config.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ApiError(400, f"The request body is not valid JSON: {error}.") from error
        if isinstance(body, dict) and body.get("model") not in (None, config.model_name):
            raise ApiError(
                404,
                f"The model {body.get('model')!r} does not exist here; this server serves {config.model_name!r}.",
                param="model",
                code="model_not_found",
            )
        chat = await asyncio.to_thread(parse_chat_request, body, config.limits, vocab_size)
        inputs, max_tokens = await asyncio.to_thread(prepare_inputs, engine.processor, chat, config)
        job = Job(inputs, chat.settings, max_tokens, asyncio.get_running_loop())
        if not engine.submit(job):
            raise ApiError(503, "The server is busy: its queue is full. Retry later.", code="server_busy")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if chat.stream:
            return StreamingResponse(
                stream_events(job, request_id, created, chat.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(request, job, request_id, created)

    async def complete(request: Request, job: Job, request_id: str, created: int):
        try:
            next_check = time.monotonic() + DISCONNECT_POLL_S
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = ("waiting",)
                if time.monotonic() >= next_check:  # deltas arrive more often than that: check on time, not on timeout
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({}, status_code=499)
                if event[0] == "error":
                    raise ApiError(500, f"Generation failed: {type(event[1]).__name__}: {event[1]}")
                if event[0] == "done":
                    break
        finally:
            job.cancel()  # a no-op once done; frees the slot if this handler is cancelled
        _, text, finish_reason, usage = event
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }

    async def stream_events(job: Job, request_id: str, created: int, include_usage: bool):
        model = config.model_name
        sent = ""
        try:
            yield completion_chunk(request_id, created, model, {"role": "assistant", "content": ""})
            while True:
                event = await job.events.get()
                if event[0] == "delta":
                    sent += event[1]
                    yield completion_chunk(request_id, created, model, {"content": event[1]})
                elif event[0] == "error":
                    error = ApiError(500, f"Generation failed: {type(event[1]).__name__}: {event[1]}")
                    yield f"data: {json.dumps(error.body())}\n\n"
                    break
                else:
                    _, text, finish_reason, usage = event
                    if len(text) > len(sent):
                        yield completion_chunk(request_id, created, model, {"content": text[len(sent) :]})
                    yield completion_chunk(request_id, created, model, {}, finish_reason)
                    if include_usage:
                        chunk = {"id": request_id, "object": "chat.completion.chunk", "created": created}
                        chunk.update(model=model, choices=[], usage=usage)
                        yield f"data: {json.dumps(chunk)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (or the stream ended): the row stops at the next step

    return app
