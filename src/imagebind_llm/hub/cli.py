"""``imagebind-llm weights list|fetch``: the official files, downloaded with resume and checksums."""

from __future__ import annotations

import argparse
import math

from imagebind_llm.hub.download import DEFAULT_RETRIES, DEFAULT_TIMEOUT, fetch, format_weights_table
from imagebind_llm.hub.registry import MODELS


def add_weights_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="list or download the official ImageBind / ImageBind-LLM files")
    sub = p.add_subparsers(dest="weights_command", required=True)
    sub.add_parser("list", help="the known files and named models, their sizes and whether they are cached"
                   ).set_defaults(func=run_list)
    f = sub.add_parser("fetch", help="download a file (registry name or URL) into the cache, resuming if interrupted")
    f.add_argument("source", help="registry name (see `weights list`), URL, or local path")
    f.add_argument("--cache-dir", help="download folder (default $IMAGEBIND_LLM_CACHE or ~/.cache/imagebind_llm)")
    f.add_argument("--sha256", help="expected SHA-256 of the file (checked for local files too)")
    f.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for the server to connect and for each read (default {DEFAULT_TIMEOUT:g})")
    f.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"times a failed transfer is retried, resuming (default {DEFAULT_RETRIES})")
    f.set_defaults(func=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    print(format_weights_table())
    print("\nnamed models (--name, create_model(NAME)):")
    for model in MODELS.values():
        print(f"  {model.name:30s} {model.description}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    if not 0 < args.timeout < math.inf or args.retries < 0:
        raise ValueError(f"--timeout must be > 0 and --retries >= 0, got {args.timeout:g} and {args.retries}")
    print(fetch(args.source, args.cache_dir, sha256=args.sha256, timeout=args.timeout, retries=args.retries))
    return 0
