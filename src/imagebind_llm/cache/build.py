"""Building a `FeatureCache`: from images (encoded into the shard store of `imagebind_llm.cache.shards`,
resumable and split across ``torchrun`` processes), from `.npy` feature shards, or from an existing FAISS
index such as the official ``knn.index``.

An image build first writes ``out/features/`` (see `cache.shards`), then `merge_shards` trains/fills
one index from all the shards, so a build interrupted during encoding resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imagebind_llm.cache import index as index_lib
from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.cache.feature_cache import (
    META_FILE,
    VECTORS_FILE,
    CacheError,
    FeatureCache,
    check_unit_norm,
    new_meta,
    resolve_keep_vectors,
    staged_files,
    write_npy,
)
from imagebind_llm.cache.shards import EncodeFn, FeatureStore, dist_rank, extract_features, wait_for_shards
from imagebind_llm.hub.files import refuse_overwrite

log = logging.getLogger(__name__)


def build_from_shards(
    shards: Sequence[str | Path],
    out: str | Path,
    *,
    encoder: str,
    sources: Sequence[str] | None = None,
    factory: str | None = None,
    storage: str = "auto",
    memory_budget: int | None = None,
    nprobe: int = 32,
    keep_vectors: str | None = "auto",
    defaults: BlendOptions | None = None,
) -> FeatureCache:
    """Build one cache folder from ``.npy`` feature shards (``[n_i, D]`` float32/float16, unit-norm).

    Shards are memory-mapped and streamed twice (training sample, then filling), so the features
    never need to fit in RAM at once; a kept vector copy is written straight to ``out/vectors.npy``.

    Returns:
        The saved cache, loaded back from ``out``.
    """
    if not shards:
        raise ValueError("no feature shards given")
    arrays = [_open_shard(p) for p in shards]
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise ValueError(f"feature shards disagree on the feature size: {sorted(dims)}")
    dim, n = dims.pop(), sum(len(a) for a in arrays)
    if sources is not None and len(sources) != n:
        raise ValueError(f"{len(sources)} source names for {n} feature rows")
    for p, a in zip(shards, arrays):
        check_unit_norm(a, f"features in {p}")
    factory = factory or index_lib.choose_factory(n, dim, storage=storage, memory_budget=memory_budget)
    t0 = time.perf_counter()
    index = index_lib.build_index(dim, factory, lambda: index_lib.row_chunks(arrays), n)
    log.info("built %s over %d vectors in %.1f s", factory, n, time.perf_counter() - t0)
    keep = resolve_keep_vectors(keep_vectors, factory)
    meta = new_meta(index, factory, encoder, nprobe=nprobe, vectors_dtype=keep, defaults=defaults,
                    extra={"shards": [Path(p).name for p in shards]})
    with staged_files(Path(out), vectors=bool(keep), sources=sources is not None) as files:
        vectors = None
        if keep:  # streamed straight to its temporary file, then memory-mapped: never all in RAM
            write_npy(files[VECTORS_FILE], arrays, keep)
            vectors = np.load(files[VECTORS_FILE], mmap_mode="r")
        FeatureCache(index, meta, vectors=vectors, sources=sources, use_gpu=False).write_files(files)
    return FeatureCache.load(out)


def _open_shard(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature shard {path} does not exist")
    try:
        a = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise CacheError(f"{path} is not a readable .npy array (truncated?): {e}") from None
    if a.ndim != 2 or a.dtype not in (np.float32, np.float16):
        raise ValueError(f"{path}: expected a [n, D] float32/float16 array, got {a.dtype} {a.shape}")
    return a


def build_from_images(
    sources: Sequence[str],
    out: str | Path,
    encode_images: EncodeFn,
    *,
    encoder: str,
    shard_size: int = 4096,
    batch_size: int = 32,
    dtype: str = "float32",
    wait_timeout: float = 24 * 3600,
    progress: bool = True,
    skip_bad: bool = False,
    overwrite: bool = False,
    **index_options,
) -> FeatureCache | None:
    """Encode images into shards (resumable; this process's share under torchrun), then build.

    Rank 0 waits for the other ranks' shards and builds the index; other ranks return None.
    ``skip_bad`` and ``overwrite`` go to `extract_features`; ``index_options`` to `build_from_shards`
    (factory, storage, memory_budget, nprobe, ...).
    """
    rank, world = dist_rank()
    extract_features(sources, out, encode_images, encoder=encoder, shard_size=shard_size, batch_size=batch_size,
                     dtype=dtype, rank=rank, world_size=world, progress=progress, skip_bad=skip_bad,
                     overwrite=overwrite)
    if rank != 0:
        return None
    wait_for_shards(out, wait_timeout)
    return merge_shards(out, **index_options)


def merge_shards(out: str | Path, **index_options) -> FeatureCache:
    """Build the index of the finished shard store in ``out`` (`FeatureStore`) into ``out`` itself."""
    store = FeatureStore(out)
    return build_from_shards(store.paths, out, encoder=store.encoder, sources=store.sources, **index_options)


def import_faiss_index(
    index_path: str | Path,
    out: str | Path,
    *,
    encoder: str,
    sources: Sequence[str] | None = None,
    defaults: BlendOptions | None = None,
) -> FeatureCache:
    """Wrap an existing inner-product index file (e.g. the official ``knn.index``) as a cache folder.

    The index is read memory-mapped and written unchanged (a flat index keeps exact float32
    vectors, so the blend reconstructs neighbours from it).
    """
    cache = FeatureCache.from_index(index_path, encoder=encoder, sources=sources, mmap=True, defaults=defaults)
    cache.save(out)
    return FeatureCache.load(out)


def read_sources(path: str | Path) -> list[str]:
    """Source names from a JSON list or a text file with one name per line."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        names = json.loads(text)
        if isinstance(names, dict):  # an id -> name mapping
            names = [names[k] for k in sorted(names, key=int)]
        return [str(x) for x in names]
    return [line for line in text.splitlines() if line]


def build_cache(
    out: str | Path,
    *,
    encoder: str,
    images: Sequence[str] | None = None,
    encode_images: EncodeFn | None = None,
    features: Sequence[str | Path] | None = None,
    faiss_index: str | Path | None = None,
    sources: Sequence[str] | None = None,
    overwrite: bool = False,
    **options,
) -> FeatureCache | None:
    """Build a cache folder from exactly one source.

    Args:
        out: the cache folder.
        encoder: encoder name recorded in the metadata (checked against the model on use).
        images: image paths, encoded with ``encode_images`` (see `build_from_images`).
        encode_images: ``list of paths -> [n, D]`` unit-norm features; required with ``images``.
        features: ``.npy`` feature shards (see `build_from_shards`).
        faiss_index: an existing inner-product index file, e.g. the official ``knn.index``.
        sources: source names per row (for ``features``/``faiss_index``; images record their paths).
        overwrite: replace a cache already built in ``out`` (and, from images, re-plan a feature store of
            other sources, keeping the shards that still match).
        options: index and build options of the chosen builder.

    Returns:
        The loaded cache (None on non-zero ranks of a multi-process image build).

    Raises:
        FileExistsError: ``out`` already holds a cache and ``overwrite`` is False.
    """
    given = [name for name, v in (("images", images), ("features", features), ("faiss_index", faiss_index)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of images, features, faiss_index (got {given or 'none'})")
    refuse_overwrite(Path(out) / META_FILE, overwrite=overwrite)
    if images:
        if encode_images is None:
            raise ValueError("building from images needs an encode_images callable")
        return build_from_images(list(images), out, encode_images, encoder=encoder, overwrite=overwrite, **options)
    if features:
        return build_from_shards(list(features), out, encoder=encoder, sources=sources, **options)
    return import_faiss_index(faiss_index, out, encoder=encoder, sources=sources, **options)
