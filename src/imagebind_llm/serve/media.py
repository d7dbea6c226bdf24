"""Media parts of a request -> tensors, under the server's limits, checked while reading.

Sizes are checked before anything is decoded: base64 text by its length, remote files by their
``Content-Length`` and then byte by byte while they stream in, images by the pixel count in their header
(decompression bombs never reach the decoder), audio and video by the duration in their container, arrays
and point clouds by the shape in their header. Sources are always bytes: no request can name a path.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import urllib.parse

import numpy as np
import torch
from PIL import Image

from imagebind_llm.engine import modality
from imagebind_llm.preprocess.errors import MediaError
from imagebind_llm.serve.config import MiB, MediaLimits
from imagebind_llm.serve.protocol import APIError, MediaPart, bad_request, too_large

_SUBTYPES = {"jpeg": "jpg", "mpeg": "mp3", "wave": "wav", "vnd.wave": "wav", "quicktime": "mov", "x-matroska": "mkv"}
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def decode_part(part: MediaPart, limits: MediaLimits) -> torch.Tensor:
    """One media part -> its preprocessed tensor ``[1, ...]``.

    Raises:
        APIError: 400 for malformed or undecodable media and URLs that may not be fetched, 413 over a limit.
    """
    entry = modality(part.modality)
    if not entry.is_file:
        return entry.load([part.data])
    data, fmt = payload(part, limits)
    check_size(part, data, fmt, limits)
    source = io.BytesIO(data)
    source.name = f"{part.param}.{fmt}" if fmt else part.param  # loaders read the suffix for the format
    try:
        return entry.load([source])
    except MediaError as e:
        raise bad_request(f"{part.param}: cannot read the {part.modality}: {e.problem}", part.param,
                          "invalid_media") from None


def payload(part: MediaPart, limits: MediaLimits) -> tuple[bytes, str | None]:
    """The part's bytes and file format (``wav``, ``png``; None when unknown)."""
    if part.data is not None:
        return b64decode(part.data, part.param, limits.max_bytes), _format(part.format)
    url = part.url or ""
    if url[:5].lower() == "data:":
        match = _DATA_URL.match(url)
        if not match or not match["b64"]:
            raise bad_request("a data URL must look like data:<type>;base64,<data>", part.param)
        media_type = (match["type"] or "").lower()
        fmt = _format(part.format) or _format(media_type.partition("/")[2])
        return b64decode(url[match.end():], part.param, limits.max_bytes), fmt
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        return fetch(url, part.param, limits)
    raise bad_request(f"unsupported URL scheme {scheme or url[:16]!r}: send a data: URL (base64) or an http(s) URL; "
                      "local paths are never read", part.param, "unsupported_media")


def _format(name: str | None) -> str | None:
    if not name:
        return None
    name = name.lower().strip(". ")
    name = _SUBTYPES.get(name, name.removeprefix("x-"))
    return name if name.isalnum() and name != "octet-stream" else None


def b64decode(text: str, param: str, max_bytes: int) -> bytes:
    """Base64 text -> bytes; the size is checked from the text's length before decoding."""
    if len(text) // 4 * 3 > max_bytes + 3:
        raise too_large(f"{param} is about {len(text) * 3 // 4 / MiB:.1f} MiB; the limit is {max_bytes / MiB:.1f} MiB",
                        param)
    try:
        data = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} is not valid base64 (truncated or not base64-encoded?)", param,
                          "invalid_media") from None
    if not data:
        raise bad_request(f"{param} is empty", param, "invalid_media")
    return data


