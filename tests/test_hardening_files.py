"""No data lost and one-line errors: atomic writes, refusing to overwrite, runs that train nothing, bad
checkpoints and configs, unreadable training images, and the feature cache's bad inputs (NaN rows, too few
vectors for an IVF index, malformed metadata, corrupt images, changed source lists, corrupt shards)."""

import json
import os
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.cache import CacheError, FeatureCache, build_cache
from imagebind_llm.cache.shards import FEATURES_DIR, FeatureStore, UnreadableImage, extract_features
from imagebind_llm.hub.files import atomic_files, atomic_write, make_dir, refuse_overwrite
from imagebind_llm.model.factory import BASE_MARKER, merge_delta
from imagebind_llm.train import load_config, stage1
from imagebind_llm.train.checkpoint import read_checkpoint
from imagebind_llm.train.config import ConfigError
from imagebind_llm.train.data import DataFormatError

FIXTURES = Path(__file__).parent / "fixtures"
DIM = 16


# -------------------------------------------------------------------- hub.files
def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "x.npy"
    with atomic_write(target) as tmp:
        np.save(tmp, np.arange(3))  # np.save keeps a name ending in .npy
    assert np.load(target).tolist() == [0, 1, 2]
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's private 0600
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as tmp:
            np.save(tmp, np.arange(5))
            raise KeyboardInterrupt
    assert np.load(target).tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]  # no temporary file left behind


def test_atomic_files_commit_together_with_the_record_last(tmp_path):
    data, record = tmp_path / "data.bin", tmp_path / "done.json"
    data.write_bytes(b"old")
    record.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_files(data, record) as (d, r):
            d.write_bytes(b"new")
            raise RuntimeError("crash before the commit")
    assert (data.read_bytes(), record.read_text()) == (b"old", "old")
    with atomic_files(data, record) as (d, r):
        d.write_bytes(b"new")
        r.write_text("new")
    assert (data.read_bytes(), record.read_text()) == (b"new", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "done.json"]


