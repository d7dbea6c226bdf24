"""FAISS index choice, construction and memory-mapped reading for the feature cache.

All indexes use the inner-product metric on unit-norm vectors (cosine similarity), as the official
ImageBind-LLM cache does. The choice follows the cache size and the memory budget:

- up to ``exact_max`` vectors: exact search (``"Flat"``, or ``"SQfp16"``/``"SQ8"`` storage);
- above: an inverted file with a trained coarse quantiser, ``"IVF{nlist},{Flat|SQfp16|SQ8}"``,
  searched with ``nprobe`` lists.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Bytes per stored component for each storage name, and the FAISS factory suffix.
STORAGES: dict[str, tuple[int, str]] = {"flat": (4, "Flat"), "fp16": (2, "SQfp16"), "sq8": (1, "SQ8")}
DEFAULT_EXACT_MAX = 100_000
KMEANS_ITERATIONS = 10  # FAISS defaults to 25; 10 gives the same recall here at 40% of the training time
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 points per centroid
CHUNK_ROWS = 65536  # rows per streamed slice (`row_chunks`)


def default_nlist(n: int) -> int:
    """Number of IVF lists for ``n`` vectors: about ``4 * sqrt(n)``, a power of two, >= 39 points per list."""
    if n < 1:
        raise ValueError(f"cannot size an IVF index for n={n} vectors")
    nlist = 2 ** round(math.log2(4 * math.sqrt(n)))
    return max(1, min(nlist, n // TRAIN_POINTS_PER_LIST))


def choose_factory(
    n: int,
    dim: int,
    *,
    storage: str = "auto",
    exact_max: int = DEFAULT_EXACT_MAX,
    memory_budget: int | None = None,
    nlist: int | None = None,
) -> str:
    """Pick a FAISS factory string for ``n`` unit vectors of size ``dim``.

    Args:
        n: number of vectors.
        dim: vector size.
        storage: ``"flat"`` (float32), ``"fp16"``, ``"sq8"`` (8-bit scalar quantiser) or ``"auto"``
            (float32 unless ``memory_budget`` needs a smaller code).
        exact_max: largest cache searched exhaustively; above it an IVF index is used.
        memory_budget: bytes the stored codes may take (None: no limit).
        nlist: IVF lists (default `default_nlist(n)`).

    Returns:
        A factory string such as ``"Flat"`` or ``"IVF4096,SQ8"``.
    """
    if storage != "auto" and storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r}; choose one of auto, {', '.join(STORAGES)}")
    candidates = list(STORAGES) if storage == "auto" else [storage]
    fitting = [s for s in candidates if memory_budget is None or n * dim * STORAGES[s][0] <= memory_budget]
    if not fitting:
        need = n * dim * STORAGES[candidates[-1]][0]
        raise ValueError(
            f"{n} vectors of dim {dim} need at least {need} bytes with storage {candidates[-1]!r}, "
            f"over the memory budget of {memory_budget} bytes; raise the budget or use fewer vectors"
        )
    codes = STORAGES[fitting[0]][1]
    if n <= exact_max:
        return codes
    return f"IVF{nlist or default_nlist(n)},{codes}"


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product index from a FAISS factory string."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"invalid FAISS factory string {factory!r} for dim {dim}: {e}") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.niter = KMEANS_ITERATIONS
    return index


def train_size(index: faiss.Index, n: int) -> int:
    """How many vectors `build_index` trains ``index`` on (0 when it needs no training)."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    return n if ivf is None else min(n, TRAIN_POINTS_PER_LIST * ivf.nlist)


