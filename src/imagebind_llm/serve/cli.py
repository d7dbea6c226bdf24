"""``imagebind-llm serve`` (the OpenAI-compatible API + the web UI) and ``imagebind-llm web`` (the same, announcing
the UI). The server starts at once and answers 503 until the model has loaded."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

from imagebind_llm.engine.cli import add_model_args, build_engine, default_template, uses_demo
from imagebind_llm.serve.config import MiB, MediaLimits, ServeConfig

API_KEY_ENV = "IMAGEBIND_LLM_API_KEY"


def add_serve_commands(subparsers: argparse._SubParsersAction) -> None:
    """``serve`` and ``web``."""
    for name, help in (("serve", "serve the model over an OpenAI-compatible HTTP API (and the web UI at /ui)"),
                       ("web", "open the web UI (the same server as `serve`; the API stays available)")):
        p = subparsers.add_parser(name, help=help, description=help + ". Binds to 127.0.0.1 unless --host says "
                                  "otherwise. Without model options it serves the embedded demo model.",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_model_args(p)
        p.add_argument("--cache", help="retrieval cache folder (imagebind-llm cache build)")
        p.add_argument("--template", choices=["model", "alpaca", "chatml", "llama2"],
                       help="prompt template (default: alpaca for ImageBind-LLM weights, else the model's own)")
        g = p.add_argument_group("server")
        g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
        g.add_argument("--port", type=int, default=8000)
        g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
        g.add_argument("--model-id", default="imagebind-llm", help="the model name /v1/models reports")
        g.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
        g.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
        g.add_argument("--threads", type=int, help="torch threads (default: torch's; on a small CPU, one core fewer "
                                                   "than it has leaves room for HTTP and media decoding)")
        g.add_argument("--max-context", type=int, help="tokens per request, prompt + answer (default: the model's, "
                                                       "at most 2048)")
        g.add_argument("--no-ui", action="store_true", help="serve the API only")
        g.add_argument("--unclip", metavar="DIR_OR_REPO", help="also make images at /v1/images/generations with this "
                                                               "Stable unCLIP pipeline (a folder, or "
                                                               "stabilityai/stable-diffusion-2-1-unclip: downloaded "
                                                               "into the weights cache); needs the images extra")
        limits = p.add_argument_group("limits")
        limits.add_argument("--max-body-mb", type=float, default=32.0, help="request body size")
        limits.add_argument("--max-media-mb", type=float, default=20.0, help="size of one media item")
        limits.add_argument("--max-media-items", type=int, default=8, help="media parts per request")
        limits.add_argument("--max-image-pixels", type=int, default=MediaLimits.max_pixels, help="image width x height")
        limits.add_argument("--max-media-seconds", type=float, default=MediaLimits.max_seconds,
                            help="audio/video duration")
        limits.add_argument("--allow-remote-media", metavar="HOST[,HOST]", default="",
                            help="hosts whose http(s) media URLs may be fetched (default: none)")
        limits.add_argument("--fetch-timeout", type=float, default=MediaLimits.fetch_timeout,
                            help="seconds for a remote media fetch")
        p.set_defaults(func=run_serve, web=name == "web")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The `ServeConfig` of the command-line options (checked: positive limits)."""
    for name in ("max_body_mb", "max_media_mb", "max_media_items", "max_image_pixels", "max_media_seconds",
                 "fetch_timeout", "max_batch", "max_queue"):
        value = getattr(args, name)
        if not value > 0 and not (name == "max_queue" and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    hosts = frozenset(h.strip().lower() for h in args.allow_remote_media.split(",") if h.strip())
    media = MediaLimits(max_bytes=int(args.max_media_mb * MiB), max_pixels=args.max_image_pixels,
                        max_seconds=args.max_media_seconds, allowed_hosts=hosts, fetch_timeout=args.fetch_timeout)
    return ServeConfig(model_id=args.model_id, api_key=args.api_key or None, max_body_bytes=int(args.max_body_mb * MiB),
                       max_media_items=args.max_media_items, media=media, ui=not args.no_ui)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from imagebind_llm.serve.app import create_app
        from imagebind_llm.serve.service import Service
    except ImportError as e:
        raise ValueError(f"the server needs the 'serve' extra ({e.name} is missing): pip install "
                         "'imagebind-llm[serve]'") from None
    if args.web and args.no_ui:
        raise ValueError("`web` serves the UI: drop --no-ui (or use `serve --no-ui` for the API alone)")
    config = serve_config(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    uses_demo(args)  # requests may carry media: the embedded demo has an encoder
    template = args.template or default_template(args)
    options: dict[str, Any] = dict(max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context,
                                   template=template)
    service = Service(config, load=lambda: build_engine(args, **options))
    if args.unclip:
        from imagebind_llm.apps.unclip import UnCLIP
        from imagebind_llm.engine.cli import DTYPES

        service.unclip = UnCLIP(args.unclip, dtype=DTYPES[args.dtype], device=args.device)
        service.unclip.pipeline  # load (or download) now, not on the first request
    app = create_app(service)
    service.start()
    where = f"http://{args.host}:{args.port}"
    if args.web:
        print(f"imagebind-llm: open {where}/ui in a browser (the API is at {where}/v1); the model is loading",
              file=sys.stderr)
    else:
        print(f"imagebind-llm: serving {where}/v1 (OpenAI API)" + ("" if args.no_ui else f" and {where}/ui (web UI)")
              + "; the model is loading", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    service.close()
    return 0