def test_ctrl_c_during_the_commit_comes_after_it(tmp_path, monkeypatch):
    files = [tmp_path / name for name in ("a", "b", "done")]
    for f in files:
        f.write_text("old")
    replace = os.replace

    def interrupted_replace(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the renames
        time.sleep(0.01)
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        with atomic_files(*files) as tmps:
            for t in tmps:
                t.write_text("new")
    assert [f.read_text() for f in files] == ["new"] * 3


def test_refuse_overwrite_and_make_dir_name_the_problem(tmp_path):
    (tmp_path / "f").write_text("")
    refuse_overwrite(tmp_path / "f", overwrite=True)
    refuse_overwrite(tmp_path / "g", overwrite=False)
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        refuse_overwrite(tmp_path / "g", tmp_path / "f", overwrite=False)
    assert make_dir(tmp_path / "a" / "b").is_dir()
    for path in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(NotADirectoryError, match=f"the output folder {path} cannot be created: .*f is a file"):
            make_dir(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------- merge-delta
def meta_folder(path: Path, scale: float) -> Path:
    path.mkdir()
    (path / "params.json").write_text(json.dumps({"dim": 4}))
    torch.save({"w": torch.arange(4.0) * scale, "rope.freqs": torch.ones(2)}, path / "consolidated.00.pth")
    return path


def test_merge_delta_never_replaces_a_folder_without_overwrite(tmp_path):
    base, delta, delta2 = (meta_folder(tmp_path / n, s) for n, s in (("7B", 1.0), ("d", 0.5), ("d2", 2.0)))
    out = merge_delta(base, delta, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="consolidated.00.pth already exists; pass --overwrite"):
        merge_delta(base, delta2, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(FileExistsError):
        merge_delta(base, delta2, base)  # --out at the original LLaMA folder
    merge_delta(base, delta2, out, overwrite=True)
    assert torch.load(out / "consolidated.00.pth", weights_only=True)["w"].tolist() == [0.0, 3.0, 6.0, 9.0]
    assert json.loads((out / BASE_MARKER).read_text())["delta"] == str(delta2)
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


# -------------------------------------------------------------------- training
def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fake_encoder(paths: list[str]) -> np.ndarray:
    """Features seeded by each path's name (a stand-in for the vision tower)."""
    return np.concatenate([unit_rows(1, seed=sum(map(ord, p))) for p in paths])


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    """Four image-caption rows with a feature store (``feats``) for stage 1 without the encoder."""
    root = tmp_path_factory.mktemp("captions")
    (root / "c.tsv").write_text("url\tcaption\n" + "".join(f"{i}.png\tcolour {i}\n" for i in range(4)))
    extract_features([str(root / f"{i}.png") for i in range(4)], root / "feats", fake_encoder, encoder="fake",
                     shard_size=2, progress=False)
    return root


def stage1_config(root: Path, out: Path, *extra: str):
    return load_config(1, None, [
        f"model.llm={FIXTURES / 'adapter' / 'llama' / 'base'}", f"data.train=[{root / 'c.tsv'}]",
        f"data.image_root={root}", f"data.features={root / 'feats'}", "data.max_words=400", "data.num_workers=0",
        "train.device=cpu", "train.progress=false", f"train.output_dir={out}", "train.batch_size=2",
        "train.epochs=2", "optim.warmup_epochs=1", *extra])


def exported(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and (p.name == "adapter.pth" or p.parent.name == "pretrained")}


def test_a_finished_run_is_never_replaced_without_overwrite(captions, tmp_path):
    out = tmp_path / "run"
    first = stage1.run(stage1_config(captions, out))
    assert first.step == 4 and first.exports
    before = exported(out)
    with pytest.raises(FileExistsError, match="holds a training run .*--resume .*--overwrite"):
        stage1.run(stage1_config(captions, out, "train.seed=1"))
    with pytest.raises(ValueError, match=r"at step 4 and this run stops at step 4 \(.*\): nothing to train"):
        stage1.run(stage1_config(captions, out), resume=out)  # --resume past the schedule's end
    assert exported(out) == before
    again = stage1.run(stage1_config(captions, out, "train.seed=1"), overwrite=True)
    assert again.step == 4 and exported(out).keys() == before.keys() and exported(out) != before
    assert {read_checkpoint(p)[1]["config"]["train"]["seed"] for p in (out / "checkpoints").glob("*.pt")} == {1}
    assert len((out / "log.jsonl").read_text().splitlines()) == 1  # a new run starts a new log


def test_a_run_that_trains_no_step_fails_and_exports_nothing(captions, tmp_path):
    with pytest.raises(ValueError, match="4 examples do not fill one optimiser step of 8"):
        stage1.run(stage1_config(captions, tmp_path / "run", "train.batch_size=8"))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="train.max_steps must be > 0"):
        stage1_config(captions, tmp_path / "run", "train.max_steps=0")


def test_output_dir_that_is_a_file_is_a_clear_error(captions, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="the train.output_dir .*file is a file, not a folder"):
        stage1.run(stage1_config(captions, tmp_path / "file"))


def test_bad_resume_targets_are_one_line_errors(captions, tmp_path):
    out = tmp_path / "run"
    stage1.run(stage1_config(captions, out, "train.max_steps=2"))
    path, ckpt = read_checkpoint(out)
    assert path.name == "step-0000002.pt" and ckpt["step"] == 2
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="cut.pt is not a training checkpoint, or a truncated one"):
        read_checkpoint(truncated)
    with pytest.raises(ValueError, match=r"adapter.pth is not a training checkpoint \(no step"):
        torch.save({"model": {}}, tmp_path / "adapter.pth")
        read_checkpoint(tmp_path / "adapter.pth")
    (out / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(ValueError, match="latest.json is not a checkpoint pointer"):
        read_checkpoint(out)
    (out / "checkpoints" / "latest.json").write_text(json.dumps({"file": "step-0000009.pt"}))
    with pytest.raises(FileNotFoundError, match="names step-0000009.pt, which does not exist"):
        read_checkpoint(out)


@pytest.mark.parametrize("text, override, message", [
    ("train:\n  epochs: [1\n", None, r"run.yaml: invalid YAML \(expected ',' or ']'.* at line 3"),
    (None, "optim.lr=[1", r"--set optim.lr=\[1: invalid YAML"),
    (None, "optim.lr=!!python/object:os.system", "could not determine a constructor"),
    (None, "optim.betas=0.9", "optim.betas must be a list of finite numbers, got 0.9"),
])
def test_yaml_syntax_errors_and_bad_set_values_are_config_errors(tmp_path, text, override, message):
    path = None
    if text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(1, path, [override] if override else [])


def test_a_corrupt_training_image_is_one_line_error_with_workers(tmp_path):
    rows = ["url\tcaption"]
    for i in range(4):
        Image.fromarray(np.full((32, 40, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png\tcolour {i}")
    (tmp_path / "c.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "3.png").write_bytes((tmp_path / "3.png").read_bytes()[:60])
    config = load_config(1, None, [
        f"model.llm={FIXTURES / 'adapter' / 'llama' / 'base'}", f"data.train=[{tmp_path / 'c.tsv'}]",
        f"data.image_root={tmp_path}", f"model.imagebind={FIXTURES / 'imagebind' / 'imagebind_small.pth'}",
        f"model.imagebind_config={FIXTURES / 'imagebind' / 'imagebind_small.json'}", "data.max_words=400",
        "data.num_workers=2", "train.device=cpu", "train.progress=false", f"train.output_dir={tmp_path / 'run'}",
        "train.batch_size=4", "train.epochs=1", "optim.warmup_epochs=1"])
    with pytest.raises(DataFormatError) as error:
        stage1.run(config)
    assert str(error.value) == (f"{tmp_path / '3.png'} (example 3 of data.train): image is corrupt or truncated "
                                "(image file is truncated); fix or remove it")
    assert not (tmp_path / "run" / "adapter.pth").exists()


# -------------------------------------------------------------------- feature cache
def test_nan_and_unnormalised_rows_are_refused_anywhere_in_a_shard(tmp_path):
    x = unit_rows(70_000)
    x[3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    with pytest.raises(ValueError, match="row 3 has norm nan"):
        build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "nan.npy"])
    x[3] = unit_rows(1)[0]
    x[69_999] = 0.0  # past the first chunk
    np.save(tmp_path / "late.npy", x)
    with pytest.raises(ValueError, match=r"row 69999 has norm 0.0000 \(1 bad rows among 70000\)"):
        build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "late.npy"])
    assert not (tmp_path / "c" / "meta.json").exists()


def test_an_index_with_too_few_vectors_is_a_clear_error(tmp_path):
    np.save(tmp_path / "ten.npy", unit_rows(10))
    with pytest.raises(ValueError, match=r"cannot train a IVF64,Flat index on 10 vectors \(Number of training "
                                         r"points \(10\) should be at least .* clusters \(64\)\); use fewer"):
        build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "ten.npy"], factory="IVF64,Flat")


def test_a_built_cache_is_never_replaced_without_overwrite(tmp_path):
    np.save(tmp_path / "a.npy", unit_rows(20, seed=1))
    np.save(tmp_path / "b.npy", unit_rows(30, seed=2))
    build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "a.npy"])
    with pytest.raises(FileExistsError, match="meta.json already exists; pass --overwrite"):
        build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "b.npy"])
    assert len(FeatureCache.load(tmp_path / "c")) == 20
    assert len(build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "b.npy"], overwrite=True)) == 30
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["index.faiss", "meta.json"]