def fetch(url: str, param: str, limits: MediaLimits) -> tuple[bytes, str | None]:
    """GET an allowed http(s) URL: no redirects, a timeout, and the size checked while the body arrives."""
    import httpx

    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host not in limits.allowed_hosts:
        raise bad_request(f"remote media from {host or url!r} are not allowed on this server; send the file as a data: "
                          "URL (base64), or start the server with --allow-remote-media naming the host", param,
                          "remote_media_not_allowed")
    try:
        with httpx.Client(timeout=limits.fetch_timeout, follow_redirects=False) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise bad_request(f"fetching {url} gave HTTP {response.status_code}", param, "media_fetch_failed")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise too_large(f"{url} is {int(declared) / MiB:.1f} MiB; the limit is {limits.max_bytes / MiB:.1f} MiB",
                                param)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_bytes:
                    raise too_large(f"{url} is over the {limits.max_bytes / MiB:.1f} MiB limit", param)
                chunks.append(chunk)
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
    except httpx.HTTPError as e:
        raise bad_request(f"fetching {url} failed ({type(e).__name__}: {e})", param, "media_fetch_failed") from None
    suffix = urllib.parse.urlsplit(url).path.rpartition(".")[2] if "." in urllib.parse.urlsplit(url).path else None
    return b"".join(chunks), _format(suffix) or _format(media_type.partition("/")[2])


def check_size(part: MediaPart, data: bytes, fmt: str | None, limits: MediaLimits) -> None:
    """Refuse an item over the limits from its header alone (413), before the loader decodes it."""
    if len(data) > limits.max_bytes:
        raise too_large(f"{part.param} is {len(data) / MiB:.1f} MiB; the limit is {limits.max_bytes / MiB:.1f} MiB",
                        part.param)
    if data.startswith(b"\x93NUMPY"):
        _check_array(part, data, limits)
    elif part.modality in ("image", "depth", "thermal"):
        _check_pixels(part, data, limits)
    elif part.modality in ("audio", "video"):
        seconds = _duration(data)
        if seconds is not None and seconds > limits.max_seconds:
            raise too_large(f"{part.param} lasts {seconds:.0f} s; the limit is {limits.max_seconds:.0f} s", part.param)
    elif part.modality == "point" and fmt == "ply":
        vertices = re.search(rb"element vertex (\d+)", data[:4096])
        if vertices and int(vertices[1]) > limits.max_points:
            raise too_large(f"{part.param} has {int(vertices[1])} points; the limit is {limits.max_points}", part.param)


def _check_pixels(part: MediaPart, data: bytes, limits: MediaLimits) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except Image.DecompressionBombError as e:
        raise too_large(f"{part.param}: {e}", part.param) from None
    except Exception:
        return  # not an image Pillow knows: the loader reports it
    if width * height > limits.max_pixels:
        raise too_large(f"{part.param} is {width}x{height} pixels; the limit is {limits.max_pixels:,} pixels", part.param)


def _check_array(part: MediaPart, data: bytes, limits: MediaLimits) -> None:
    try:
        f = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)  # the header only; never unpickles
    except Exception:
        return  # malformed: the loader reports it
    count = math.prod(shape)
    limit = limits.max_points * 3 if part.modality == "point" else limits.max_pixels
    if dtype.hasobject:
        raise bad_request(f"{part.param} is an object array; send numbers (pickled data are never loaded)",
                          part.param, "invalid_media")
    if count > limit:
        raise too_large(f"{part.param} holds {count:,} values of shape {list(shape)}; the limit is {limit:,}",
                        part.param)


def _duration(data: bytes) -> float | None:
    """The clip's duration from its container header, or None when unknown."""
    import av
    import soundfile

    try:
        return soundfile.info(io.BytesIO(data)).duration
    except Exception:
        pass
    try:
        with av.open(io.BytesIO(data)) as container:
            return container.duration / 1e6 if container.duration else None
    except Exception:
        return None


def decode_error(part: MediaPart, error: Exception) -> APIError:
    """An unexpected decoder failure as a 400 naming the part (never a 500 with a traceback)."""
    return bad_request(f"{part.param}: cannot read the {part.modality} ({type(error).__name__})", part.param,
                       "invalid_media")
