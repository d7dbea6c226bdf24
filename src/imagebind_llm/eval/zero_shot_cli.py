"""``imagebind-llm eval zero-shot``: zero-shot classification or retrieval with a model's ImageBind encoder.

    imagebind-llm eval zero-shot --data classes/ --task classify --query image --imagebind imagebind_huge.pth
    imagebind-llm eval zero-shot --data pairs.tsv --task retrieve --query audio --target text --json

With only ``--imagebind`` (and ``--imagebind-config``) the encoder is loaded alone; with other model
options it is the encoder of that model; with none, the embedded demo's (random) encoder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from imagebind_llm.encoders import load_official
from imagebind_llm.engine import MODALITIES
from imagebind_llm.engine.cli import add_model_args, build_engine, model_spec, uses_demo
from imagebind_llm.hub import default_cache_dir, fetch

from .zero_shot import (DEFAULT_TEMPLATES, RECALL_KS, EncoderEmbedder, FeatureCache, evaluate_classification,
                        evaluate_retrieval, labelled_set, paired_set, read_folder, read_manifest)

_LLM_OPTIONS = ("name", "model", "adapter", "weights")


def add_zero_shot_command(subparsers: argparse._SubParsersAction) -> None:
    """``zero-shot``: classification (class names through text templates) or retrieval (recall@1/5/10 both ways)."""
    p = subparsers.add_parser(
        "zero-shot", help="zero-shot classification or cross-modal retrieval with ImageBind embeddings",
        description="Classify a folder of class subfolders (or a manifest with a 'label' column) by the text "
                    "embeddings of the class names, or retrieve between two columns of a TSV/JSONL manifest.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="a folder with one subfolder per class, or a .tsv/.jsonl manifest")
    p.add_argument("--task", choices=["classify", "retrieve"], default="classify")
    p.add_argument("--query", choices=sorted(MODALITIES), default="image", help="modality of the items / queries")
    p.add_argument("--target", choices=sorted(MODALITIES), default="text",
                   help="retrieval: modality of the targets (classification always uses text class prompts)")
    p.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES),
                   help="class prompt templates, '{}' standing for the class name")
    p.add_argument("--batch-size", type=int, default=32, help="items per encoder call")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir() / "zero-shot",
                   help="where features are stored to skip encoding on a rerun")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write stored features")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_model_args(p)
    p.set_defaults(func=run_zero_shot, cache=None)


def run_zero_shot(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not all("{}" in t for t in args.templates):
        raise ValueError("every --templates entry needs a '{}' for the class name")
    data = Path(args.data)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist")
    if args.task == "retrieve" and (data.is_dir() or args.query == args.target):
        raise ValueError("retrieval needs a manifest and two different modalities (--query and --target)")
    embedder, model_id = _embedder(args)
    options = dict(batch_size=args.batch_size, model_id=model_id,
                   cache=None if args.no_cache else FeatureCache(args.cache_dir))
    if args.task == "classify":
        dataset = read_folder(data, args.query) if data.is_dir() else labelled_set(read_manifest(data), args.query,
                                                                                  data.parent)
        metrics = evaluate_classification(embedder, dataset, args.query, args.templates, **options)
    else:
        dataset = paired_set(read_manifest(data), args.query, args.target, data.parent)
        metrics = evaluate_retrieval(embedder, dataset, args.query, args.target, **options)
    print(json.dumps(metrics, indent=2) if args.json else format_metrics(metrics, args))
    return 0


def _embedder(args: argparse.Namespace) -> tuple[EncoderEmbedder, str]:
    """The encoder of the model options and its id for the feature cache (the model spec)."""
    if not args.imagebind:
        uses_demo(args)
    spec = model_spec(args)
    if args.imagebind and not any(getattr(args, o) for o in _LLM_OPTIONS):
        encoder = load_official(fetch(args.imagebind), args.imagebind_config, device=args.device,
                                dtype=getattr(torch, args.dtype))
    else:
        encoder = build_engine(args, max_batch=1, background=False).model.encoder
        if encoder is None:
            raise ValueError("this model has no ImageBind encoder; add --imagebind")
    return EncoderEmbedder(encoder), repr(spec)


def format_metrics(metrics: dict[str, float], args: argparse.Namespace) -> str:
    """A small table: accuracies, or recall@k per direction."""
    if args.task == "classify":
        return (f"{args.query} zero-shot classification: {metrics['items']} items, {metrics['classes']} classes\n"
                f"top-1  {metrics['top1']:.4f}\ntop-5  {metrics['top5']:.4f}")
    header = f"{'direction':<20}" + "".join(f"{f'R@{k}':>8}" for k in RECALL_KS)
    lines = [f"retrieval: {metrics['queries']} {args.query} queries, {metrics['targets']} {args.target} targets",
             header]
    for a, b in ((args.query, args.target), (args.target, args.query)):
        lines.append(f"{f'{a} -> {b}':<20}" + "".join(f"{metrics[f'{a}_to_{b}_R@{k}']:>8.4f}" for k in RECALL_KS))
    return "\n".join(lines)
