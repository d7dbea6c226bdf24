"""Building a `FeatureCache`: from images (sharded, resumable, multi-process), `.npy` feature shards,
or an existing FAISS index such as the official ``knn.index``.

Image builds write into the output folder::

    out/features/plan.json          the ordered source list and shard size (fixed for the build)
    out/features/shard-00000.npy    [m, D] features of sources [0, m)
    out/features/shard-00000.done   {"count", "dim", "bytes", "sha256"}: written after the shard

A shard with a valid ``.done`` marker is never encoded again, so re-running the same command after
an interruption resumes where it stopped. Under ``torchrun`` every process (``RANK`` of
``WORLD_SIZE``) encodes the shards ``i`` with ``i % WORLD_SIZE == RANK``; no process group is
needed. Once all shards exist, `build_from_shards` trains/fills one index from all of them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from imagebind_llm.cache import index as index_lib
from imagebind_llm.cache.feature_cache import (
    VECTORS_FILE,
    BlendDefaults,
    CacheError,
    FeatureCache,
    check_unit_norm,
    new_meta,
    resolve_keep_vectors,
    write_npy,
)
from imagebind_llm.hub import sha256_file

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FEATURES_DIR = "features"
PLAN_FILE = "plan.json"
EncodeFn = Callable[[list[str]], np.ndarray]


def list_images(source: str | Path) -> list[str]:
    """Image paths from a folder (recursive, sorted) or a text file with one path per line."""
    source = Path(source)
    if source.is_dir():
        paths = sorted(str(p) for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file():
        paths = [line.strip() for line in source.read_text().splitlines() if line.strip()]
    else:
        raise FileNotFoundError(f"{source} is neither a folder of images nor a file listing image paths")
    if not paths:
        raise ValueError(f"no images found in {source} (suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return paths


def dist_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment ``torchrun`` sets; ``(0, 1)`` otherwise."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world


def shard_path(features_dir: Path, i: int) -> Path:
    return features_dir / f"shard-{i:05d}.npy"


def _marker_path(features_dir: Path, i: int) -> Path:
    return features_dir / f"shard-{i:05d}.done"


def _shard_is_done(features_dir: Path, i: int, count: int) -> bool:
    marker, path = _marker_path(features_dir, i), shard_path(features_dir, i)
    if not (marker.is_file() and path.is_file()):
        return False
    info = json.loads(marker.read_text())
    return info["count"] == count and path.stat().st_size == info["bytes"]


def _write_plan(features_dir: Path, sources: Sequence[str], shard_size: int, encoder: str) -> None:
    """Record the build plan, or check that a resumed build uses the same one."""
    plan = {"sources": list(sources), "shard_size": shard_size, "encoder": encoder}
    path = features_dir / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            changed = [k for k in plan if old.get(k) != plan[k]]
            raise CacheError(
                f"{features_dir} holds an unfinished build with different {', '.join(changed)}; "
                "resume it with the same arguments, or use another --out folder"
            )
        return
    tmp = path.with_name(f"{PLAN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, path)  # every rank writes the same plan, so the last rename wins harmlessly


def extract_features(
    sources: Sequence[str],
    out: str | Path,
    encode_images: EncodeFn,
    *,
    encoder: str,
    shard_size: int = 4096,
    batch_size: int = 32,
    dtype: str = "float32",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
) -> list[int]:
    """Encode this process's shards of ``sources`` into ``out/features``, skipping finished shards.

    Args:
        sources: image paths, in cache row order.
        out: the cache folder.
        encode_images: ``list of paths -> [n, D]`` unit-norm features (numpy or torch).
        encoder: encoder name recorded in the plan (a resumed build must use the same).
        shard_size: sources per shard (the unit of resumption).
        batch_size: sources per `encode_images` call.
        dtype: stored feature dtype (``"float32"`` or ``"float16"``).
        rank, world_size: this process's share (default: `dist_rank`).
        progress: show a tqdm bar.

    Returns:
        The shard numbers this call encoded (finished shards are skipped).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if rank is None or world_size is None:
        rank, world_size = dist_rank()
    features_dir = Path(out) / FEATURES_DIR
    features_dir.mkdir(parents=True, exist_ok=True)
    _write_plan(features_dir, sources, shard_size, encoder)
    n_shards = -(-len(sources) // shard_size)
    todo = [
        i
        for i in range(rank, n_shards, world_size)
        if not _shard_is_done(features_dir, i, len(sources[i * shard_size : (i + 1) * shard_size]))
    ]
    mine = len(range(rank, n_shards, world_size))
    log.info("rank %d/%d: %d of its %d shards left to encode", rank, world_size, len(todo), mine)
    total = sum(len(sources[i * shard_size : (i + 1) * shard_size]) for i in todo)
    with tqdm(total=total, unit="img", disable=not progress, desc=f"encode[{rank}]") as bar:
        for i in todo:
            _encode_shard(features_dir, i, sources[i * shard_size : (i + 1) * shard_size], encode_images,
                          batch_size, dtype, bar)
    return todo


def _encode_shard(features_dir: Path, i: int, paths: Sequence[str], encode_images: EncodeFn,
                  batch_size: int, dtype: str, bar: tqdm) -> None:
    parts = []
    for start in range(0, len(paths), batch_size):
        batch = list(paths[start : start + batch_size])
        feats = _to_numpy(encode_images(batch))
        if feats.ndim != 2 or len(feats) != len(batch):
            raise ValueError(f"encode_images returned shape {feats.shape} for {len(batch)} images; expected [n, D]")
        check_unit_norm(feats, f"features of {batch[0]}...")
        parts.append(feats.astype(dtype))
        bar.update(len(batch))
    feats = np.concatenate(parts)
    path = shard_path(features_dir, i)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, feats)
    os.replace(tmp, path)
    marker = {"count": len(feats), "dim": feats.shape[1], "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    _marker_path(features_dir, i).write_text(json.dumps(marker))


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x)


