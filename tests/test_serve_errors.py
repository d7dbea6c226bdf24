"""The server's bad-request suite: malformed and hostile requests get the right 4xx in OpenAI's error shape
(``{"error": {"message", "type", "param", "code"}}``), never a 500 or a traceback, and the server keeps
serving the next valid request.

Each table below runs against one live server (`start_server` of conftest); a case is sent as JSON, as raw
bytes, as a chunked body, or over a raw socket (for a lying ``Content-Length``). All failing cases of a table
are reported together.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import json
import math
import os
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from imagebind_llm.serve.config import MediaLimits, MiB
from test_hardening_media import wav_bytes

MEDIA = Path(__file__).parent / "fixtures" / "media"
ANY = object()  # a field the case does not check
ROOT_PARAMS = {"model": "imagebind-llm", "max_tokens": 4, "temperature": 0}


# ---------------------------------------------------------------- request and media builders
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{b64(data)}"


def image_part(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


def media_part(modality: str, data: bytes, fmt: str, **extra: Any) -> dict[str, Any]:
    return {"type": "input_media", "modality": modality, "data": b64(data), "format": fmt, **extra}


def chat(*parts: dict[str, Any], text: str = "What is this?", **extra: Any) -> dict[str, Any]:
    """A one-message request: the parts and then the question."""
    content: Any = [*parts, {"type": "text", "text": text}] if parts else text
    return {**ROOT_PARAMS, "messages": [{"role": "user", "content": content}], **extra}


def conversation(*messages: tuple[str, Any], **extra: Any) -> dict[str, Any]:
    return {**ROOT_PARAMS, "messages": [{"role": r, "content": c} for r, c in messages], **extra}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(side: int = 100_000) -> bytes:
    """A well-formed PNG whose header claims ``side x side`` RGB pixels (one tiny IDAT: it cannot decode)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def npy_header_only(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    """A .npy whose header claims ``shape`` followed by a few bytes of data."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": descr, "fortran_order": False, "shape": shape})
    return out.getvalue() + b"\0" * 12


class _Trap:
    """Unpickling this creates the directory ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def pickled_npy(marker: Path) -> bytes:
    array = np.empty(2, dtype=object)
    array[0], array[1] = _Trap(marker), _Trap(marker)
    out = io.BytesIO()
    np.save(out, array, allow_pickle=True)
    return out.getvalue()


def pickled_npz(marker: Path) -> bytes:
    array = np.empty(1, dtype=object)
    array[0] = _Trap(marker)
    out = io.BytesIO()
    np.savez(out, points=array)
    return out.getvalue()


def pickled_pt(marker: Path) -> bytes:
    out = io.BytesIO()
    torch.save({"points": _Trap(marker)}, out)
    return out.getvalue()


def ply_claiming(vertices: int) -> bytes:
    return (f"ply\nformat ascii 1.0\nelement vertex {vertices}\nproperty float x\nproperty float y\n"
            "property float z\nend_header\n0 0 0\n1 1 1\n").encode()


# ---------------------------------------------------------------- sending and checking
@dataclass
class Case:
    """One request and the error it must get.

    ``body`` is sent as JSON; ``raw`` as the body bytes; ``chunks`` as a chunked body; ``wire`` as the whole
    HTTP request over a raw socket. ``method``/``path`` default to POST
    /v1/chat/completions.
    """

    id: str
    status: int
    body: Any = None
    raw: bytes | None = None
    chunks: list[bytes] | None = None
    wire: bytes | None = None
    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: dict[str, str] = field(default_factory=dict)
    param: Any = ANY
    code: Any = ANY
    type: Any = ANY


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def send(client: httpx.Client, port: int, case: Case) -> Reply:
    if case.wire is not None:
        return send_wire(port, case.wire)
    headers = {"content-type": "application/json", **case.headers}
    if case.raw is not None:
        content: Any = case.raw
    elif case.chunks is not None:
        content = iter(case.chunks)  # no Content-Length: Transfer-Encoding: chunked
    elif case.body is not None:
        content = json.dumps(case.body).encode()
    else:
        content = None
    response = client.request(case.method, case.path, content=content, headers=headers)
    return Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)


