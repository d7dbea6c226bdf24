"""`FeatureCache`: a FAISS index of unit-norm ImageBind features, its metadata, and the cache blend.

A saved cache is a folder::

    cache/
      meta.json       encoder, dim, count, metric, index factory/type, build date, blend defaults,
                      and the size and SHA-256 of every other file
      index.faiss     the FAISS index (inner product)
      vectors.npy     optional float16/float32 [count, dim] copy of the features, used for the blend
                      when the index stores lossy codes (SQ8); memory-mapped on load
      sources.json    optional list of the source file of every vector (row order)

`FeatureCache.load` checks every file's size (and, by default for caches up to 1 GiB, its
SHA-256) before FAISS reads it, so a truncated or corrupt download is refused with a clear error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import faiss
import numpy as np
import torch

from imagebind_llm.cache import index as index_lib
from imagebind_llm.hub import sha256_file
from imagebind_llm.hub.files import atomic_files, make_dir
from imagebind_llm.cache.blend import OFFICIAL_BLEND, BlendOptions, blend_neighbours

log = logging.getLogger(__name__)

FORMAT = "imagebind-llm-feature-cache"
FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"
SOURCES_FILE = "sources.json"
META_FILE = "meta.json"
VERIFY_MAX_BYTES = 1 << 30  # verify=None checksums caches up to this size
DEFAULT_ENCODER = "imagebind_huge"

Array = TypeVar("Array", np.ndarray, torch.Tensor)


class CacheError(ValueError):
    """A cache folder is missing, truncated, corrupt, or incompatible with the model."""


@dataclass
class CacheMeta:
    """What `meta.json` records about a cache."""

    encoder: str
    dim: int
    count: int
    index_factory: str
    index_type: str
    metric: str = "ip"
    vectors_dtype: str | None = None  # dtype of vectors.npy, None when the blend reconstructs from the index
    nprobe: int | None = None
    refine: int = 4  # with a kept vector copy: re-rank refine * k index candidates by exact similarity
    created: str = ""
    defaults: BlendOptions = OFFICIAL_BLEND
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"bytes", "sha256"}
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the build's source description

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: Any, where: Path) -> "CacheMeta":
        """The metadata in the parsed ``meta.json`` ``d``; every field's type is checked.

        Raises:
            CacheError: another format or version, or a missing or malformed field (one line, naming it).
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("version") != FORMAT_VERSION:
            d = d if isinstance(d, dict) else {}
            raise CacheError(
                f"{where} is not a version-{FORMAT_VERSION} {FORMAT} metadata file "
                f"(format={d.get('format')!r}, version={d.get('version')!r})"
            )
        hints = typing.get_type_hints(cls)
        d = {k: v for k, v in d.items() if k in hints}
        bad = [f"{k}={v!r}" for k, v in d.items() if not _is_instance(v, hints[k])]
        files = d.get("files") if isinstance(d.get("files"), dict) else {}
        bad += [f"files[{name!r}]={info!r}" for name, info in files.items()
                if name not in (INDEX_FILE, VECTORS_FILE, SOURCES_FILE) or not isinstance(info, dict)
                or not _is_instance(info.get("bytes"), int) or not isinstance(info.get("sha256"), str)]
        if bad:
            raise CacheError(f"{where}: malformed cache metadata ({'; '.join(bad)[:300]}); rebuild the cache")
        try:
            d["defaults"] = BlendOptions(**d.get("defaults", {})).resolve(OFFICIAL_BLEND)
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise CacheError(f"{where}: incomplete or malformed cache metadata ({e}); rebuild the cache") from None


