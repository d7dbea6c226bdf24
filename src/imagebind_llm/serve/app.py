"""The OpenAI-compatible HTTP API (FastAPI): `/v1/models`, `/v1/chat/completions`, `/health`, `/metrics`, and
the web UI at `/ui`.

A chat request is parsed (`protocol`), its media are decoded in the worker pool under the limits
(`media`), the conversation becomes one engine `Request` (all media parts of the conversation mixed by
their weights into the one injected feature) and joins the running batch; the answer is returned whole
or streamed as server-sent events. A client that disconnects frees its row at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from imagebind_llm.engine import EngineStopped, Handle, QueueFullError, Request
from imagebind_llm.serve.images import add_image_routes
from imagebind_llm.serve.protocol import (APIError, ChatRequest, bad_request, chunk_object, completion_id,
                                          completion_object, model_list, parse_chat_request, read_json,
                                          split_tool_call, tool_call_id, tool_call_message, usage)
from imagebind_llm.serve.service import Service

log = logging.getLogger(__name__)
_PROTECTED = ("/v1/", "/metrics")


def create_app(service: Service) -> FastAPI:
    """The FastAPI app of ``service`` (call ``service.start()`` to load its model, if it has a loader)."""
    app = FastAPI(title="imagebind-llm", docs_url=None, redoc_url=None)
    app.state.service = service
    config = service.config

    app.add_middleware(_Guard, service=service)

    @app.exception_handler(APIError)
    async def api_error(request: HTTPRequest, error: APIError) -> JSONResponse:
        return _error_response(service, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _error_response(service, APIError(error.status_code, str(error.detail), type=kind,
                                                 headers=error.headers))  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def server_error(request: HTTPRequest, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(service, APIError(500, "internal server error (details are in the server's log)",
                                                 type="server_error", code="internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.ready:
            return JSONResponse({"status": "ok", "model": config.model_id})
        if service.load_error is not None:
            return JSONResponse({"status": "error", "message": str(service.load_error)}, status_code=500)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(model_list(config.model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest) -> Response:
        arrival = time.monotonic()
        body = await read_json(request, config.max_body_bytes)
        engine = service.engine  # 503 while loading
        chat = parse_chat_request(body, default_model=config.model_id, max_media_items=config.max_media_items)
        tensors = await service.decode(chat.media)
        engine_request = _engine_request(chat, tensors)
        try:
            prompt_ids = engine.prompt_ids(engine_request)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise bad_request(str(e), "messages", code) from None
        engine_request.prompt_ids = prompt_ids
        try:
            handle = engine.submit(engine_request)
        except QueueFullError as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="unavailable_error", code="engine_stopped") from None
        service.metrics.prompt_tokens.inc(len(prompt_ids))
        answer = _Answer(service, handle, chat, len(prompt_ids), arrival)
        if chat.stream:
            return StreamingResponse(answer.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await answer.whole(request))

    add_image_routes(app, service)
    if config.ui:
        from imagebind_llm.serve.ui import mount_ui

        app = mount_ui(app, service)
    return app


class _Guard:
    """ASGI middleware: the API key on `/v1/*` and `/metrics` (compared in constant time), and requests counted
    by status. Plain ASGI, so that a handler still sees its client disconnect."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, key = scope["path"], self.service.config.api_key
        if key and path.startswith(_PROTECTED) and not _authorized(Headers(scope=scope), key):
            error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             type="authentication_error", code="invalid_api_key")
            return await _error_response(self.service, error)(scope, receive, send)
        status = []

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            if path.startswith("/v1/") and status:
                self.service.metrics.requests.labels(path, str(status[0])).inc()


def _authorized(headers: Headers, key: str) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _error_response(service: Service, error: APIError) -> JSONResponse:
    service.metrics.errors.labels(error.type, str(error.code)).inc()
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)



def _engine_request(chat: ChatRequest, tensors: list[Any]) -> Request:
    """The engine request: the text conversation, with every media part riding on the last user message."""
    messages: list[dict[str, Any]] = [dict(m) for m in chat.messages]
    parts = [{"type": p.modality, p.modality: t, "weight": p.weight} for p, t in zip(chat.media, tensors)]
    if parts:
        messages[-1] = {"role": "user", "content": [*parts, {"type": "text", "text": messages[-1]["content"]}]}
    return Request(messages=messages, sampling=chat.sampling, blend=chat.blend, constraint=chat.constraint)


