"""``POST /v1/images/generations``: OpenAI's image-generation shape, with our media extension.

Body (OpenAI's fields, then ours)::

    {"prompt": "a painting", "n": 1, "size": "768x768", "response_format": "b64_json",
     "media": [{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}, "weight": 0.6},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}, "weight": 0.4}],
     "cache": {"top_k": 10, "temperature": 20, "weight": 0.5},
     "seed": 0, "negative_prompt": "...", "num_inference_steps": 20, "guidance_scale": 10, "noise_level": 0}

``media`` holds content parts as in chat messages (``image_url``, ``input_audio``, ``video_url``, ``audio_url``,
``input_media``), one per modality, each with an optional ``weight``. The answer is
``{"created", "data": [{"b64_json": PNG}], "output_format": "png", "size"}``. Only ``b64_json`` is returned.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse

from imagebind_llm.apps.unclip import POINT_SCALE, PipelineMissingError, UnCLIP, image_embedding
from imagebind_llm.engine import Request
from imagebind_llm.serve.protocol import APIError, bad_request, finite, parse_blend, parse_media_part, read_json, too_large
from imagebind_llm.serve.service import Service

MAX_IMAGES = 4
MAX_STEPS = 200
MAX_SIDE = 2048


def add_image_routes(app: FastAPI, service: Service, unclip: UnCLIP | None = None) -> None:
    """Add ``POST /v1/images/generations`` to ``app``; the pipeline is ``unclip``, else ``service.unclip`` (set it
    before the first request); without one the endpoint answers 404 saying how to enable it."""
    @app.post("/v1/images/generations")
    async def image_generations(request: HTTPRequest) -> JSONResponse:
        pipeline = unclip or getattr(service, "unclip", None)
        if pipeline is None:
            raise APIError(404, "this server does not generate images: start it with --unclip (a Stable unCLIP "
                                "pipeline folder or stabilityai/stable-diffusion-2-1-unclip) and the images extra",
                           type="invalid_request_error", code="images_disabled")
        body = await read_json(request, service.config.max_body_bytes)
        parsed = parse_image_request(body, max_media_items=service.config.max_media_items)
        engine = service.engine  # 503 while loading
        tensors = await service.decode(parsed["media"])
        parts = [{"type": p.modality, p.modality: t, "weight": p.weight} for p, t in zip(parsed["media"], tensors)]
        engine_request = Request(messages=[{"role": "user", "content": parts}], blend=parsed["blend"])
        try:
            embeds = await asyncio.to_thread(image_embedding, engine, engine_request, point_scale=parsed["point_scale"])
            images = await asyncio.to_thread(pipeline.generate, embeds, parsed["prompt"], **parsed["options"])
        except PipelineMissingError as e:
            raise APIError(503, str(e), type="server_error", code="images_unavailable") from None
        except ValueError as e:
            raise bad_request(str(e), "media") from None
        data = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data.append({"b64_json": base64.b64encode(buffer.getvalue()).decode("ascii")})
        width, height = images[0].size
        return JSONResponse({"created": int(time.time()), "data": data, "output_format": "png",
                             "size": f"{width}x{height}"})



def parse_image_request(body: Any, *, max_media_items: int) -> dict[str, Any]:
    """Check a ``/v1/images/generations`` body; media stay undecoded.

    Returns:
        ``{"prompt", "media": [MediaPart], "blend": BlendOptions, "point_scale", "options": UnCLIP.generate kwargs}``.

    Raises:
        APIError: 400 naming the field; 413 for too many media items.
    """
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad_request(f"'prompt' must be a string, got {prompt!r}", "prompt")
    raw = body.get("media")
    if not isinstance(raw, list) or not raw:
        raise bad_request("'media' must be a non-empty list of content parts (image_url, input_audio, video_url, "
                          "audio_url, input_media), each with an optional 'weight'", "media")
    if len(raw) > max_media_items:
        raise too_large(f"the request has {len(raw)} media parts; this server takes at most {max_media_items}", "media")
    media, seen = [], {}
    for i, part in enumerate(raw):
        where = f"media[{i}]"
        if not isinstance(part, Mapping):
            raise bad_request("each media part must be an object with a 'type'", where)
        parsed = parse_media_part(part, where)
        if parsed.modality in seen:
            raise bad_request(f"{where} is a second {parsed.modality} input (the first is {seen[parsed.modality]}); "
                              "send one per modality", where)
        seen[parsed.modality] = where
        media.append(parsed)
    response_format = body.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise bad_request(f"response_format {response_format!r} is not supported; use 'b64_json'", "response_format")
    options: dict[str, Any] = {"num_images": _whole(body, "n", 1, 1, MAX_IMAGES)}
    size = body.get("size")
    if size is not None and size != "auto":
        width, _, height = str(size).partition("x") if isinstance(size, str) else ("", "", "")
        if not (width.isdigit() and height.isdigit() and 8 <= int(width) <= MAX_SIDE and 8 <= int(height) <= MAX_SIDE
                and int(width) % 8 == 0 and int(height) % 8 == 0):
            raise bad_request(f"'size' must be 'WIDTHxHEIGHT' in multiples of 8 up to {MAX_SIDE} (e.g. '768x768') "
                              f"or 'auto', got {size!r}", "size")
        options.update(width=int(width), height=int(height))
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not -(2 ** 63) <= seed < 2 ** 64:
            raise bad_request(f"'seed' must be a whole number in [-2**63, 2**64), got {seed!r}", "seed")
        options["seed"] = seed
    negative = body.get("negative_prompt")
    if negative is not None:
        if not isinstance(negative, str):
            raise bad_request(f"'negative_prompt' must be a string, got {negative!r}", "negative_prompt")
        options["negative_prompt"] = negative
    options["num_inference_steps"] = _whole(body, "num_inference_steps", 20, 1, MAX_STEPS)
    options["noise_level"] = _whole(body, "noise_level", 0, 0, 999)
    options["guidance_scale"] = _number(body, "guidance_scale", 10.0, 0.0, 50.0)
    point_scale = _number(body, "point_scale", POINT_SCALE, 1e-6, 1e6)
    return {"prompt": prompt, "media": media, "blend": parse_blend(body), "point_scale": point_scale, "options": options}


def _whole(body: Mapping[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise bad_request(f"'{name}' must be a whole number in [{low}, {high}], got {value!r}", name)
    return value


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and finite(value)
    if not ok or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number in [{low}, {high}], got {value!r}", name)
    return float(value)
