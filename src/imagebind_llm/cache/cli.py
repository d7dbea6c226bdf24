"""``imagebind-llm cache extract|build|info|query``: argparse wiring for the feature cache.

The main CLI calls `add_cache_subcommands(subparsers)`; each leaf parser sets ``func``, which
takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from imagebind_llm.cache import index as index_lib
from imagebind_llm.cache.build import build_cache, read_sources
from imagebind_llm.cache.feature_cache import DEFAULT_ENCODER, FeatureCache
from imagebind_llm.cache.shards import encoder_name, extract_image_features, image_encoder, list_images

log = logging.getLogger(__name__)


def add_cache_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``cache`` with its ``extract``, ``build``, ``info`` and ``query`` subcommands to a CLI."""
    cache = subparsers.add_parser("cache", help="encode images, build, inspect and query the retrieval feature cache")
    sub = cache.add_subparsers(dest="cache_command", required=True)

    e = sub.add_parser("extract", help="encode images with ImageBind into a feature shard store (resumable)",
                       description="Encode images once into OUT/features (sharded; re-running resumes; under "
                       "torchrun each process encodes its share). The store feeds `cache build --images` with "
                       "the same --out, and stage-1 training (--set data.features=OUT).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--images", required=True, help="folder of images (recursive) or a text file of image sources "
                   "(paths or archive.tar::member), one per line")
    e.add_argument("--out", required=True, help="store folder to write")
    _add_encoder_args(e)
    add_shard_args(e)
    e.set_defaults(func=run_extract)

    b = sub.add_parser("build", help="build a cache folder from images, .npy feature shards or a FAISS index",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (recursive) or a text file of image sources: encoded into "
                     "OUT/features as `cache extract` does (resumable; after a finished extract, --imagebind "
                     "is not needed), then indexed")
    src.add_argument("--features", nargs="+", help=".npy feature shards [n, D] (float32/float16, unit-norm)")
    src.add_argument("--faiss-index", help="an inner-product FAISS index file, e.g. the official knn.index")
    b.add_argument("--out", required=True, help="cache folder to write")
    b.add_argument("--encoder", help=f"encoder name recorded in the cache (default: from --config, else {DEFAULT_ENCODER})")
    b.add_argument("--sources", help="source names per row for --features/--faiss-index (JSON list or one per line)")
    _add_encoder_args(b)
    b.add_argument("--index", dest="factory", help="FAISS factory string, e.g. Flat, IVF4096,SQ8 (default: by size)")
    b.add_argument("--storage", default="auto", choices=["auto", *index_lib.STORAGES], help="vector code storage")
    b.add_argument("--memory-budget-gb", type=float, help="max GB for the index codes (picks fp16/sq8 storage)")
    b.add_argument("--nprobe", type=int, default=32, help="IVF lists searched per query")
    b.add_argument("--keep-vectors", default="auto", choices=["auto", "float16", "float32", "none"],
                   help="keep a vector copy for the blend (auto: float16 when the index codes are 8-bit)")
    add_shard_args(b)
    b.set_defaults(func=run_build)

    i = sub.add_parser("info", help="print a cache's metadata, counts, index type and sizes")
    i.add_argument("path", help="cache folder")
    i.add_argument("--verify", action="store_true", help="also check every file's SHA-256")
    i.set_defaults(func=run_info)

    q = sub.add_parser("query", help="print the nearest cache entries of an image or a feature vector")
    q.add_argument("path", help="cache folder")
    qsrc = q.add_mutually_exclusive_group(required=True)
    qsrc.add_argument("--image", help="image file, encoded with the ImageBind vision tower")
    qsrc.add_argument("--vector", help=".npy feature vector [D] or batch [B, D]")
    q.add_argument("-k", "--top-k", type=int, default=5, help="neighbours to print")
    q.add_argument("--nprobe", type=int, help="IVF lists searched (default: the cache's)")
    _add_encoder_args(q)
    q.set_defaults(func=run_query)
    return cache


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--imagebind", help="official ImageBind weights (imagebind_huge.pth / imagebind_w3D.pth, or a "
                   "registry name) for --image(s)")
    p.add_argument("--config", default="huge", help="ImageBind config: 'huge' or a JSON file of ImageBindModel kwargs")
    p.add_argument("--device", default="cpu", help="device of the image encoder")