@pytest.mark.parametrize("change", [
    [], {"defaults": "x"}, {"defaults": {"foo": 1}}, {"files": {"index.faiss": "x"}}, {"files": {"index.faiss": {}}},
    {"files": {"../elsewhere": {"bytes": 1, "sha256": "x"}}}, {"count": "20"}, {"dim": None}, {"nprobe": "x"},
    {"refine": "x"}, {"created": True},
])
def test_malformed_cache_metadata_is_a_cache_error(tmp_path, change):
    np.save(tmp_path / "a.npy", unit_rows(20))
    build_cache(tmp_path / "c", encoder="e", features=[tmp_path / "a.npy"])
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps({**meta, **change} if isinstance(change, dict) else change))
    with pytest.raises(CacheError, match="meta.json"):
        FeatureCache.load(tmp_path / "c")


IMAGES = [f"img_{i:02d}.jpg" for i in range(10)]
OPTS = dict(encoder="fake", shard_size=3, batch_size=2, progress=False)


def encoder_with_bad(bad: set[str]):
    def encode(paths: list[str]) -> np.ndarray:
        for p in paths:
            if p in bad:
                raise UnreadableImage(p, "image is corrupt or truncated")
        return fake_encoder(paths)
    return encode


def test_an_unreadable_image_fails_or_is_skipped_and_finished_shards_stay(tmp_path):
    with pytest.raises(UnreadableImage, match="cannot read image img_07.jpg: .*or pass --skip-bad"):
        build_cache(tmp_path / "c", images=IMAGES, encode_images=encoder_with_bad({"img_07.jpg"}), **OPTS)
    assert sorted(p.name for p in (tmp_path / "c" / FEATURES_DIR).glob("*.done")) == [
        "shard-00000.done", "shard-00001.done"]
    cache = build_cache(tmp_path / "c", images=IMAGES, encode_images=encoder_with_bad({"img_07.jpg"}),
                        skip_bad=True, **OPTS)
    kept = [p for p in IMAGES if p != "img_07.jpg"]
    assert cache.sources == kept
    np.testing.assert_array_equal(cache.index.reconstruct_n(0, 9), fake_encoder(kept))
    store = FeatureStore(tmp_path / "c", kept)
    np.testing.assert_array_equal(np.stack([store[i] for i in range(9)]), fake_encoder(kept))
    with pytest.raises(ValueError, match="1 images were left out of the feature store .* as unreadable "
                                         r"\(e.g. img_07.jpg\); remove them from the data"):
        FeatureStore(tmp_path / "c", IMAGES)


