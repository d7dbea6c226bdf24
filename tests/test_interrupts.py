"""Interrupts: SIGINT and SIGKILL at random points of `merge-delta`, of a training run's export and of
`cache build`, each a real ``python -m imagebind_llm`` process on tiny inputs. After every kill the output
is the previous good one intact or the new one complete, never a mix; the kill points are seeded delays,
plus the moment the first temporary file of the output appears (the write itself)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imagebind_llm.cache import FeatureCache, build_cache
from imagebind_llm.cache.shards import FEATURES_DIR, _shard_is_done, extract_features, read_plan
from imagebind_llm.model.factory import merge_delta
from imagebind_llm.train import load_config, stage1
from imagebind_llm.train.checkpoint import read_checkpoint

FIXTURES = Path(__file__).parent / "fixtures"
DIM = 16


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "imagebind_llm", *map(str, args)]


def run_to_end(cmd: list[str]) -> float:
    """Run ``cmd`` to completion; returns its duration (the scale of the kill delays)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - t0


def interrupt(cmd: list[str], sig: signal.Signals, *, delay: float, watch: tuple[Path, str] | None = None) -> int:
    """Start ``cmd`` and send it ``sig`` after ``delay`` s, or (``watch`` = folder, glob) ``delay`` s after a
    matching file appears; returns the exit code (the command may have finished first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if watch is not None:
        folder, pattern = watch
        while proc.poll() is None and not any(folder.glob(pattern)):
            time.sleep(0.001)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode in (0, 130, -sig), err  # done, or stopped by the signal (130: Ctrl-C handled)
    return proc.returncode


def kill_plan(seed: int, duration: float, n: int = 2) -> list[tuple[signal.Signals, float, bool]]:
    """``n`` kills per signal: half at seeded random delays over the run, half just after the write starts."""
    rng = random.Random(seed)
    plan = []
    for sig in (signal.SIGINT, signal.SIGKILL):
        for k in range(n):
            watch = k % 2 == 1
            plan.append((sig, rng.uniform(0, 0.02) if watch else rng.uniform(0.3, 1.0) * duration, watch))
    return plan


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + tensors[key].contiguous().numpy().tobytes())
    return h.hexdigest()


def file_digest(path: Path) -> str | None:
    """What a file holds (torch archives by their tensors: their bytes differ per save), None if absent."""
    if not path.is_file():
        return None
    if path.suffix in (".pth", ".pt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        return tensors_digest(state.get("model", state))
    if path.suffix == ".safetensors":
        return tensors_digest(load_file(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_kills(cmd: list[str], duration: float, seed: int, watch: tuple[Path, str],
                state: Callable[[], object], old: object, new: object) -> None:
    """Kill ``cmd`` as `kill_plan` says, each time from the old output (a copy of the watched folder is put
    back first), and check that ``state()`` is then ``old`` or ``new``."""
    folder = watch[0]
    saved = folder.with_name(folder.name + ".old")
    shutil.copytree(folder, saved)
    for sig, delay, watched in kill_plan(seed, duration):
        shutil.rmtree(folder)
        shutil.copytree(saved, folder)
        interrupt(cmd, sig, delay=delay, watch=watch if watched else None)
        assert state() in (old, new), f"{sig.name} after {delay:.3f} s{' of writing' if watched else ''}: a mix"


# -------------------------------------------------------------------- merge-delta
def meta_folder(path: Path, seed: int) -> Path:
    path.mkdir()
    (path / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2}))
    g = torch.Generator().manual_seed(seed)
    torch.save({f"layers.{i}.w": torch.randn(1 << 19, generator=g) for i in range(8)}, path / "consolidated.00.pth")
    return path


def test_merge_delta_interrupted_keeps_the_old_merge_or_writes_the_new_one(tmp_path):
    base, delta, delta2 = (meta_folder(tmp_path / name, seed) for seed, name in enumerate(("7B", "d1", "d2")))
    out = tmp_path / "out"
    names = ("consolidated.00.pth", "params.json", "imagebind_llm_base.json")

    def state() -> tuple:
        return tuple(file_digest(out / n) for n in names)

    def cmd(delta: Path) -> list[str]:
        return cli("merge-delta", "--base", base, "--delta", delta, "--out", out, "--overwrite")

    merge_delta(base, delta2, out)
    new = state()
    duration = run_to_end(cmd(delta))
    old = state()
    assert old != new and None not in old
    check_kills(cmd(delta2), duration, 0, (out, ".consolidated.00.pth.*"), state, old, new)
    refused = subprocess.run(cli("merge-delta", "--base", base, "--delta", delta, "--out", out), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and "already exists; pass --overwrite" in refused.stderr
    assert state() in (old, new)


# -------------------------------------------------------------------- training export
def export_state(out: Path) -> tuple:
    """The exports of the run in ``out``; every checkpoint there (and the one ``latest.json`` names) must load."""
    for ckpt in (out / "checkpoints").glob("step-*.pt"):
        read_checkpoint(ckpt)
    if (out / "checkpoints" / "latest.json").exists():
        read_checkpoint(out)
    return tuple(file_digest(out / n) for n in ("adapter.pth", "pretrained/adapter.safetensors",
                                                 "pretrained/config.json"))


def test_training_export_interrupted_keeps_the_old_export_or_writes_the_new_one(tmp_path):
    (tmp_path / "c.tsv").write_text("url\tcaption\n" + "".join(f"{i}.png\tcolour {i}\n" for i in range(4)))
    rows = np.random.default_rng(0).standard_normal((4, DIM)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    extract_features([str(tmp_path / f"{i}.png") for i in range(4)], tmp_path / "feats",
                     lambda paths: rows[[int(Path(p).stem) for p in paths]], encoder="fake", shard_size=2,
                     progress=False)
    settings = [f"model.llm={FIXTURES / 'adapter' / 'llama' / 'base'}", f"data.train=[{tmp_path / 'c.tsv'}]",
                f"data.image_root={tmp_path}", f"data.features={tmp_path / 'feats'}", "data.max_words=400",
                "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.batch_size=2",
                "train.epochs=3", "optim.warmup_epochs=1", "train.save_every=2"]
    out, reference = tmp_path / "run", tmp_path / "reference"
    stage1.run(load_config(1, None, [*settings, f"train.output_dir={out}", "train.seed=1"]))
    old = export_state(out)

    def cmd(folder: Path) -> list[str]:
        return cli("train", "stage1", "--overwrite", *(a for s in settings for a in ("--set", s)),
                   "--set", f"train.output_dir={folder}")

    duration = run_to_end(cmd(reference))
    new = export_state(reference)
    assert old != new and None not in old
    check_kills(cmd(out), duration, 1, (out, ".adapter.pth.*"), lambda: export_state(out), old, new)


# -------------------------------------------------------------------- cache build
def test_cache_build_interrupted_keeps_the_old_cache_or_writes_the_new_one(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("a", 3000), ("b", 4000)):
        rows = rng.standard_normal((n, 256)).astype(np.float32)
        np.save(tmp_path / f"{name}.npy", rows / np.linalg.norm(rows, axis=1, keepdims=True))
    out = tmp_path / "cache"

    def state() -> str:
        cache = FeatureCache.load(out, verify=True)  # always loadable: complete and checksummed
        return hashlib.sha256(cache.index.reconstruct_n(0, len(cache)).tobytes()).hexdigest()

    build_cache(out, encoder="e", features=[tmp_path / "a.npy"], factory="Flat", keep_vectors="float16")
    old = state()
    cmd = cli("cache", "build", "--features", tmp_path / "b.npy", "--out", tmp_path / "reference", "--index",
              "Flat", "--keep-vectors", "float16", "--encoder", "e", "--overwrite")
    duration = run_to_end(cmd)
    new = hashlib.sha256(FeatureCache.load(tmp_path / "reference").index.reconstruct_n(0, 4000).tobytes()).hexdigest()
    assert old != new
    cmd[cmd.index(str(tmp_path / "reference"))] = str(out)
    check_kills(cmd, duration, 2, (out, ".index.faiss.*"), state, old, new)


@pytest.mark.slow
def test_cache_build_from_images_interrupted_resumes_to_the_same_cache(tmp_path):
    """Kills during encoding leave only complete, checksummed shards; the re-run finishes the same cache."""
    from PIL import Image

    sources = []
    for i in range(12):
        Image.fromarray(np.full((48, 64, 3), (20 * i, 255 - 20 * i, 90), np.uint8)).save(tmp_path / f"{i:02d}.png")
        sources.append(str(tmp_path / f"{i:02d}.png"))
    (tmp_path / "images.txt").write_text("\n".join(sources))
    kwargs = json.loads((FIXTURES / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    (tmp_path / "small.json").write_text(json.dumps(kwargs))

    def cmd(out: Path) -> list[str]:
        return cli("cache", "build", "--images", tmp_path / "images.txt", "--out", out, "--imagebind",
                   FIXTURES / "imagebind" / "imagebind_small.pth", "--config", tmp_path / "small.json",
                   "--shard-size", "2", "--batch-size", "1", "--no-progress", "--index", "Flat")

    duration = run_to_end(cmd(tmp_path / "reference"))
    out = tmp_path / "cache"
    for sig, delay, watched in kill_plan(3, duration):
        if (out / "meta.json").exists():
            break
        interrupt(cmd(out), sig, delay=delay, watch=(out / FEATURES_DIR, ".shard-*") if watched else None)
        features = out / FEATURES_DIR
        if (features / "plan.json").exists():
            plan = read_plan(out)
            for marker in features.glob("shard-*.done"):
                assert _shard_is_done(features, plan, int(marker.stem[6:]), verify=True), marker
    if not (out / "meta.json").exists():
        run_to_end(cmd(out))
    got, want = FeatureCache.load(out, verify=True), FeatureCache.load(tmp_path / "reference")
    assert got.sources == want.sources
    np.testing.assert_array_equal(got.index.reconstruct_n(0, 12), want.index.reconstruct_n(0, 12))
