"""Cache building from images: the shard store (sharding, interruption and resumption, torchrun-style ranks,
the reader), the index built from it, the CLI."""

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from imagebind_llm.cache import CacheError, FeatureCache, build_cache, merge_shards
from imagebind_llm.cache.cli import add_cache_subcommands
from imagebind_llm.cache.shards import FeatureStore, extract_features, list_images

DIM = 16


def fake_encoder(log: list[str] | None = None, fail_after: int | None = None):
    """A deterministic stand-in for the vision tower: each path's vector is seeded by its name.

    Records every encoded path in ``log``; raises once ``fail_after`` paths have been encoded
    (an interruption in the middle of the build).
    """
    done = []

    def encode(paths: list[str]) -> np.ndarray:
        if fail_after is not None and len(done) + len(paths) > fail_after:
            raise KeyboardInterrupt("simulated interruption")
        done.extend(paths)
        if log is not None:
            log.extend(paths)
        rows = [np.random.default_rng(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16)).standard_normal(DIM)
                for p in paths]
        x = np.stack(rows).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return encode


SOURCES = [f"images/img_{i:04d}.jpg" for i in range(250)]
OPTS = dict(encoder="fake-enc", shard_size=40, batch_size=16, progress=False)


def test_interrupted_build_resumes_without_redoing_shards(tmp_path):
    full = build_cache(tmp_path / "full", images=SOURCES, encode_images=fake_encoder(), **OPTS)

    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "resumed", images=SOURCES, encode_images=fake_encoder(fail_after=100), **OPTS)
    finished = sorted(p.name for p in (tmp_path / "resumed" / "features").glob("*.done"))
    assert finished == ["shard-00000.done", "shard-00001.done"]  # 2 x 40 done, the third was cut off
    assert not (tmp_path / "resumed" / "meta.json").exists()

    encoded: list[str] = []
    resumed = build_cache(tmp_path / "resumed", images=SOURCES, encode_images=fake_encoder(encoded), **OPTS)
    assert encoded == SOURCES[80:]  # finished shards are not encoded again
    assert resumed.sources == full.sources == SOURCES
    np.testing.assert_array_equal(resumed.index.reconstruct_n(0, 250), full.index.reconstruct_n(0, 250))
    assert (tmp_path / "resumed" / "index.faiss").read_bytes() == (tmp_path / "full" / "index.faiss").read_bytes()
    q = full.index.reconstruct_n(0, 3) * 0.5
    np.testing.assert_array_equal(resumed.blend(q), full.blend(q))


def test_resume_with_other_sources_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "c", images=SOURCES, encode_images=fake_encoder(fail_after=50), **OPTS)
    with pytest.raises(CacheError, match="different sources"):
        build_cache(tmp_path / "c", images=SOURCES[:-1], encode_images=fake_encoder(), **OPTS)


def test_truncated_shard_is_encoded_again(tmp_path):
    build_cache(tmp_path / "c", images=SOURCES, encode_images=fake_encoder(), **OPTS)
    shard = tmp_path / "c" / "features" / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-64])
    encoded: list[str] = []
    build_cache(tmp_path / "c2", images=SOURCES, encode_images=fake_encoder(), **OPTS)
    extract_features(SOURCES, tmp_path / "c", fake_encoder(encoded), encoder="fake-enc", shard_size=40,
                     rank=0, world_size=1, progress=False)
    assert encoded == SOURCES[80:120]
    assert shard.read_bytes() == (tmp_path / "c2" / "features" / "shard-00002.npy").read_bytes()


def test_ranks_split_shards_and_merge_matches_single_process(tmp_path):
    """torchrun-style: rank r of 3 encodes shards i % 3 == r; the merge builds one index."""
    single = build_cache(tmp_path / "single", images=SOURCES, encode_images=fake_encoder(), **OPTS)
    per_rank = {}
    for rank in range(3):
        log: list[str] = []
        per_rank[rank] = extract_features(SOURCES, tmp_path / "multi", fake_encoder(log), encoder="fake-enc",
                                          shard_size=40, rank=rank, world_size=3, progress=False)
        assert len(log) == sum(min(40, 250 - 40 * i) for i in per_rank[rank])
    assert per_rank == {0: [0, 3, 6], 1: [1, 4], 2: [2, 5]}
    merged = merge_shards(tmp_path / "multi")
    np.testing.assert_array_equal(merged.index.reconstruct_n(0, 250), single.index.reconstruct_n(0, 250))


def test_merge_and_reader_refuse_unfinished_builds(tmp_path):
    extract_features(SOURCES, tmp_path / "c", fake_encoder(), encoder="fake-enc", shard_size=40,
                     rank=0, world_size=2, progress=False)
    with pytest.raises(CacheError, match="not finished"):
        merge_shards(tmp_path / "c")
    with pytest.raises(CacheError, match="not finished"):
        FeatureStore(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="cache extract"):
        FeatureStore(tmp_path / "nothing")


def test_the_reader_sees_the_rows_the_cache_indexed(tmp_path):
    cache = build_cache(tmp_path / "c", images=SOURCES, encode_images=fake_encoder(), **OPTS)
    store = FeatureStore(tmp_path / "c", SOURCES)
    assert (len(store), store.dim, store.encoder, store.sources) == (250, DIM, "fake-enc", SOURCES)
    np.testing.assert_array_equal(np.stack([store[i] for i in range(250)]), cache.index.reconstruct_n(0, 250))