def test_a_changed_source_list_resumes_what_still_matches_with_overwrite(tmp_path):
    build_cache(tmp_path / "full", images=IMAGES[:9], encode_images=fake_encoder, **OPTS)
    with pytest.raises(UnreadableImage):
        build_cache(tmp_path / "c", images=IMAGES, encode_images=encoder_with_bad({"img_07.jpg"}), **OPTS)
    with pytest.raises(CacheError, match="different sources; .*pass --overwrite"):
        build_cache(tmp_path / "c", images=IMAGES[:9], encode_images=fake_encoder, **OPTS)
    encoded: list[str] = []

    def logging_encoder(paths: list[str]) -> np.ndarray:
        encoded.extend(paths)
        return fake_encoder(paths)

    cache = build_cache(tmp_path / "c", images=IMAGES[:9], encode_images=logging_encoder, overwrite=True, **OPTS)
    assert encoded == IMAGES[6:9]  # shards 0 and 1 still hold the same images
    assert cache.sources == IMAGES[:9]
    assert (tmp_path / "c" / "index.faiss").read_bytes() == (tmp_path / "full" / "index.faiss").read_bytes()


def test_resume_verifies_shard_checksums_and_ignores_broken_markers(tmp_path):
    build_cache(tmp_path / "c", images=IMAGES, encode_images=fake_encoder, **OPTS)
    features = tmp_path / "c" / FEATURES_DIR
    shard = features / "shard-00001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-4] + b"\0\0\0\0")  # same size, other bytes
    (features / "shard-00002.done").write_text('{"count": 3, "dim"')  # a marker cut short
    encoded: list[str] = []

    def logging_encoder(paths: list[str]) -> np.ndarray:
        encoded.extend(paths)
        return fake_encoder(paths)

    assert extract_features(IMAGES, tmp_path / "c", logging_encoder, encoder="fake", shard_size=3, batch_size=2,
                            progress=False) == [1, 2]
    assert encoded == IMAGES[3:9] and shard.read_bytes() == good