def send_wire(port: int, request: bytes, timeout: float = 30) -> Reply:
    """Send raw bytes and read the first HTTP response (the server's reply may come before the whole body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:]))
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return Reply(int(lines[0].split()[1]), headers, body[:length])


def error_problems(reply: Reply, status: int, param: Any = ANY, code: Any = ANY, type: Any = ANY) -> list[str]:
    """What is wrong with ``reply`` as the OpenAI error ``status`` (empty: nothing)."""
    problems = []
    if reply.status != status:
        problems.append(f"status {reply.status}, expected {status}")
    if not reply.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"content-type {reply.headers.get('content-type')!r}")
    if b"Traceback" in reply.body or b'File "' in reply.body:
        problems.append("a traceback in the body")
    try:
        error = json.loads(reply.body)["error"]
        assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    except Exception:
        return [*problems, f"not OpenAI's error shape: {reply.body[:300]!r}"]
    message = error["message"]
    if not (isinstance(message, str) and message.strip() and "\n" not in message):
        problems.append(f"message {message!r} is not a non-empty line")
    if not (isinstance(error["type"], str) and error["type"]):
        problems.append(f"type {error['type']!r}")
    for name, expected in (("param", param), ("code", code), ("type", type)):
        if expected is not ANY and error[name] != expected:
            problems.append(f"{name} {error[name]!r}, expected {expected!r}")
    return [f"{p} (message: {message!r})" for p in problems] if problems else []


def run_cases(live: Any, cases: list[Case], client: httpx.Client) -> None:
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    failures = []
    for case in cases:
        try:
            reply = send(client, live.port, case)
        except Exception as e:
            failures.append(f"{case.id}: the request failed: {type(e).__name__}: {e}")
            continue
        failures += [f"{case.id}: {p}" for p in error_problems(reply, case.status, case.param, case.code, case.type)]
    assert not failures, "\n".join(failures)


def connect(live: Any, **options: Any) -> httpx.Client:
    """A client of ``live`` opening a fresh connection per request, so that every case stands alone."""
    return httpx.Client(base_url=live.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0), **options)


def answer(client: httpx.Client, body: dict[str, Any]) -> str:
    """POST a valid request; its answer text (asserting 200 and a well-formed completion)."""
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    text = completion["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text.strip(), completion
    return text


VALID = {"model": "imagebind-llm", "max_tokens": 6, "temperature": 0,
         "messages": [{"role": "user", "content": "Say hello."}]}


# ---------------------------------------------------------------- the main table
MAX_BODY = 1 * MiB


def main_cases(tmp: Path) -> list[Case]:
    girl = (MEDIA / "girl.jpg").read_bytes()
    girl_url = data_url(girl, "image/jpeg")
    bomb = png_bomb()
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    small_wav = wav_bytes(8000)
    part0 = "messages[0].content[0]"
    big = "x" * (MAX_BODY + MAX_BODY // 2)
    valid_json = json.dumps(VALID).encode()
    wire_head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n")
    return [
        # -- the body itself
        Case("not-json", 400, raw=b"{this is not json"),
        Case("json-array", 400, raw=b'[{"role": "user", "content": "hi"}]'),
        Case("json-string", 400, raw=b'"hello"'),
        Case("not-utf8", 400, raw=b"\xff\xfe\xfd\x00{"),
        Case("empty-body", 400, raw=b""),
        Case("deeply-nested-json", 400, raw=b"[" * 200_000 + b"]" * 200_000),
        Case("integer-of-5000-digits", 400,
             raw=json.dumps(VALID).encode()[:-1] + b', "seed": 1' + b"0" * 5000 + b"}"),
        Case("oversize-body", 413, raw=json.dumps({**VALID, "pad": big}).encode(), code="too_large"),
        Case("oversize-chunked-body", 413, chunks=[b'{"pad": "'] + [b"x" * 65536] * 24 + [b'"}'], code="too_large"),
        Case("lying-content-length-huge", 413, code="too_large",
             wire=(wire_head + f"content-length: {10 ** 12}\r\n\r\n").encode() + valid_json),
        Case("lying-content-length-short", 400,
             wire=(wire_head + "content-length: 7\r\nconnection: close\r\n\r\n").encode() + valid_json),
        # -- messages
        Case("no-messages", 400, body={"model": "imagebind-llm"}, param="messages"),
        Case("empty-messages", 400, body={**VALID, "messages": []}, param="messages"),
        Case("messages-not-a-list", 400, body={**VALID, "messages": {"role": "user", "content": "hi"}},
             param="messages"),
        Case("message-not-an-object", 400, body={**VALID, "messages": ["hi"]}, param="messages[0]"),
        Case("unknown-role", 400, body=conversation(("tool", "hi")), param="messages[0].role"),
        Case("last-message-from-assistant", 400, body=conversation(("user", "hi"), ("assistant", "hello")),
             param="messages[1].role"),
        Case("second-system-message", 400,
             body=conversation(("system", "a"), ("user", "hi"), ("system", "b"), ("user", "hi")),
             param="messages[2].role"),
        Case("content-a-number", 400, body=conversation(("user", 42)), param="messages[0].content"),
        Case("content-null-from-user", 400, body=conversation(("user", None)), param="messages[0].content"),
        Case("text-part-without-text", 400, body=conversation(("user", [{"type": "text", "text": 7}])),
             param=f"{part0}.text"),
        Case("part-not-an-object", 400, body=conversation(("user", ["hi"])), param=part0),
        Case("unknown-part-type", 400, body=chat({"type": "image_file", "image_file": {"file_id": "x"}}),
             param=f"{part0}.type", code="unsupported_media"),
        Case("part-without-type", 400, body=chat({"image_url": {"url": girl_url}}), param=f"{part0}.type",
             code="unsupported_media"),
        Case("media-in-assistant-message", 400,
             body=conversation(("user", "hi"), ("assistant", [image_part(girl_url)]), ("user", "and?")),
             param="messages[1].content[0].type"),
        Case("unknown-modality", 400, body=chat({"type": "input_media", "modality": "smell", "data": "AAAA"}),
             param=f"{part0}.modality", code="unsupported_media"),
        Case("text-modality-without-text", 400, body=chat({"type": "input_media", "modality": "text"}),
             param=f"{part0}.text"),
        Case("input-media-without-data", 400, body=chat({"type": "input_media", "modality": "depth"}),
             param=f"{part0}.data"),
        Case("image-url-without-url", 400, body=chat({"type": "image_url", "image_url": {}}),
             param=f"{part0}.image_url.url"),
        Case("input-audio-without-data", 400, body=chat({"type": "input_audio", "input_audio": {"format": "wav"}}),
             param=f"{part0}.input_audio.data"),
        # -- media sources
        Case("truncated-base64-image", 400, body=chat(image_part(girl_url[:-3])), param=part0,
             code="invalid_media"),
        Case("not-base64-at-all", 400, body=chat(image_part("data:image/jpeg;base64,@@@@ not base64 @@@@")),
             param=part0, code="invalid_media"),
        Case("empty-base64", 400, body=chat({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}),
             param=part0, code="invalid_media"),
        Case("data-url-not-base64", 400, body=chat(image_part("data:image/png,rawpixels")), param=part0),
        Case("random-bytes-as-image", 400, body=chat(image_part(data_url(noise, "image/png"))), param=part0,
             code="invalid_media"),
        Case("random-bytes-as-audio", 400,
             body=chat({"type": "input_audio", "input_audio": {"data": b64(noise), "format": "wav"}}), param=part0,
             code="invalid_media"),
        Case("random-bytes-as-video", 400, body=chat({"type": "video_url", "video_url": {"url": data_url(
            noise, "video/mp4")}}), param=part0, code="invalid_media"),
        Case("random-bytes-as-point-cloud", 400, body=chat(media_part("point", noise, "ply")), param=part0,
             code="invalid_media"),
        Case("truncated-jpeg", 400, body=chat(image_part(data_url(girl[:len(girl) // 3], "image/jpeg"))),
             param=part0, code="invalid_media"),
        Case("http-url-not-allowed", 400, body=chat(image_part("http://127.0.0.1:9/girl.jpg")), param=part0,
             code="remote_media_not_allowed"),
        Case("https-url-not-allowed", 400, body=chat(image_part("https://example.com/girl.jpg")), param=part0,
             code="remote_media_not_allowed"),
        Case("file-url", 400, body=chat(image_part("file:///etc/passwd")), param=part0, code="unsupported_media"),
        Case("bare-absolute-path", 400, body=chat(image_part("/etc/passwd")), param=part0,
             code="unsupported_media"),
        Case("bare-relative-path", 400, body=chat(image_part(str(MEDIA / "girl.jpg"))), param=part0,
             code="unsupported_media"),
        Case("ftp-url", 400, body=chat({"type": "audio_url", "audio_url": {"url": "ftp://127.0.0.1/a.wav"}}),
             param=part0, code="unsupported_media"),
        # -- media over the limits (refused from their headers)
        Case("png-bomb-100000x100000", 413, body=chat(image_part(data_url(bomb, "image/png"))), param=part0,
             code="too_large"),
        Case("png-bomb-as-depth", 413, body=chat(media_part("depth", bomb, "png")), param=part0, code="too_large"),
        Case("png-bomb-as-thermal", 413, body=chat(media_part("thermal", bomb, "png")), param=part0,
             code="too_large"),
        Case("png-7000x7000-over-max-pixels", 413, body=chat(image_part(data_url(png_bomb(7000), "image/png"))),
             param=part0, code="too_large"),
        Case("wav-longer-than-limit", 413,
             body=chat({"type": "input_audio", "input_audio": {"data": b64(wav_bytes(32000)), "format": "wav"}}),
             param=part0, code="too_large"),
        Case("video-longer-than-limit", 413, body=chat({"type": "video_url", "video_url": {"url": data_url(
            (MEDIA / "synthetic_landscape.mp4").read_bytes(), "video/mp4")}}), param=part0, code="too_large"),
        Case("npy-huge-claimed-shape", 413, body=chat(media_part("point", npy_header_only((10 ** 9, 3)), "npy")),
             param=part0, code="too_large"),
        Case("npy-huge-claimed-depth", 413,
             body=chat(media_part("depth", npy_header_only((100_000, 100_000)), "npy")), param=part0,
             code="too_large"),
        Case("ply-huge-claimed-vertex-count", 413, body=chat(media_part("point", ply_claiming(10 ** 9), "ply")),
             param=part0, code="too_large"),
        Case("npy-object-dtype-pickle", 400, body=chat(media_part("point", pickled_npy(tmp / "npy-pwned"), "npy")),
             param=part0, code="invalid_media"),
        Case("npy-object-dtype-as-imu", 400, body=chat(media_part("imu", pickled_npy(tmp / "imu-pwned"), "npy")),
             param=part0, code="invalid_media"),
        Case("npz-object-dtype-pickle", 400, body=chat(media_part("point", pickled_npz(tmp / "npz-pwned"), "npy")),
             param=part0, code="invalid_media"),
        Case("pt-with-pickled-object", 400, body=chat(media_part("point", pickled_pt(tmp / "pt-pwned"), "pt")),
             param=part0, code="invalid_media"),
        Case("too-many-media-items", 413, body=chat(
            image_part(girl_url), {"type": "input_audio", "input_audio": {"data": b64(small_wav), "format": "wav"}},
            {"type": "input_media", "modality": "text", "text": "a dog"}), param="messages", code="too_large"),
        Case("two-image-parts", 400, body=chat(image_part(girl_url), image_part(girl_url)),
             param="messages[0].content[1]"),
        Case("two-audio-parts-of-two-kinds", 400, body=chat(
            {"type": "input_audio", "input_audio": {"data": b64(small_wav), "format": "wav"}},
            {"type": "audio_url", "audio_url": {"url": data_url(small_wav, "audio/wav")}}),
            param="messages[0].content[1]"),
        Case("media-weight-negative", 400, body=chat(image_part(girl_url, weight=-1)), param=f"{part0}.weight"),
        Case("media-weight-string", 400, body=chat(image_part(girl_url, weight="abc")), param=f"{part0}.weight"),
        Case("media-weight-bool", 400, body=chat(image_part(girl_url, weight=True)), param=f"{part0}.weight"),
        Case("media-weight-400-digit-integer", 400, body=chat(image_part(girl_url, weight=10 ** 400)),
             param=f"{part0}.weight"),
        # -- generation options
        Case("n-2", 400, body={**VALID, "n": 2}, param="n"),
        Case("n-2-streaming", 400, body={**VALID, "n": 2, "stream": True}, param="n"),
        Case("max-tokens-negative", 400, body={**VALID, "max_tokens": -5}, param="max_tokens"),
        Case("max-tokens-zero", 400, body={**VALID, "max_tokens": 0}, param="max_tokens"),
        Case("max-tokens-string", 400, body={**VALID, "max_tokens": "10"}, param="max_tokens"),
        Case("max-tokens-float", 400, body={**VALID, "max_tokens": 2.5}, param="max_tokens"),
        Case("max-completion-tokens-zero", 400, body={**VALID, "max_completion_tokens": 0},
             param="max_completion_tokens"),
        Case("max-tokens-negative-beside-null-max-completion-tokens", 400,
             body={**VALID, "max_completion_tokens": None, "max_tokens": -1}, param="max_tokens"),
        Case("temperature-nan", 400, raw=json.dumps(VALID).encode()[:-1] + b', "temperature": NaN}',
             param="temperature"),
        Case("temperature-infinity", 400, raw=json.dumps(VALID).encode()[:-1] + b', "temperature": Infinity}',
             param="temperature"),
        Case("temperature-5", 400, body={**VALID, "temperature": 5}, param="temperature"),
        Case("temperature-negative", 400, body={**VALID, "temperature": -0.5}, param="temperature"),
        Case("temperature-bool", 400, body={**VALID, "temperature": True}, param="temperature"),
        Case("temperature-400-digit-integer", 400, body={**VALID, "temperature": 10 ** 400}, param="temperature"),
        Case("top-p-0", 400, body={**VALID, "top_p": 0}, param="top_p"),
        Case("top-p-1.5", 400, body={**VALID, "top_p": 1.5}, param="top_p"),
        Case("top-p-string", 400, body={**VALID, "top_p": "0.5"}, param="top_p"),
        Case("seed-string", 400, body={**VALID, "seed": "abc"}, param="seed"),
        Case("seed-2**64", 400, body={**VALID, "seed": 2 ** 64}, param="seed"),
        Case("stop-5-strings", 400, body={**VALID, "stop": ["a", "b", "c", "d", "e"]}, param="stop"),
        Case("stop-not-strings", 400, body={**VALID, "stop": [1, 2]}, param="stop"),
        Case("stream-not-bool", 400, body={**VALID, "stream": "yes"}, param="stream"),
        Case("stream-options-not-object", 400, body={**VALID, "stream": True, "stream_options": "usage"},
             param="stream_options"),
        Case("model-not-string", 400, body={**VALID, "model": 5}, param="model"),
        Case("cache-unknown-setting", 400, body={**VALID, "cache": {"top_k": 3, "radius": 2}}, param="cache"),
        Case("cache-weight-2", 400, body={**VALID, "cache": {"weight": 2}}, param="cache"),
        Case("cache-top-k-zero", 400, body={**VALID, "cache": {"top_k": 0}}, param="cache"),
        Case("cache-temperature-string", 400, body={**VALID, "cache": {"temperature": "hot"}}, param="cache"),
        Case("cache-temperature-400-digit-integer", 400, body={**VALID, "cache": {"temperature": 10 ** 400}},
             param="cache"),
        Case("cache-not-object", 400, body={**VALID, "cache": [1]}, param="cache"),
        Case("prompt-over-the-context", 400,
             body={**VALID, "messages": [{"role": "user", "content": "elephant " * 1500}]}, param="messages",
             code="context_length_exceeded"),
        Case("prompt-over-the-context-streaming", 400, body={**VALID, "stream": True, "messages": [
            {"role": "user", "content": "elephant " * 1500}]}, param="messages", code="context_length_exceeded"),
        # -- routes
        Case("unknown-path", 404, method="GET", path="/v1/nope", type="not_found_error"),
        Case("unknown-path-post", 404, path="/v1/completions/extra", body=VALID, type="not_found_error"),
        Case("wrong-method", 405, method="GET"),
    ]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(start_server, tmp_path, monkeypatch):
    from PIL import ImageFile

    decoded_sizes = []  # the size of every image Pillow decodes while the cases run
    pillow_load = ImageFile.ImageFile.load

    def load(self: Any) -> Any:
        decoded_sizes.append(self.size)
        return pillow_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    live = start_server(max_body_bytes=MAX_BODY, max_media_items=2, media=MediaLimits(max_seconds=1.0))
    cases = main_cases(tmp_path)
    assert len(cases) >= 25
    with connect(live) as client:
        run_cases(live, cases, client)
        assert "POST" in client.get("/v1/chat/completions").headers.get("allow", "")  # the 405 keeps its Allow
        # the server keeps serving: a text request, and one with an image, a clip under the limit and weights
        assert answer(client, {**VALID, "n": None})
        girl = data_url((MEDIA / "girl.jpg").read_bytes(), "image/jpeg")
        assert answer(client, chat(image_part(girl, weight=0.5), {"type": "input_audio", "input_audio": {
            "data": b64(wav_bytes(8000)), "format": "wav"}}, max_tokens=6))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith("pwned")], "a pickle in a request was unpickled"
    assert all(w * h <= 40_000_000 for w, h in decoded_sizes), f"an image bomb reached the decoder: {decoded_sizes}"


# ---------------------------------------------------------------- API key
def test_api_key_is_required_and_checked(start_server):
    live = start_server(api_key="k")
    auth = {"type": "authentication_error", "code": "invalid_api_key", "param": None}
    cases = [
        Case("no-key", 401, body=VALID, **auth),
        Case("wrong-key", 401, body=VALID, headers={"authorization": "Bearer kk"}, **auth),
        Case("scheme-without-key", 401, body=VALID, headers={"authorization": "Bearer"}, **auth),
        Case("not-bearer", 401, body=VALID, headers={"authorization": "Basic k"}, **auth),
        Case("bare-key", 401, body=VALID, headers={"authorization": "k"}, **auth),
        Case("models-without-key", 401, method="GET", path="/v1/models", **auth),
        Case("metrics-without-key", 401, method="GET", path="/metrics", **auth),
        Case("unknown-path-without-key", 401, method="GET", path="/v1/nope", **auth),
        Case("unknown-path-with-key", 404, method="GET", path="/v1/nope", headers={"authorization": "Bearer k"},
             type="not_found_error"),
        Case("bad-body-with-key", 400, raw=b"nope", headers={"authorization": "Bearer k"}),
    ]
    with connect(live) as client:
        run_cases(live, cases, client)
        assert client.get("/health").status_code == 200  # not protected: load balancers probe it
    with connect(live, headers={"authorization": "Bearer k"}) as client:
        assert client.get("/v1/models").status_code == 200
        assert answer(client, VALID)


# ---------------------------------------------------------------- queue full
def test_queue_full_is_429_with_retry_after(start_server, seeing_demo):
    from imagebind_llm.engine import Engine

    engine = Engine(seeing_demo, max_batch=1, max_queue=0, max_context=512)  # one request: the free row
    live = start_server(engine=engine)
    with connect(live) as client, \
            connect(live) as other:
        results: list[Any] = []
        with engine.lock:  # the engine cannot admit: the first request waits, filling the queue
            first = threading.Thread(target=lambda: results.append(other.post("/v1/chat/completions", json=VALID)))
            first.start()
            deadline = time.monotonic() + 60
            while engine.waiting < 1:
                assert time.monotonic() < deadline and first.is_alive(), results
                time.sleep(0.01)
            reply = send(client, live.port, Case("queue-full", 429, body=VALID))
        assert not error_problems(reply, 429, None, "queue_full", "rate_limit_error"), reply
        assert int(reply.headers["retry-after"]) >= 1
        first.join(timeout=120)
        assert results and results[0].status_code == 200, results
        assert answer(client, VALID)


# ---------------------------------------------------------------- remote media from an allowed host
class _MediaHandler(http.server.BaseHTTPRequestHandler):
    girl = (MEDIA / "girl.jpg").read_bytes()

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/girl.jpg":
            self._send(200, self.girl, "image/jpeg")
        elif self.path == "/big.jpg":  # announced over the limit
            self._send(200, b"\xff\xd8" + b"\0" * 300_000, "image/jpeg")
        elif self.path == "/big-unannounced.jpg":  # no Content-Length: counted while it streams
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\0" * 10_000)
        elif self.path == "/redirect.jpg":
            self.send_response(302)
            self.send_header("Location", "/girl.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/noise.jpg":
            self._send(200, bytes(range(256)) * 8, "image/jpeg")
        else:
            self._send(404, b"not here", "text/plain")

    def _send(self, status: int, data: bytes, media_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def media_host():
    """A loopback HTTP server of media files: its ``http://127.0.0.1:PORT``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MediaHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_remote_media_from_an_allowed_host(start_server, media_host):
    live = start_server(media=MediaLimits(allowed_hosts=frozenset({"127.0.0.1"}), max_bytes=100_000,
                                          fetch_timeout=10))
    part0 = "messages[0].content[0]"
    port = media_host.rpartition(":")[2]
    cases = [
        Case("remote-over-max-bytes", 413, body=chat(image_part(f"{media_host}/big.jpg")), param=part0,
             code="too_large"),
        Case("remote-over-max-bytes-unannounced", 413, body=chat(image_part(f"{media_host}/big-unannounced.jpg")),
             param=part0, code="too_large"),
        Case("remote-redirect", 400, body=chat(image_part(f"{media_host}/redirect.jpg")), param=part0,
             code="media_fetch_failed"),
        Case("remote-404", 400, body=chat(image_part(f"{media_host}/missing.jpg")), param=part0,
             code="media_fetch_failed"),
        Case("remote-corrupt", 400, body=chat(image_part(f"{media_host}/noise.jpg")), param=part0,
             code="invalid_media"),
        Case("remote-host-by-another-name", 400, body=chat(image_part(f"http://localhost:{port}/girl.jpg")),
             param=part0, code="remote_media_not_allowed"),
        Case("remote-closed-port", 400, body=chat(image_part("http://127.0.0.1:9/girl.jpg")), param=part0,
             code="media_fetch_failed"),
    ]
    with connect(live) as client:
        run_cases(live, cases, client)
        assert answer(client, chat(image_part(f"{media_host}/girl.jpg"), max_tokens=6))


