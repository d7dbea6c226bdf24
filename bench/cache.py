"""Retrieval-cache benchmark: our `FeatureCache` (exact and IVF indexes) vs the official approach.

The official ImageBind-LLM cache searches a flat inner-product FAISS index, reconstructs each of the
B*k neighbours with ``index.reconstruct`` in a Python loop, then blends (softmax(20*sims), weighted
sum, normalise, mix 0.5/0.5, normalise). We measure that, in the same run and on the same data,
next to our caches, which fetch all neighbours in one vectorised call:

* ``flat``: exact ``IndexFlatIP`` (the same index object the official approach uses),
* ``ivf``: ``IVF{nlist},Flat`` with ``--nprobe`` lists searched,
* ``ivf-sq8``: ``IVF{nlist},SQ8`` codes (1 byte per component) plus a float16 vector copy, from which
  4*k candidates are re-ranked exactly and blended.

Data: ``n`` unit vectors of size ``--dim`` drawn from a mixture of Gaussians (``n // 100`` random
unit centres, isotropic noise of norm ~``--spread``), normalised: real image features are
clustered. ``--data uniform`` draws uniform random unit vectors instead (IVF's worst case).
Queries are held-out draws from the same distribution. recall@10 is against exact search.

Columns: build seconds (train + add), index bytes, recall@10, and blend latency (search +
neighbour fetch + blend) in ms per call at batch 1 (median over ``--b1-calls`` calls) and batch 32
(median over ``--b32-calls`` calls), with the speed-up over the official approach at that batch.
IVF indexes get one row per ``--nprobe`` value (the same index, searched with more lists).

Run: ``python bench/cache.py`` (100k); the full run is ``python bench/cache.py --sizes 100000,1000000``
(the 1M run holds ~4 GiB per float32 copy of the vectors and ~10 GiB in all).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator

import faiss
import numpy as np
import torch

from imagebind_llm.cache import FeatureCache
from imagebind_llm.cache import index as index_lib
from imagebind_llm.cache.feature_cache import new_meta

CHUNK = 50_000
ALL_THREADS = faiss.omp_get_max_threads()
TOP_K, TEMPERATURE, WEIGHT = 10, 20.0, 0.5


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, dim: int, kind: str, spread: float, seed: int = 0) -> Callable[[int, int], np.ndarray]:
    """``rows(start, count)``: rows of a reproducible synthetic set (row ``i`` never changes)."""
    clusters = max(100, n // 100)
    centres = unit_rows(np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32))

    def chunk(c: int) -> np.ndarray:
        rng = np.random.default_rng([seed, c])
        noise = rng.standard_normal((CHUNK, dim), dtype=np.float32)
        if kind == "uniform":
            return unit_rows(noise)
        return unit_rows(centres[rng.integers(clusters, size=CHUNK)] + spread / np.sqrt(dim) * noise)

    def rows(start: int, count: int) -> np.ndarray:
        first, last = start // CHUNK, (start + count - 1) // CHUNK
        block = np.concatenate([chunk(c) for c in range(first, last + 1)])
        return block[start - first * CHUNK : start - first * CHUNK + count]

    return rows


def official_blend(index: faiss.Index, q: np.ndarray) -> torch.Tensor:
    """The official approach: search, per-neighbour ``reconstruct`` in a Python loop, then the blend.

    (The official ``sims @ prototypes`` is only right for batch 1; here it is done per row.)
    """
    sims, ids = index.search(q, TOP_K)
    protos = np.vstack([index.reconstruct(int(i)) for i in ids.reshape(-1)]).reshape(len(q), TOP_K, -1)
    a = (torch.tensor(sims) * TEMPERATURE).softmax(dim=-1)
    r = (a.unsqueeze(1) @ torch.tensor(protos)).squeeze(1)
    r = r / r.norm(dim=-1, keepdim=True)
    out = (1 - WEIGHT) * torch.from_numpy(q) + WEIGHT * r
    return out / out.norm(dim=-1, keepdim=True)


def set_threads(n: int) -> None:
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)


def median_ms(fns: list[Callable[[np.ndarray], object]], queries: np.ndarray, batch: int, calls: int) -> list[float]:
    """Median ms per call of each function; calls alternate between them so they share the machine's load."""
    times: list[list[float]] = [[] for _ in fns]
    for c in range(calls):
        q = queries[(c * batch) % len(queries) :][:batch]
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            fn(q)
            t.append(time.perf_counter() - start)
    return [1000 * statistics.median(t) for t in times]


def build(name: str, dim: int, n: int, rows: Callable[[int, int], np.ndarray], nlist: int | None
          ) -> tuple[FeatureCache, float]:
    nlist = nlist or index_lib.default_nlist(n)
    factory = {"flat": "Flat", "ivf": f"IVF{nlist},Flat", "ivf-sq8": f"IVF{nlist},SQ8"}[name]

    def chunks() -> Iterator[np.ndarray]:
        for start in range(0, n, CHUNK):
            yield rows(start, min(CHUNK, n - start))

    start = time.perf_counter()
    index = index_lib.build_index(dim, factory, chunks, n)
    vectors = None
    if name == "ivf-sq8":
        vectors = np.concatenate([c.astype(np.float16) for c in chunks()])
    seconds = time.perf_counter() - start
    meta = new_meta(index, factory, "synthetic", nprobe=None, vectors_dtype=None if vectors is None else "float16")
    return FeatureCache(index, meta, vectors=vectors, use_gpu=False), seconds