def _is_instance(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (``int`` excludes ``bool``; ``BlendOptions`` is a mapping)."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = tuple(dict if k is BlendOptions else typing.get_origin(k) or k for k in kinds)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


class FeatureCache:
    """A searchable cache of unit-norm features and the official ImageBind-LLM blend.

    Calling the cache blends with its stored defaults, so a model can take it as a hook
    ``cache(mixed_feature [B, D]) -> [B, D]``.

    Args:
        index: a filled inner-product FAISS index.
        meta: its metadata.
        vectors: optional ``[count, dim]`` float16/float32 array (may be a memmap) used for the blend
            instead of reconstructing from the index.
        sources: optional source file name of every vector.
        use_gpu: search on a GPU copy of the index (None: when GPU FAISS and a GPU are present).
    """

    def __init__(
        self,
        index: faiss.Index,
        meta: CacheMeta,
        *,
        vectors: np.ndarray | None = None,
        sources: Sequence[str] | None = None,
        use_gpu: bool | None = None,
    ) -> None:
        if index.d != meta.dim or index.ntotal != meta.count:
            raise CacheError(
                f"index holds {index.ntotal} vectors of dim {index.d}, metadata says {meta.count} of dim {meta.dim}"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CacheError(f"the cache index must use the inner-product metric, got FAISS metric {index.metric_type}")
        if vectors is not None and tuple(vectors.shape) != (meta.count, meta.dim):
            raise CacheError(f"vectors have shape {tuple(vectors.shape)}, expected {(meta.count, meta.dim)}")
        if sources is not None and len(sources) != meta.count:
            raise CacheError(f"{len(sources)} source names for {meta.count} vectors")
        self.index = index
        self.meta = meta
        self.vectors = vectors
        self.sources = list(sources) if sources is not None else None
        self.path: Path | None = None  # the folder it was loaded from (its files may be memory-mapped)
        if meta.nprobe is not None:
            index_lib.set_nprobe(index, meta.nprobe)
        self._gpu_index = index_lib.gpu_search_index(index) if use_gpu in (None, True) else None
        if use_gpu and self._gpu_index is None:
            raise RuntimeError("use_gpu=True but GPU FAISS or a GPU is not available")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_vectors(
        cls,
        vectors: np.ndarray | torch.Tensor,
        *,
        encoder: str = DEFAULT_ENCODER,
        factory: str | None = None,
        storage: str = "auto",
        memory_budget: int | None = None,
        nprobe: int = 32,
        keep_vectors: str | None = "auto",
        sources: Sequence[str] | None = None,
        defaults: BlendOptions | None = None,
    ) -> "FeatureCache":
        """Build an in-memory cache from ``[n, D]`` unit-norm vectors.

        Args:
            vectors: ``[n, D]`` features (numpy or torch, any float dtype); rows must be unit-norm.
            encoder: name of the encoder that produced them (checked by `check_compatible`).
            factory: FAISS factory string; default chosen by `index.choose_factory`.
            storage, memory_budget: passed to `index.choose_factory` when ``factory`` is None.
            nprobe: IVF lists searched (ignored by exact indexes).
            keep_vectors: ``"float32"``/``"float16"`` keeps a copy for the blend; None reconstructs
                from the index; ``"auto"`` keeps float16 only when the index codes are 8-bit.
            sources: source file name of every row.
            defaults: blend defaults used by ``__call__``.
        """
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().cpu().float().numpy()
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f"vectors must be a non-empty [n, D] array, got shape {vectors.shape}")
        check_unit_norm(vectors, "vectors")
        n, dim = vectors.shape
        factory = factory or index_lib.choose_factory(n, dim, storage=storage, memory_budget=memory_budget)
        index = index_lib.build_index(dim, factory, lambda: index_lib.row_chunks([vectors]), n)
        keep = resolve_keep_vectors(keep_vectors, factory)
        meta = new_meta(index, factory, encoder, nprobe=nprobe, vectors_dtype=keep, defaults=defaults)
        kept = vectors.astype(keep) if keep else None
        return cls(index, meta, vectors=kept, sources=sources)

    @classmethod
    def from_index(
        cls,
        index: faiss.Index | str | Path,
        *,
        encoder: str = DEFAULT_ENCODER,
        sources: Sequence[str] | None = None,
        mmap: bool = True,
        defaults: BlendOptions | None = None,
    ) -> "FeatureCache":
        """Wrap an existing inner-product FAISS index (e.g. the official ``knn.index``) as is.

        The blend reconstructs neighbours from the index, so it must support ``reconstruct``
        (flat and IVF indexes do).
        """
        if not isinstance(index, faiss.Index):
            path = Path(index)
            if not path.is_file():
                raise FileNotFoundError(f"FAISS index file {path} does not exist")
            try:
                index = index_lib.read_index(path, mmap=mmap)
            except RuntimeError as e:
                raise CacheError(f"{path} is not a readable FAISS index (truncated or corrupt?): {e}") from None
        index_lib.ensure_direct_map(index)
        factory = _describe_factory(index)
        nprobe = index_lib.get_nprobe(index)
        return cls(index, new_meta(index, factory, encoder, nprobe=nprobe, defaults=defaults), sources=sources)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """Write the cache folder: index, optional vectors and sources, and meta.json, renamed into place
        together with meta.json last (`staged_files`); an interrupted save leaves the previous cache or none."""
        path = Path(path)
        if self.path is not None and path.exists() and os.path.samefile(path, self.path):
            raise ValueError(f"cannot save a cache over the folder it was loaded from ({path}); save elsewhere")
        with staged_files(path, vectors=self.vectors is not None, sources=self.sources is not None) as files:
            self.write_files(files)
        return path

    def write_files(self, files: dict[str, Path]) -> None:
        """Write the cache's files to the (temporary) paths ``files`` from `staged_files`; a kept vector copy
        already memory-mapped from its path (builders write it there first) is not copied again."""
        faiss.write_index(self.index, str(files[INDEX_FILE]))
        if self.vectors is not None and not _backed_by(self.vectors, files[VECTORS_FILE]):
            write_npy(files[VECTORS_FILE], [self.vectors], self.vectors.dtype)
        if self.sources is not None:
            files[SOURCES_FILE].write_text(json.dumps(self.sources))
        self.meta.files = {name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                           for name, p in files.items() if name != META_FILE}
        self.meta.nprobe = self.nprobe
        files[META_FILE].write_text(json.dumps(self.meta.to_json(), indent=2))

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        mmap: bool = True,
        verify: bool | None = None,
        use_gpu: bool | None = None,
    ) -> "FeatureCache":
        """Load a cache folder.

        Args:
            path: folder written by `save` or `build.build_cache`.
            mmap: memory-map the index codes and vectors instead of reading them into RAM.
            verify: check SHA-256 checksums (None: only when the files total at most 1 GiB). File
                sizes are always checked.
            use_gpu: search on GPU FAISS (None: when available).

        Raises:
            FileNotFoundError: no cache at ``path``.
            CacheError: a file is missing, truncated or corrupt, or the metadata is invalid.
        """
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"no feature cache at {path} ({META_FILE} missing); build one with `cache build`")
        try:
            meta = CacheMeta.from_json(json.loads(meta_path.read_text()), meta_path)
        except json.JSONDecodeError as e:
            raise CacheError(f"{meta_path} is not valid JSON: {e}") from None
        verify_files(path, meta, verify)
        try:
            index = index_lib.read_index(path / INDEX_FILE, mmap=mmap)
        except RuntimeError as e:
            raise CacheError(f"FAISS could not read {path / INDEX_FILE} (corrupt?): {e}") from None
        vectors = None
        if VECTORS_FILE in meta.files:
            vectors = np.load(path / VECTORS_FILE, mmap_mode="r" if mmap else None)
        sources = None
        if SOURCES_FILE in meta.files:
            try:
                sources = json.loads((path / SOURCES_FILE).read_text())
            except ValueError as e:
                raise CacheError(f"{path / SOURCES_FILE} is not valid JSON ({e}); rebuild the cache") from None
        cache = cls(index, meta, vectors=vectors, sources=sources, use_gpu=use_gpu)
        cache.path = path
        return cache

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return self.meta.dim

    def __len__(self) -> int:
        return self.meta.count

    @property
    def nprobe(self) -> int | None:
        """IVF lists searched per query (None for exact indexes)."""
        return index_lib.get_nprobe(self.index)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        index_lib.set_nprobe(self.index, value)
        if self._gpu_index is not None:
            index_lib.set_nprobe(self._gpu_index, value)

    def check_compatible(self, dim: int, encoder: str) -> None:
        """Refuse a cache built for another feature size or encoder.

        Raises:
            CacheError: naming both sides.
        """
        if dim != self.dim or encoder != self.meta.encoder:
            raise CacheError(
                f"the cache holds {self.meta.encoder!r} features of dim {self.dim}, but the model uses "
                f"{encoder!r} features of dim {dim}; build a cache with the model's encoder "
                "(`imagebind-llm cache build`)"
            )

    # ------------------------------------------------------------------ query

    def search(self, queries: np.ndarray | torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k inner-product search.

        Args:
            queries: ``[B, D]`` features (numpy or torch on any device), searched as given.
            top_k: neighbours per query.

        With a kept vector copy (lossy SQ8 codes), the index proposes ``meta.refine * top_k``
        candidates that are re-ranked by their exact inner product with the kept vectors.

        Returns:
            ``(sims [B, k] float32, ids [B, k] int64)``, best first; ids are -1 where fewer than k
            were found.
        """
        sims, ids, _ = self._search_array(self._as_query_array(queries), top_k)
        return sims, ids

    def _search_array(self, q: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(sims, ids, prototypes or None)``. With a kept vector copy (lossy index codes), the index
        proposes ``refine * top_k`` candidates that are re-ranked by their exact similarity."""
        if not 1 <= top_k <= len(self):
            raise ValueError(f"top_k must be in [1, {len(self)}] for this cache, got {top_k}")
        index = self._gpu_index or self.index
        if self.vectors is None:
            sims, ids = index.search(q, top_k)
            return sims, ids, None
        _, candidates = index.search(q, min(len(self), top_k * max(1, self.meta.refine)))
        protos = self.prototypes(candidates)
        sims = np.einsum("bd,bkd->bk", q, protos)
        sims[candidates < 0] = np.finfo(np.float32).min  # where FAISS found nothing, as FAISS reports it
        best = np.argsort(-sims, axis=1, kind="stable")[:, :top_k]
        return (np.take_along_axis(sims, best, 1), np.take_along_axis(candidates, best, 1),
                np.take_along_axis(protos, best[..., None], 1))

    def prototypes(self, ids: np.ndarray) -> np.ndarray:
        """Stored features of neighbours ``ids [B, k]`` as ``[B, k, D]`` float32, in one vectorised read.

        Missing ids (-1, possible with IVF and a small nprobe) give zero vectors.
        """
        flat = ids.reshape(-1)
        missing = flat < 0
        flat = np.where(missing, 0, flat)
        if self.vectors is not None:
            rows = np.asarray(self.vectors[flat], dtype=np.float32)
        else:
            rows = self.index.reconstruct_batch(flat)
        rows[missing] = 0.0
        return rows.reshape(*ids.shape, self.dim)

    def blend(self, queries: Array, options: BlendOptions | None = None, **changes: Any) -> Array:
        """The official cache blend of ``queries [B, D]`` (see `cache.blend.blend_neighbours`).

        ``sims, ids = search(q)``; ``a = softmax(temperature * sims)``; ``r = normalize(a @ protos)``;
        ``out = normalize((1 - weight) * q + weight * r)``, with ``q`` searched and blended as given
        (not re-normalised) and the raw inner products, as in the official code. Search runs on
        FAISS (CPU, or GPU FAISS when present); the blend arithmetic runs in float32 on the input's
        device. ``changes`` (``top_k=5``) override fields of ``options``. With a kept vector copy (lossy SQ8 codes), neighbours are re-ranked and weighted by
        their exact similarities from it (see `search`), so the 8-bit error does not reach the
        blend. Missing neighbours (IVF) get zero vectors, which drop out of ``r`` exactly; a query
        with no neighbour at all comes back as ``normalize(q)``. Unset arguments use the cache's
        defaults (official: top-k 10, temperature 20, weight 0.5).

        Returns:
            ``[B, D]`` unit-norm features of the input's type (numpy or torch), device and dtype.
        """
        opts = (options or BlendOptions()).replace(**changes).resolve(self.meta.defaults)
        as_numpy = not isinstance(queries, torch.Tensor)
        q = torch.from_numpy(np.asarray(queries)) if as_numpy else queries.detach()
        q_np = self._as_query_array(q)
        sims, ids, protos = self._search_array(q_np, opts.top_k)
        if protos is None:
            protos = self.prototypes(ids)
        sims[ids < 0] = 0.0  # FAISS reports -FLT_MAX there; their zero prototypes already drop out
        lonely = (ids < 0).all(axis=1)
        if lonely.any():
            protos[lonely] = q_np[lonely, None, :]  # then r = normalize(q), so out = normalize(q)
        out = blend_neighbours(
            q.to(torch.float32),
            torch.from_numpy(sims).to(q.device),
            torch.from_numpy(protos).to(q.device),
            opts.temperature,
            opts.weight,
        )
        return out.numpy() if as_numpy else out.to(queries.dtype)

    __call__ = blend

    def neighbours(self, queries: np.ndarray | torch.Tensor, top_k: int) -> list[list[tuple[int, float, str | None]]]:
        """Per query, ``(id, similarity, source file or None)`` of its top-k neighbours."""
        sims, ids = self.search(queries, top_k)
        return [
            [(int(i), float(s), self.sources[i] if self.sources else None) for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(sims, ids)
        ]

    def _as_query_array(self, queries: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(queries, torch.Tensor):
            queries = queries.detach().to("cpu", torch.float32).numpy()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [B, {self.dim}] for this cache, got {tuple(q.shape)}")
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinite values")
        return q

    def __repr__(self) -> str:
        return (
            f"FeatureCache(count={len(self)}, dim={self.dim}, encoder={self.meta.encoder!r}, "
            f"index={self.meta.index_factory!r}, nprobe={self.nprobe})"
        )


# ---------------------------------------------------------------------- helpers


@contextlib.contextmanager
def staged_files(path: Path, *, vectors: bool, sources: bool) -> Iterator[dict[str, Path]]:
    """Temporary paths of a cache folder's files (``{file name: path}``), renamed into ``path`` together when
    the block succeeds, ``meta.json`` last (`imagebind_llm.hub.files.atomic_files`)."""
    names = [INDEX_FILE, *([VECTORS_FILE] if vectors else []), *([SOURCES_FILE] if sources else []), META_FILE]
    folder = make_dir(path, "cache folder")
    with atomic_files(*(folder / name for name in names)) as tmps:
        yield dict(zip(names, tmps))


def new_meta(
    index: faiss.Index,
    factory: str,
    encoder: str,
    *,
    nprobe: int | None,
    vectors_dtype: str | None = None,
    defaults: BlendOptions | None = None,
    extra: dict[str, Any] | None = None,
) -> CacheMeta:
    """Metadata for a freshly built index (files are filled in by `FeatureCache.save`)."""
    is_ivf = faiss.try_extract_index_ivf(index) is not None
    return CacheMeta(
        encoder=encoder,
        dim=index.d,
        count=index.ntotal,
        index_factory=factory,
        index_type=type(faiss.downcast_index(index)).__name__,
        vectors_dtype=vectors_dtype,
        nprobe=nprobe if is_ivf else None,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        defaults=(defaults or BlendOptions()).resolve(OFFICIAL_BLEND),
        extra=extra or {},
    )


def resolve_keep_vectors(keep_vectors: str | None, factory: str) -> str | None:
    """The dtype of the vector copy kept for the blend (see `FeatureCache.from_vectors`)."""
    if keep_vectors == "auto":
        return "float16" if factory.endswith(("SQ8", "SQ4", "SQ6")) or "PQ" in factory else None
    if keep_vectors not in (None, "float16", "float32"):
        raise ValueError(f"keep_vectors must be 'auto', 'float16', 'float32' or None, got {keep_vectors!r}")
    return keep_vectors


def check_unit_norm(x: np.ndarray, name: str, tol: float = 1e-2) -> None:
    """Refuse rows that are not unit-norm, NaN and infinite ones included (cosine-similarity search needs
    normalised features). ``x`` may be a memmap: it is read in bounded chunks."""
    first, count = None, 0
    for start, chunk in enumerate(index_lib.row_chunks([x])):
        norms = np.linalg.norm(np.asarray(chunk, dtype=np.float32), axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= tol))
        if len(bad) and first is None:
            first = (start * index_lib.CHUNK_ROWS + int(bad[0]), norms[bad[0]])
        count += len(bad)
    if first is not None:
        raise ValueError(
            f"{name} must be L2-normalised rows; row {first[0]} has norm {first[1]:.4f} "
            f"({count} bad rows among {len(x)})"
        )


def verify_files(path: Path, meta: CacheMeta, verify: bool | None) -> None:
    """Check presence and size of every file in ``meta.files``, and their SHA-256 when asked."""
    if INDEX_FILE not in meta.files:
        raise CacheError(f"{path / META_FILE} lists no {INDEX_FILE}")
    total = sum(int(info["bytes"]) for info in meta.files.values())
    if verify is None:
        verify = total <= VERIFY_MAX_BYTES
    for name, info in meta.files.items():
        p = path / name
        if not p.is_file():
            raise CacheError(f"cache file {p} is missing")
        size = p.stat().st_size
        if size != info["bytes"]:
            raise CacheError(
                f"cache file {p} has {size} bytes, expected {info['bytes']} (truncated or replaced); rebuild or re-download it"
            )
        if verify and sha256_file(p) != info["sha256"]:
            raise CacheError(f"cache file {p} fails its SHA-256 check (corrupt); rebuild or re-download it")


def _describe_factory(index: faiss.Index) -> str:
    """A factory-like description of an index that was built elsewhere."""
    ivf = faiss.try_extract_index_ivf(index)
    name = type(faiss.downcast_index(index)).__name__
    return name if ivf is None else f"IVF{ivf.nlist},{name}"


def write_npy(path: Path, arrays: Sequence[np.ndarray], dtype: str | np.dtype) -> None:
    """Write the row-concatenation of ``arrays`` (e.g. memmaps) to one ``.npy`` file in bounded chunks."""
    n, dim = sum(len(a) for a in arrays), arrays[0].shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, dim))
    start = 0
    for chunk in index_lib.row_chunks(arrays):
        out[start : start + len(chunk)] = chunk
        start += len(chunk)
    out.flush()
    del out


def _backed_by(x: np.ndarray, path: Path) -> bool:
    """Whether ``x`` is a memmap of the file ``path``."""
    filename = getattr(x, "filename", None)
    return filename is not None and path.exists() and os.path.samefile(filename, path)