def wait_for_shards(out: str | Path, timeout: float, poll: float = 10.0) -> None:
    """Block until every planned shard of ``out`` is done (rank 0 waiting for the other ranks)."""
    features_dir = Path(out) / FEATURES_DIR
    deadline = time.monotonic() + timeout
    while missing := _missing_shards(features_dir):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} shards of {features_dir} are still missing after {timeout:.0f} s "
                               f"(e.g. {missing[:5]}); re-run the build to finish them")
        log.info("waiting for %d shards from other ranks", len(missing))
        time.sleep(poll)


def _missing_shards(features_dir: Path) -> list[int]:
    plan = json.loads((features_dir / PLAN_FILE).read_text())
    sources, size = plan["sources"], plan["shard_size"]
    n_shards = -(-len(sources) // size)
    return [i for i in range(n_shards)
            if not _shard_is_done(features_dir, i, len(sources[i * size : (i + 1) * size]))]


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
    defaults: BlendDefaults | None = None,
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
        check_unit_norm(a[:4096], f"features in {p}")
    factory = factory or index_lib.choose_factory(n, dim, storage=storage, memory_budget=memory_budget)
    t0 = time.perf_counter()
    index = index_lib.build_index(dim, factory, lambda: index_lib.row_chunks(arrays), n)
    log.info("built %s over %d vectors in %.1f s", factory, n, time.perf_counter() - t0)
    keep = resolve_keep_vectors(keep_vectors, factory)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vectors = None
    if keep:
        write_npy(out / VECTORS_FILE, arrays, keep)
        vectors = np.load(out / VECTORS_FILE, mmap_mode="r")
    meta = new_meta(index, factory, encoder, nprobe=nprobe, vectors_dtype=keep, defaults=defaults,
                    extra={"shards": [Path(p).name for p in shards]})
    FeatureCache(index, meta, vectors=vectors, sources=sources, use_gpu=False).save(out)
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
    **index_options,
) -> FeatureCache | None:
    """Encode images into shards (resumable; this process's share under torchrun), then build.

    Rank 0 waits for the other ranks' shards and builds the index; other ranks return None.
    ``index_options`` go to `build_from_shards` (factory, storage, memory_budget, nprobe, ...).
    """
    rank, world = dist_rank()
    extract_features(sources, out, encode_images, encoder=encoder, shard_size=shard_size, batch_size=batch_size,
                     dtype=dtype, rank=rank, world_size=world, progress=progress)
    if rank != 0:
        return None
    wait_for_shards(out, wait_timeout)
    return merge_shards(out, **index_options)


def merge_shards(out: str | Path, **index_options) -> FeatureCache:
    """Build the index of a finished image build in ``out`` from its shards."""
    features_dir = Path(out) / FEATURES_DIR
    if not (features_dir / PLAN_FILE).is_file():
        raise FileNotFoundError(f"{features_dir / PLAN_FILE} not found: no image build in {out}")
    if missing := _missing_shards(features_dir):
        raise CacheError(f"{len(missing)} shards of {features_dir} are not finished (e.g. {missing[:5]}); "
                         "re-run the image build to encode them")
    plan = json.loads((features_dir / PLAN_FILE).read_text())
    n_shards = -(-len(plan["sources"]) // plan["shard_size"])
    shards = [shard_path(features_dir, i) for i in range(n_shards)]
    return build_from_shards(shards, out, encoder=plan["encoder"], sources=plan["sources"], **index_options)


def import_faiss_index(
    index_path: str | Path,
    out: str | Path,
    *,
    encoder: str,
    sources: Sequence[str] | None = None,
    defaults: BlendDefaults | None = None,
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
        options: index and build options of the chosen builder.

    Returns:
        The loaded cache (None on non-zero ranks of a multi-process image build).
    """
    given = [name for name, v in (("images", images), ("features", features), ("faiss_index", faiss_index)) if v]
    if len(given) != 1:
        raise ValueError(f"give exactly one of images, features, faiss_index (got {given or 'none'})")
    if images:
        if encode_images is None:
            raise ValueError("building from images needs an encode_images callable")
        return build_from_images(list(images), out, encode_images, encoder=encoder, **options)
    if features:
        return build_from_shards(list(features), out, encoder=encoder, sources=sources, **options)
    return import_faiss_index(faiss_index, out, encoder=encoder, sources=sources, **options)