# ---------------------------------------------------------------- loading, failed loading, internal errors
def _asgi_post(app: Any, body: dict[str, Any]) -> Reply:
    async def post() -> Reply:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/chat/completions", json=body)
        return Reply(response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content)

    return asyncio.run(post())


def test_loading_is_503_and_internal_errors_are_500_without_details():
    from imagebind_llm.serve.app import create_app
    from imagebind_llm.serve.config import ServeConfig
    from imagebind_llm.serve.service import Service

    def never() -> Any:
        raise AssertionError("not started")

    service = Service(ServeConfig(ui=False), load=never)  # not started: the model is "loading"
    try:
        app = create_app(service)
        reply = _asgi_post(app, VALID)
        assert not error_problems(reply, 503, None, "model_loading"), reply
        assert int(reply.headers["retry-after"]) >= 1
        service.load_error = RuntimeError("no such weights file")
        reply = _asgi_post(app, VALID)
        assert not error_problems(reply, 503, None, "model_load_failed"), reply
    finally:
        service.close()

    class Broken(Service):
        @property
        def engine(self) -> Any:
            raise ZeroDivisionError("secret detail in /srv/weights")

    broken = Broken(ServeConfig(ui=False), load=never)
    try:
        reply = _asgi_post(create_app(broken), VALID)
        assert not error_problems(reply, 500, None, "internal_error", "server_error"), reply
        assert b"ZeroDivisionError" not in reply.body and b"secret" not in reply.body
    finally:
        broken.close()