def build_index(
    dim: int,
    factory: str,
    chunks: Callable[[], Iterable[np.ndarray]],
    n: int,
    *,
    seed: int = 0,
) -> faiss.Index:
    """Train (if needed) and fill an index from chunks of vectors.

    Args:
        dim: vector size.
        factory: FAISS factory string (see `choose_factory`).
        chunks: returns a fresh iterable of ``[m, dim]`` float arrays whose rows are the cache
            in order; called once to fill, and once more to draw the training sample when the
            index needs training.
        n: total number of rows ``chunks`` yields.
        seed: seed of the training sample.

    Returns:
        The filled index (IVF indexes keep a direct map, so `reconstruct` works).

    Raises:
        ValueError: too few vectors to train ``factory`` (e.g. fewer than its IVF lists).
    """
    index = new_index(dim, factory)
    n_train = train_size(index, n)
    if n_train:
        picked = np.sort(np.random.default_rng(seed).choice(n, size=n_train, replace=False))
        sample = _take_rows(chunks(), picked, dim)
        log.info("training %s on %d of %d vectors", factory, n_train, n)
        try:
            index.train(sample)
        except RuntimeError as e:  # FAISS: too few training points for the lists or codebooks asked for
            reason = str(e).strip().splitlines()[-1].split(" failed: ")[-1]
            raise ValueError(f"cannot train a {factory} index on {n} vectors ({reason}); use fewer IVF lists "
                             "or codebook bits, or an exact index (--index Flat)") from None
        del sample
    added = 0
    for chunk in chunks():
        index.add(as_float32_rows(chunk, dim))
        added += len(chunk)
    if added != n:
        raise ValueError(f"the vector source yielded {added} rows, expected {n}")
    return ensure_direct_map(index)


def ensure_direct_map(index: faiss.Index) -> faiss.Index:
    """Give an IVF index the id -> list map that `reconstruct` needs (a no-op for other indexes)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()
    return index


def row_chunks(arrays: Iterable[np.ndarray], rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The rows of ``arrays`` in order, in slices of at most ``rows`` (bounded float32 copies)."""
    for a in arrays:
        for start in range(0, len(a), rows):
            yield a[start : start + rows]


def _take_rows(chunks: Iterable[np.ndarray], rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``rows`` (sorted global positions) of the concatenation of ``chunks``, as float32."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    start = filled = 0
    for chunk in chunks:
        stop = start + len(chunk)
        lo, hi = np.searchsorted(rows, [start, stop])
        out[filled : filled + hi - lo] = chunk[rows[lo:hi] - start]
        filled += hi - lo
        start = stop
    assert filled == len(rows), (filled, len(rows))
    return out


def as_float32_rows(x: np.ndarray, dim: int) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[m, dim]`` array (FAISS's input format)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [m, {dim}], got {tuple(x.shape)}")
    return x


def read_index(path: str | Path, *, mmap: bool = True) -> faiss.Index:
    """Read an index file; with ``mmap`` the stored vectors/codes stay on disk (page cache).

    ``IO_FLAG_MMAP_IFC`` maps both flat codes and IVF inverted lists (FAISS >= 1.10), so a multi-GB
    cache is never copied into RAM. IVF indexes get a direct map so `reconstruct` works.
    """
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    return ensure_direct_map(faiss.read_index(str(path), flags))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set the number of IVF lists searched; a no-op for exact indexes."""
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    elif hasattr(index, "nprobe"):  # GPU IVF indexes
        index.nprobe = nprobe


def get_nprobe(index: faiss.Index) -> int | None:
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else ivf.nprobe


def gpu_search_index(index: faiss.Index) -> faiss.Index | None:
    """A GPU copy of ``index`` for searching when GPU FAISS and a GPU are present, else None."""
    if not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        return None
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as e:  # e.g. an index type without a GPU implementation
        log.warning("searching on CPU: could not copy the %s index to the GPU (%s)", type(index).__name__, e)
        return None


def code_bytes(index: faiss.Index) -> int:
    """Approximate bytes an index's stored codes take (IVF adds an int64 id per vector)."""
    ivf = faiss.try_extract_index_ivf(index)
    per_vector = index.sa_code_size() + (8 if ivf is not None else 0)
    return index.ntotal * per_vector