def test_ivf_build_from_images_is_reproducible(tmp_path):
    opts = dict(OPTS, factory="IVF4,Flat", nprobe=4)
    a = build_cache(tmp_path / "a", images=SOURCES, encode_images=fake_encoder(), **opts)
    with pytest.raises(KeyboardInterrupt):
        build_cache(tmp_path / "b", images=SOURCES, encode_images=fake_encoder(fail_after=130), **opts)
    b = build_cache(tmp_path / "b", images=SOURCES, encode_images=fake_encoder(), **opts)
    q = a.index.reconstruct_n(0, 20)
    np.testing.assert_array_equal(a.search(q, 5)[1], b.search(q, 5)[1])


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="imagebind-llm")
    add_cache_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_build_info_query(tmp_path, capsys):
    x = fake_encoder()(SOURCES)
    np.save(tmp_path / "a.npy", x[:100])
    np.save(tmp_path / "b.npy", x[100:])
    (tmp_path / "names.json").write_text(json.dumps(SOURCES))
    assert run_cli("cache", "build", "--features", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                   "--out", str(tmp_path / "c"), "--sources", str(tmp_path / "names.json"),
                   "--index", "IVF4,SQ8", "--nprobe", "4", "--encoder", "fake-enc") == 0
    assert run_cli("cache", "info", str(tmp_path / "c"), "--verify") == 0
    out = capsys.readouterr().out
    assert "250 x 16" in out and "IVF4,SQ8" in out and "fake-enc" in out and "vectors.npy" in out
    np.save(tmp_path / "q.npy", x[7])
    assert run_cli("cache", "query", str(tmp_path / "c"), "--vector", str(tmp_path / "q.npy"), "-k", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[1:3] == ["id", "7"] and lines[1].endswith(SOURCES[7]) and len(lines) == 4
    loaded = FeatureCache.load(tmp_path / "c")
    assert loaded.meta.vectors_dtype == "float16" and loaded.nprobe == 4


def test_list_images_from_folder_and_file(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "sub/c.jpeg", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"")
    assert [Path(p).name for p in list_images(tmp_path / "d")] == ["a.PNG", "b.jpg", "c.jpeg"]
    (tmp_path / "list.txt").write_text("x.jpg\n\ny.jpg\n")
    assert list_images(tmp_path / "list.txt") == ["x.jpg", "y.jpg"]
    with pytest.raises(FileNotFoundError):
        list_images(tmp_path / "nope")


def test_torchrun_env_ranks_build_then_rank0_merges(tmp_path, monkeypatch):
    """Under torchrun (RANK/WORLD_SIZE set), non-zero ranks only encode; rank 0 waits and merges."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert build_cache(tmp_path / "c", images=SOURCES, encode_images=fake_encoder(), **OPTS) is None
    assert not (tmp_path / "c" / "meta.json").exists()
    monkeypatch.setenv("RANK", "0")
    cache = build_cache(tmp_path / "c", images=SOURCES, encode_images=fake_encoder(), **OPTS)
    single = fake_encoder()(SOURCES)
    np.testing.assert_allclose(cache.index.reconstruct_n(0, 250), single, atol=0)


def test_cli_builds_from_images_with_imagebind_and_queries_by_image(tmp_path, capsys):
    """`cache build --images` with the official small ImageBind fixture: the cached vectors are the
    official vision embeddings of the media files (`media_embeddings_small.pt`)."""
    import torch

    fixtures = Path(__file__).parent / "fixtures"
    kwargs = json.loads((fixtures / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    config = tmp_path / "imagebind_small.json"
    config.write_text(json.dumps(kwargs))
    media = fixtures / "media"
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(media / n) for n in ("girl.jpg", "dog_image.jpg", "car_image.jpg", "bird_image.jpg")))
    common = ["--imagebind", str(fixtures / "imagebind" / "imagebind_small.pth"), "--config", str(config)]
    assert run_cli("cache", "build", "--images", str(listing), "--out", str(tmp_path / "c"), "--shard-size", "3",
                   "--batch-size", "2", "--no-progress", *common) == 0
    cache = FeatureCache.load(tmp_path / "c")
    assert (cache.meta.encoder, len(cache), cache.dim) == ("imagebind_small", 4, 32)
    official = torch.load(fixtures / "imagebind" / "media_embeddings_small.pt", weights_only=True)
    by_name = dict(zip(official["files"]["vision"], official["embeddings"]["vision"].numpy()))
    want = np.stack([by_name[Path(s).name] for s in cache.sources])
    np.testing.assert_allclose(cache.index.reconstruct_n(0, 4), want, atol=1e-4)
    capsys.readouterr()
    assert run_cli("cache", "query", str(tmp_path / "c"), "--image", str(media / "car_image.jpg"), "-k", "2", *common) == 0
    first_hit = capsys.readouterr().out.splitlines()[1]
    assert first_hit.endswith("car_image.jpg") and "sim 1.0000" in first_hit
