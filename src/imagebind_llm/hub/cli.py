"""``imagebind-llm weights list|fetch``: the official files, downloaded with resume and checksums."""

from __future__ import annotations

import argparse

from imagebind_llm.hub.download import fetch, format_weights_table
from imagebind_llm.hub.registry import MODELS


def add_weights_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("weights", help="list or download the official ImageBind / ImageBind-LLM files")
    sub = p.add_subparsers(dest="weights_command", required=True)
    sub.add_parser("list", help="the known files and named models, their sizes and whether they are cached"
                   ).set_defaults(func=run_list)
    f = sub.add_parser("fetch", help="download a file (registry name or URL) into the cache, resuming if interrupted")
    f.add_argument("source", help="registry name (see `weights list`), URL, or local path")
    f.add_argument("--cache-dir", help="download folder (default $IMAGEBIND_LLM_CACHE or ~/.cache/imagebind_llm)")
    f.add_argument("--sha256", help="expected SHA-256 of the file")
    f.set_defaults(func=run_fetch)


def run_list(args: argparse.Namespace) -> int:
    print(format_weights_table())
    print("\nnamed models (--name, create_model(NAME)):")
    for model in MODELS.values():
        print(f"  {model.name:30s} {model.description}")
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    print(fetch(args.source, args.cache_dir, sha256=args.sha256))
    return 0