def add_shard_args(p: argparse.ArgumentParser) -> None:
    """The shard store options of ``cache extract`` / ``cache build --images`` (also ``train extract-features``)."""
    p.add_argument("--shard-size", type=int, default=4096, help="images per feature shard (unit of resumption)")
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--skip-bad", action="store_true", help="leave out images that cannot be read (they are logged "
                   "and listed in their shard's .done file) instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds: a built cache, or a feature "
                   "store of other images (finished shards whose images still match are kept)")


def run_extract(args: argparse.Namespace) -> int:
    sources = list_images(args.images)
    done = extract_image_features(sources, args.out, imagebind=args.imagebind, config=args.config,
                                  device=args.device, shard_size=args.shard_size, batch_size=args.batch_size,
                                  progress=not args.no_progress, skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(json.dumps({"images": len(sources), "shards_encoded": done, "out": args.out}))
    return 0


def run_build(args: argparse.Namespace) -> int:
    options = dict(factory=args.factory, storage=args.storage, nprobe=args.nprobe,
                   keep_vectors=None if args.keep_vectors == "none" else args.keep_vectors,
                   memory_budget=int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None)
    encoder = args.encoder or (encoder_name(args.config) if args.images else DEFAULT_ENCODER)
    if args.images:
        cache = build_cache(args.out, encoder=encoder, images=list_images(args.images),
                            encode_images=image_encoder(args.imagebind, args.config, args.device),
                            shard_size=args.shard_size, batch_size=args.batch_size, progress=not args.no_progress,
                            skip_bad=args.skip_bad, overwrite=args.overwrite, **options)
    else:
        sources = read_sources(args.sources) if args.sources else None
        if args.faiss_index:
            options = {}  # the index is wrapped as is
        cache = build_cache(args.out, encoder=encoder, features=args.features, faiss_index=args.faiss_index,
                            sources=sources, overwrite=args.overwrite, **options)
    if cache is not None:
        print(f"wrote {cache} to {args.out}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    cache = FeatureCache.load(args.path, verify=True if args.verify else None)
    meta = cache.meta
    print(f"cache        {Path(args.path).resolve()}")
    print(f"encoder      {meta.encoder}")
    print(f"vectors      {meta.count} x {meta.dim} (metric {meta.metric})")
    print(f"index        {meta.index_factory} ({meta.index_type}), nprobe {cache.nprobe}")
    copy = f"{meta.vectors_dtype} (re-ranks {meta.refine} x k candidates)" if meta.vectors_dtype else "none (reconstructed from the index)"
    print(f"blend copy   {copy}")
    print(f"defaults     top_k {meta.defaults.top_k}, temperature {meta.defaults.temperature}, weight {meta.defaults.weight}")
    print(f"built        {meta.created}")
    print(f"sources      {'yes' if cache.sources else 'none recorded'}")
    for name, info in meta.files.items():
        print(f"file         {name}: {info['bytes']} bytes, sha256 {info['sha256'][:16]}...")
    print(f"total bytes  {sum(f['bytes'] for f in meta.files.values())}")
    if meta.extra:
        print(f"extra        {json.dumps(meta.extra)[:200]}")
    return 0


def run_query(args: argparse.Namespace) -> int:
    cache = FeatureCache.load(args.path)
    if args.nprobe:
        cache.nprobe = args.nprobe
    if args.image:
        queries = image_encoder(args.imagebind, args.config, args.device)([args.image])
        cache.check_compatible(queries.shape[1], encoder_name(args.config))
        labels = [args.image]
    else:
        queries = np.load(args.vector).astype(np.float32)
        queries = queries[None] if queries.ndim == 1 else queries
        labels = [f"{args.vector}[{i}]" for i in range(len(queries))]
    for label, hits in zip(labels, cache.neighbours(queries, args.top_k)):
        print(f"query {label}")
        for rank, (idx, sim, source) in enumerate(hits, 1):
            print(f"  {rank:2d}. id {idx:<10d} sim {sim:.4f}  {source if source is not None else '-'}")
    return 0
