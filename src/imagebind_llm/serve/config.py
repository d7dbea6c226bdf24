"""The server's settings: what one media item may be (`MediaLimits`) and how the server behaves (`ServeConfig`).
Light to import: the command line builds them before any server library is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1 << 20


@dataclass(frozen=True)
class MediaLimits:
    """What one media item may be.

    Attributes:
        max_bytes: encoded size of one item.
        max_pixels: width x height of an image, depth or thermal map (video frames are bounded by max_bytes).
        max_seconds: duration of an audio or video clip.
        max_points: points in a point cloud.
        allowed_hosts: hosts whose http(s) URLs may be fetched; empty: no remote media.
        fetch_timeout: seconds to connect and between bytes when fetching a URL.
    """

    max_bytes: int = 20 * MiB
    max_pixels: int = 40_000_000
    max_seconds: float = 600.0
    max_points: int = 500_000
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    fetch_timeout: float = 10.0


@dataclass(frozen=True)
class ServeConfig:
    """How the server behaves.

    Attributes:
        model_id: the name `/v1/models` reports and responses carry.
        api_key: when set, `/v1/*`, `/metrics` and the UI need ``Authorization: Bearer <key>`` (UI: the key as
            password).
        max_body_bytes: request body size, enforced while the body is read.
        max_media_items: media parts in one request.
        media: limits of each media item (`MediaLimits`).
        media_workers: threads decoding media.
        ui: serve the gradio web UI at ``/ui`` (needs the ``ui`` extra).
    """

    model_id: str = "imagebind-llm"
    api_key: str | None = None
    max_body_bytes: int = 32 * MiB
    max_media_items: int = 8
    media: MediaLimits = field(default_factory=MediaLimits)
    media_workers: int = 2
    ui: bool = True