def bench_size(n: int, args: argparse.Namespace) -> list[dict]:
    rows = make_data(n + args.queries, args.dim, args.data, args.spread)
    queries = rows(n, args.queries)
    # Un-normalised mixtures, as the model's multi-modal queries; the official code searches them as is.
    queries = (0.5 * queries + 0.5 * np.roll(queries, 1, axis=0)).astype(np.float32)
    results, truth = [], None
    for name in args.indexes:
        set_threads(ALL_THREADS)
        cache, build_s = build(name, args.dim, n, rows, args.nlist)
        set_threads(args.threads)
        if name == "flat":
            truth = cache.search(queries, TOP_K)[1]
        for nprobe in args.nprobe if name != "flat" else [None]:
            if nprobe is not None:
                cache.nprobe = nprobe
            found = cache.search(queries, TOP_K)[1]
            recall = float(np.mean([len(set(a) & set(b)) / TOP_K for a, b in zip(found, truth)]))
            row = dict(n=n, index=cache.meta.index_factory, nprobe=nprobe, build_s=build_s, recall=recall,
                       bytes=index_lib.code_bytes(cache.index) + (cache.vectors.nbytes if cache.vectors is not None else 0))
            fns = [cache.blend]
            if name == "flat":
                diff = (official_blend(cache.index, queries[:32]) - torch.from_numpy(cache.blend(queries[:32]))).abs().max()
                print(f"[n={n}] max |ours - official| blend difference on the flat index: {float(diff):.2e}")
                fns.append(lambda q: official_blend(cache.index, q))
            for batch, calls in ((1, args.b1_calls), (32, args.b32_calls)):
                times = median_ms(fns, queries, batch, calls)
                row[f"ours_b{batch}"] = times[0]
                if name == "flat":
                    row[f"official_b{batch}"] = times[1]
            results.append(row)
            print(f"[n={n}] {row['index']} nprobe {nprobe}: built in {build_s:.1f} s, recall@10 {recall:.3f}, "
                  f"blend b1 {row['ours_b1']:.2f} ms, b32 {row['ours_b32']:.2f} ms", flush=True)
        del cache
    for row in results:
        for batch in (1, 32):
            row[f"speedup_b{batch}"] = results[0][f"official_b{batch}"] / row[f"ours_b{batch}"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated cache sizes, e.g. 100000,1000000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    parser.add_argument("--spread", type=float, default=1.0, help="noise norm around the cluster centres")
    parser.add_argument("--indexes", default="flat,ivf,ivf-sq8", help="subset of flat,ivf,ivf-sq8 (flat first)")
    parser.add_argument("--nlist", type=int, help="IVF lists (default: about 4*sqrt(n), see cache.index.default_nlist)")
    parser.add_argument("--nprobe", default="16,32,64", help="comma-separated IVF nprobe values (one row each)")
    parser.add_argument("--threads", type=int, default=1,
                        help="FAISS/torch threads for the timed queries (builds use all cores); 1 avoids OpenMP "
                             "barrier stalls on a shared machine")
    parser.add_argument("--queries", type=int, default=256, help="held-out queries for recall and timing")
    parser.add_argument("--b1-calls", type=int, default=20)
    parser.add_argument("--b32-calls", type=int, default=5)
    args = parser.parse_args()
    args.indexes = args.indexes.split(",")
    args.nprobe = [int(x) for x in args.nprobe.split(",")]
    if args.indexes[0] != "flat":
        raise SystemExit("--indexes must start with flat (the official approach and the recall truth use it)")
    print(f"faiss {faiss.__version__}, {ALL_THREADS} OMP threads to build, {args.threads} to query, torch {torch.__version__}, "
          f"data {args.data}, dim {args.dim}, nprobe {args.nprobe}, top-k {TOP_K}, load average {os.getloadavg()}")
    table = [row for n in map(int, args.sizes.split(",")) for row in bench_size(n, args)]
    print(f"load average at the end (1/5/15 min): {os.getloadavg()}")
    head = (f"{'n':>9} {'index':>16} {'nprobe':>6} {'build s':>8} {'MiB':>7} {'recall@10':>9} {'official b1 ms':>14} "
            f"{'ours b1 ms':>10} {'x b1':>6} {'official b32 ms':>15} {'ours b32 ms':>11} {'x b32':>6}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in table:
        official = r.get("official_b1"), r.get("official_b32")
        print(f"{r['n']:>9} {r['index']:>16} {r['nprobe'] or '-':>6} {r['build_s']:>8.1f} {r['bytes'] / 2**20:>7.0f} {r['recall']:>9.3f} "
              f"{official[0] or float('nan'):>14.2f} {r['ours_b1']:>10.2f} {r['speedup_b1']:>6.1f} "
              f"{official[1] or float('nan'):>15.2f} {r['ours_b32']:>11.2f} {r['speedup_b32']:>6.1f}")


if __name__ == "__main__":
    main()