class _Answer:
    """One submitted request's answer, whole or as server-sent events; the row is freed if the client leaves."""

    def __init__(self, service: Service, handle: Handle, chat: ChatRequest, prompt_tokens: int, arrival: float) -> None:
        self.service, self.handle, self.chat = service, handle, chat
        self.prompt_tokens, self.arrival = prompt_tokens, arrival
        self.id, self.created = completion_id(), int(time.time())

    async def pieces(self, request: HTTPRequest | None) -> AsyncIterator[str]:
        """The answer's text pieces, leading whitespace removed (the Alpaca answer starts with a space).

        With ``request``, the client is watched for a disconnect; a streaming response needs no watcher
        (Starlette cancels it when the client leaves).
        """
        watcher = request and asyncio.create_task(_cancel_on_disconnect(request, self.handle))
        first, started = True, False
        try:
            async for piece in self.handle.astream():
                if first:
                    self.service.metrics.ttft.observe(time.monotonic() - self.arrival)
                    first = False
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece
        except ValueError as e:  # the request's media or options failed inside the engine: the client's error
            raise bad_request(str(e), "messages", "invalid_request") from None
        finally:
            if watcher:
                watcher.cancel()
            if not self.handle.done:
                self.handle.cancel()  # the client went away (or the stream failed): free the row
        completion = self.handle.completion
        self.service.metrics.tokens(len(completion.tokens))
        self.service.metrics.latency.observe(time.monotonic() - self.arrival)

    async def whole(self, request: HTTPRequest) -> dict[str, Any]:
        text = "".join([piece async for piece in self.pieces(request)])
        completion = self.handle.completion
        answer = completion_object(self.id, self.created, self.chat.model, text.rstrip(), completion.finish_reason,
                                   self.prompt_tokens, len(completion.tokens))
        message = tool_call_message(text) if self.chat.tool_call else None
        if message is not None:  # a complete call; a cut-off one stays text with finish_reason "length"
            answer["choices"][0].update(message=message, finish_reason="tool_calls")
        return answer

    async def events(self) -> AsyncIterator[str]:
        """SSE: the role first, the content (``finish_reason`` on the last content chunk), usage, ``[DONE]``."""
        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            return event(chunk_object(self.id, self.created, self.chat.model, delta, finish))

        if self.chat.tool_call:
            async for text in self._tool_call_events(event):
                yield text
            return
        yield chunk({"role": "assistant", "content": ""})
        pending: str | None = None  # held back one piece so that the last one carries finish_reason
        try:
            async for piece in self.pieces(None):
                if pending is not None:
                    yield chunk({"content": pending})
                pending = piece
        except Exception as e:
            for line in self._error_events(e, event):
                yield line
            return
        completion = self.handle.completion
        yield chunk({"content": pending or ""}, completion.finish_reason)
        if self.chat.include_usage:
            yield event(chunk_object(self.id, self.created, self.chat.model, None,
                                     usage_=usage(self.prompt_tokens, len(completion.tokens))))
        yield "data: [DONE]\n\n"

    def _error_events(self, error: Exception, event: Callable[[dict[str, Any]], str]) -> list[str]:
        """A failure in the middle of a stream: an error event in OpenAI's shape, then the end of the stream."""
        log.warning("stream %s failed: %s", self.id, error)
        if not isinstance(error, APIError):
            error = APIError(500, f"generation failed ({type(error).__name__})", type="server_error",
                             code="generation_failed")
        return [event(error.body()), "data: [DONE]\n\n"]

    async def _tool_call_events(self, event: Callable[[dict[str, Any]], str]) -> AsyncIterator[str]:
        """A generated call streamed as OpenAI streams one: the first chunk holds the call's index, id, type and
        function name (once the model has written the name), the next ones pieces of ``function.arguments``,
        the last an empty delta with ``finish_reason: "tool_calls"`` ("length" if the call was cut off)."""
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return event(chunk_object(self.id, self.created, self.chat.model, delta, finish))

        def arguments(piece: str) -> dict[str, Any]:
            return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}

        text, head, sent = "", None, 0  # sent: characters of the arguments streamed so far
        try:
            async for piece in self.pieces(None):
                text += piece
                if head is None and (head := split_tool_call(text)) is not None:
                    yield chunk({"role": "assistant", "content": None, "tool_calls": [
                        {"index": 0, "id": tool_call_id(), "type": "function",
                         "function": {"name": head[0], "arguments": ""}}]})
                if head is not None and len(text) - 1 > head[1] + sent:  # hold back the call's closing brace
                    yield chunk(arguments(text[head[1] + sent:-1]))
                    sent = len(text) - 1 - head[1]
        except Exception as e:
            for line in self._error_events(e, event):
                yield line
            return
        completion = self.handle.completion
        message = tool_call_message(text)
        if message is None:  # cut off before the call was complete: what there is, as text
            yield chunk({"role": "assistant", "content": text} if head is None else arguments(text[head[1] + sent:]),
                        completion.finish_reason)
        else:
            rest = message["tool_calls"][0]["function"]["arguments"][sent:]
            if rest:
                yield chunk(arguments(rest))
            yield chunk({}, "tool_calls")
        if self.chat.include_usage:
            yield event(chunk_object(self.id, self.created, self.chat.model, None,
                                     usage_=usage(self.prompt_tokens, len(completion.tokens))))
        yield "data: [DONE]\n\n"


async def _cancel_on_disconnect(request: HTTPRequest, handle: Handle) -> None:
    while not handle.done:
        if await request.is_disconnected():
            handle.cancel()
            return
        await asyncio.sleep(0.25)
