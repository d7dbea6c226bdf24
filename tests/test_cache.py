"""FeatureCache: the official blend, index choice, IVF recall, persistence and integrity checks.

The reference blend below is written independently in numpy from the official algorithm
(`official_imagebind_llm.md` §4): exact inner-product top-k with the query as given,
``a = softmax(20 * sims)``, ``r = normalize(a @ protos)``, ``out = normalize(0.5 q + 0.5 r)``.
"""

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from imagebind_llm.cache import CacheError, FeatureCache, build_cache, choose_factory

FIXTURE = Path(__file__).parent / "fixtures" / "adapter" / "adapter_io.pt"


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """Unit vectors drawn around random unit centres (a mixture of Gaussians, normalised)."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((clusters, dim)))
    x = centres[rng.integers(clusters, size=n)] + spread / np.sqrt(dim) * rng.standard_normal((n, dim))
    return unit_rows(x)


def reference_blend(bank: np.ndarray, q: np.ndarray, k: int, t: float, w: float) -> np.ndarray:
    """Official cache blend in float64, exact search by brute force."""
    bank, q = bank.astype(np.float64), q.astype(np.float64)
    sims = q @ bank.T
    idx = np.argsort(-sims, axis=1)[:, :k]
    s = np.take_along_axis(sims, idx, axis=1) * t
    a = np.exp(s - s.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)
    r = np.einsum("bk,bkd->bd", a, bank[idx])
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    out = (1 - w) * q + w * r
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


@pytest.fixture(scope="module")
def bank() -> np.ndarray:
    return clustered(3000, 48, clusters=30, spread=1.0, seed=0)


def test_blend_matches_hand_computation_numpy_and_torch(bank):
    cache = FeatureCache.from_vectors(bank)
    rng = np.random.default_rng(1)
    # Un-normalised mixtures, as the model's modality mix: searched and blended as given.
    q = (0.3 * bank[rng.integers(3000, size=6)] + 0.5 * unit_rows(rng.standard_normal((6, 48)))).astype(np.float32)
    for k, t, w in [(10, 20.0, 0.5), (5, 50.0, 0.7), (1, 20.0, 1.0), (10, 0.0, 0.5)]:
        want = reference_blend(bank, q, k, t, w)
        got_np = cache.blend(q, top_k=k, temperature=t, weight=w)
        assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
        np.testing.assert_allclose(got_np, want, atol=1e-5, rtol=0)
        got_t = cache.blend(torch.from_numpy(q), top_k=k, temperature=t, weight=w)
        assert isinstance(got_t, torch.Tensor)
        np.testing.assert_allclose(got_t.numpy(), want, atol=1e-5, rtol=0)
    # weight 0: the query only, normalised
    np.testing.assert_allclose(cache.blend(q, weight=0.0), unit_rows(q), atol=1e-6)


def test_call_uses_stored_defaults_and_keeps_dtype(bank):
    cache = FeatureCache.from_vectors(bank)
    q = torch.from_numpy(bank[:4] * 0.9)
    np.testing.assert_allclose(cache(q).numpy(), reference_blend(bank, q.numpy(), 10, 20.0, 0.5), atol=1e-5)
    out = cache(q.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (4, 48)


def test_blend_on_official_fixture_bank():
    """The fixture's ``knn_bank`` is the official flat IP bank; queries mimic ``vf_knn`` (one image) and
    ``vf_knn_mix`` (an un-normalised 0.5/0.5 mix) with their parameters. Truth is the hand computation."""
    results = torch.load(FIXTURE, weights_only=True)["results"]
    for phase in ("pretrain", "finetune"):
        knn_bank = results[phase]["knn_bank"].numpy()
        assert knn_bank.shape == (400, 32)
        cache = FeatureCache.from_vectors(knn_bank)
        assert cache.meta.index_factory == "Flat"
        rng = np.random.default_rng(2)
        single = unit_rows(rng.standard_normal((1, 32)))
        mix = (0.5 * single + 0.5 * unit_rows(rng.standard_normal((1, 32)))).astype(np.float32)
        np.testing.assert_allclose(cache(single), reference_blend(knn_bank, single, 10, 20.0, 0.5), atol=1e-6)
        got = cache.blend(torch.from_numpy(mix), top_k=5, temperature=50.0, weight=0.7)
        np.testing.assert_allclose(got.numpy(), reference_blend(knn_bank, mix, 5, 50.0, 0.7), atol=1e-6)


def test_search_is_exact_for_flat(bank):
    cache = FeatureCache.from_vectors(bank)
    q = bank[:5] + 0.1
    sims, ids = cache.search(q, 7)
    truth = np.argsort(-(q @ bank.T), axis=1)[:, :7]
    np.testing.assert_array_equal(ids, truth)
    np.testing.assert_allclose(sims, np.take_along_axis(q @ bank.T, truth, 1), atol=1e-5)


def test_missing_ivf_neighbours_get_zero_weight(bank):
    """With nprobe=1 an IVF search can return fewer than k ids (-1); the blend uses the ones found."""
    cache = FeatureCache.from_vectors(bank, factory="IVF64,Flat", nprobe=1)
    q = bank[:8]
    sims, ids = cache.search(q, 200)
    assert (ids < 0).any(), "test needs a query with missing neighbours"
    got = cache.blend(q, top_k=200)
    for row in range(len(q)):
        found = ids[row][ids[row] >= 0]
        s = sims[row][ids[row] >= 0].astype(np.float64) * 20
        a = np.exp(s - s.max())
        r = (a / a.sum()) @ bank[found].astype(np.float64)
        r /= np.linalg.norm(r)
        out = 0.5 * q[row] + 0.5 * r
        np.testing.assert_allclose(got[row], out / np.linalg.norm(out), atol=1e-5)


def blend_over_ids(bank: np.ndarray, q: np.ndarray, ids: np.ndarray, t: float, w: float) -> np.ndarray:
    """The official blend over given neighbour ids, with exact float64 similarities."""
    protos = bank[ids].astype(np.float64)
    s = np.einsum("bd,bkd->bk", q.astype(np.float64), protos) * t
    a = np.exp(s - s.max(axis=1, keepdims=True))
    r = np.einsum("bk,bkd->bd", a / a.sum(axis=1, keepdims=True), protos)
    out = (1 - w) * q + w * r / np.linalg.norm(r, axis=1, keepdims=True)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_ivf_all_lists_probed_is_exact(bank):
    cache = FeatureCache.from_vectors(bank, factory="IVF32,Flat", nprobe=32)
    assert cache.meta.vectors_dtype is None  # reconstructed from the IVF lists
    q = bank[10:14] * 0.8
    np.testing.assert_allclose(cache(q), reference_blend(bank, q, 10, 20.0, 0.5), atol=1e-5)


@pytest.mark.parametrize("keep,tol", [("float32", 1e-5), ("auto", 2e-4)])
def test_sq8_blends_from_kept_vectors_not_codes(bank, keep, tol):
    """8-bit codes only choose the neighbours; prototypes and similarities come from the kept copy
    (float16 by default), so the blend matches the exact computation over the same neighbours."""
    cache = FeatureCache.from_vectors(bank, factory="IVF32,SQ8", nprobe=32, keep_vectors=keep)
    assert cache.meta.vectors_dtype == ("float16" if keep == "auto" else keep)
    q = bank[10:14] * 0.8
    ids = cache.search(q, 10)[1]
    np.testing.assert_allclose(cache(q), blend_over_ids(bank, q, ids, 20.0, 0.5), atol=tol)


def test_sq8_candidates_are_reranked_exactly(bank):
    """8-bit codes mis-order close neighbours; re-ranking refine*k candidates with the kept float32
    copy restores the exact top-k (all lists probed, so only quantisation can lose neighbours)."""
    q = bank[100:300] * 0.9 + 0.1 * bank[300:500]
    truth = np.argsort(-(q @ bank.T), axis=1)[:, :10]
    plain = FeatureCache.from_vectors(bank, factory="IVF32,SQ8", nprobe=32, keep_vectors=None)
    refined = FeatureCache.from_vectors(bank, factory="IVF32,SQ8", nprobe=32, keep_vectors="float32")
    assert recall_at_k(plain.search(q, 10)[1], truth) < 0.99
    sims, ids = refined.search(q, 10)
    assert recall_at_k(ids, truth) == 1.0
    np.testing.assert_allclose(sims, np.take_along_axis(q @ bank.T, ids, 1), atol=1e-5)


def test_ivf_recall_small_clustered():
    """Fast variant of the 100k test: 20k clustered unit vectors of dim 64 (real image features are
    clustered; uniform random unit vectors are IVF's worst case and are measured in bench/cache.py)."""
    data = clustered(21_000, 64, clusters=200, spread=1.0, seed=3)
    base, queries = data[:20_000], data[20_000:20_200]
    cache = FeatureCache.from_vectors(base, storage="flat", factory=choose_factory(20_000, 64, exact_max=1000), nprobe=16)
    assert cache.meta.index_factory.startswith("IVF")
    truth = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    assert recall_at_k(cache.search(queries, 10)[1], truth) >= 0.95


@pytest.mark.slow
def test_ivf_recall_100k_dim1024_clustered():
    """IVF recall@10 >= 0.95 vs exact search on 100k clustered unit vectors of dim 1024
    (a mixture of 1000 Gaussians, normalised, as real image features are clustered)."""
    data = clustered(100_200, 1024, clusters=1000, spread=1.0, seed=4)
    base, queries = data[:100_000], data[100_000:]
    del data
    factory = choose_factory(100_000, 1024, exact_max=50_000, storage="sq8")
    cache = FeatureCache.from_vectors(base, factory=factory, nprobe=32)
    exact = faiss.IndexFlatIP(1024)
    exact.add(base)
    truth = exact.search(queries, 10)[1]
    assert recall_at_k(cache.search(queries, 10)[1], truth) >= 0.95


def test_choose_factory_by_size_and_budget():
    assert choose_factory(50_000, 1024) == "Flat"
    assert choose_factory(1_000_000, 1024) == "IVF4096,Flat"
    assert choose_factory(1_000_000, 1024, memory_budget=3 << 30) == "IVF4096,SQfp16"
    assert choose_factory(1_000_000, 1024, memory_budget=1 << 30) == "IVF4096,SQ8"
    assert choose_factory(1000, 64, storage="sq8") == "SQ8"
    with pytest.raises(ValueError, match="memory budget"):
        choose_factory(1_000_000, 1024, memory_budget=1 << 20)
    with pytest.raises(ValueError, match="unknown storage"):
        choose_factory(10, 4, storage="pq")


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_save_load_roundtrip_mmap(tmp_path, bank, factory):
    names = [f"img_{i}.jpg" for i in range(len(bank))]
    cache = FeatureCache.from_vectors(bank, factory=factory, nprobe=16, sources=names, encoder="enc-x")
    cache.save(tmp_path / "c")
    loaded = FeatureCache.load(tmp_path / "c", mmap=True)
    assert (loaded.meta.encoder, loaded.meta.count, loaded.meta.dim, loaded.nprobe) == ("enc-x", 3000, 48, cache.nprobe)
    assert set(loaded.meta.files) >= {"index.faiss", "sources.json"}
    q = bank[:3] * 0.7
    np.testing.assert_array_equal(loaded(q), cache(q))
    hits = loaded.neighbours(bank[5:6], 2)[0]
    assert hits[0][0] == 5 and hits[0][2] == "img_5.jpg"
    with pytest.raises(ValueError, match="loaded from"):
        loaded.save(tmp_path / "c")


def test_truncated_or_corrupt_files_are_refused(tmp_path, bank):
    FeatureCache.from_vectors(bank).save(tmp_path / "c")
    index_file = tmp_path / "c" / "index.faiss"
    data = index_file.read_bytes()
    index_file.write_bytes(data[:-1000])
    for verify in (False, True):
        with pytest.raises(CacheError, match="truncated"):
            FeatureCache.load(tmp_path / "c", verify=verify)
    corrupt = bytearray(data)
    corrupt[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(corrupt))
    with pytest.raises(CacheError, match="SHA-256"):
        FeatureCache.load(tmp_path / "c", verify=True)
    FeatureCache.load(tmp_path / "c", verify=False)  # same size: only the checksum can tell
    index_file.write_bytes(b"\0" * len(data))  # garbage of the right size, checksum skipped
    with pytest.raises(CacheError, match="FAISS could not read"):
        FeatureCache.load(tmp_path / "c", verify=False)
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        FeatureCache.load(tmp_path / "missing")


def test_check_compatible(bank):
    cache = FeatureCache.from_vectors(bank, encoder="imagebind_huge")
    cache.check_compatible(48, "imagebind_huge")
    with pytest.raises(CacheError, match="dim 48.*dim 1024"):
        cache.check_compatible(1024, "imagebind_huge")
    with pytest.raises(CacheError, match="'imagebind_small'"):
        cache.check_compatible(48, "imagebind_small")


def test_bad_inputs_raise_clear_errors(bank):
    cache = FeatureCache.from_vectors(bank)
    with pytest.raises(ValueError, match=r"\[B, 48\]"):
        cache.search(np.zeros((2, 47), np.float32), 3)
    with pytest.raises(ValueError, match="NaN"):
        cache(np.full((1, 48), np.nan, np.float32))
    with pytest.raises(ValueError, match="top_k"):
        cache.blend(bank[:1], top_k=0)
    with pytest.raises(ValueError, match="weight"):
        cache.blend(bank[:1], weight=1.5)
    with pytest.raises(ValueError, match="L2-normalised"):
        FeatureCache.from_vectors(bank * 2)


def test_official_style_index_file_and_npy_shards(tmp_path, bank):
    """A flat IP index file (the official ``knn.index`` format) is wrapped as is; .npy shards of mixed
    float32/float16 build the same cache."""
    flat = faiss.IndexFlatIP(48)
    flat.add(bank)
    faiss.write_index(flat, str(tmp_path / "knn.index"))
    official = build_cache(tmp_path / "official", encoder="imagebind_huge", faiss_index=tmp_path / "knn.index")
    assert official.meta.index_type == "IndexFlatIP" and len(official) == 3000
    q = bank[:4] * 0.6
    want = reference_blend(bank, q, 10, 20.0, 0.5)
    np.testing.assert_allclose(official(q), want, atol=1e-5)

    np.save(tmp_path / "a.npy", bank[:1000])
    np.save(tmp_path / "b.npy", bank[1000:].astype(np.float16))
    sharded = build_cache(tmp_path / "sharded", encoder="imagebind_huge",
                          features=[tmp_path / "a.npy", tmp_path / "b.npy"])
    assert len(sharded) == 3000
    np.testing.assert_allclose(sharded(q), want, atol=2e-3)  # float16 rows
    with pytest.raises(ValueError, match="exactly one"):
        build_cache(tmp_path / "x", encoder="e", features=[tmp_path / "a.npy"], faiss_index=tmp_path / "knn.index")