def test_case_builders_are_what_they_claim():
    """The hand-built media are what the cases say: the PNG bomb's header parses (CRCs right) as 100000^2."""
    from PIL import Image

    with Image.open(io.BytesIO(png_bomb(7000))) as image:
        assert image.size == (7000, 7000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(png_bomb()))
    assert math.isclose(len(wav_bytes(32000)) / 32_000, 2.0, abs_tol=0.01)
    with pytest.raises(ValueError):
        np.load(io.BytesIO(pickled_npy(Path("/nonexistent/never"))), allow_pickle=False)


def test_errors_raised_inside_the_engine_are_the_clients_400s(start_server, monkeypatch):
    """A user error that only shows once the engine runs the request (here: the media mix refusing) is a 400
    in the OpenAI shape, whole or streamed, never a 500."""
    live = start_server()
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
        (MEDIA / "girl.jpg").read_bytes()).decode()}}
    zero = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [{**image, "weight": 0},
                                                                                      {"type": "text", "text": "Hi"}]}]}
    with httpx.Client(timeout=60) as client:
        refused = client.post(live.url + "/v1/chat/completions", json=zero)
        assert refused.status_code == 400 and "weights are 0" in refused.json()["error"]["message"]
        engine = live.service.engine
        monkeypatch.setattr(engine.model, "mix_requests", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad mix")))
        body = {**zero, "messages": [{"role": "user", "content": [image, {"type": "text", "text": "Hi"}]}]}
        whole = client.post(live.url + "/v1/chat/completions", json=body)
        assert whole.status_code == 400 and whole.json()["error"]["message"] == "bad mix"
        streamed = client.post(live.url + "/v1/chat/completions", json={**body, "stream": True}).text
        assert '"bad mix"' in streamed and '"invalid_request_error"' in streamed
