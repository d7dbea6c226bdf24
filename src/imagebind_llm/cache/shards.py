"""The feature shard store: images encoded once into resumable shards, read by the cache build and by training.

A store lives in a folder ``out`` (a cache folder, or a training ``data.features`` folder)::

    out/features/plan.json          {"sources", "shard_size", "encoder"}: fixed for the store
    out/features/shard-00000.npy    [m, D] unit-norm features of sources [0, m)
    out/features/shard-00000.done   {"count", "dim", "bytes", "sha256"}: written after the shard

Sources are image paths or ``archive.tar::member`` (a member of a webdataset shard). A shard with a
valid ``.done`` marker is never encoded again, so re-running the same command after an interruption
resumes where it stopped. Under ``torchrun`` every process (``RANK`` of ``WORLD_SIZE``) encodes the
shards ``i`` with ``i % WORLD_SIZE == RANK``; no process group is needed.

Writers: `extract_features` (any ``sources -> [n, D]`` function) and `extract_image_features` (ImageBind
from an official checkpoint; the ``imagebind-llm cache extract`` command). Reader: `FeatureStore`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from imagebind_llm.cache.feature_cache import DEFAULT_ENCODER, CacheError, check_unit_norm
from imagebind_llm.encoders import load_official
from imagebind_llm.hub import fetch, sha256_file
from imagebind_llm.preprocess import load_images

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
PLAN_FILE = "plan.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SEP = "::"  # "archive.tar::member" addresses an image inside a webdataset shard
EncodeFn = Callable[[list[str]], np.ndarray]  # sources -> [n, D] unit-norm features (numpy or torch)


# -------------------------------------------------------------------- image sources
def list_images(source: str | Path) -> list[str]:
    """Image sources from a folder (recursive, sorted) or a text file with one source per line."""
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


@functools.lru_cache(maxsize=64)
def _tar_index(path: str) -> dict[str, tuple[int, int]]:
    """``{member name: (data offset, size)}`` of a tar shard, scanned once per process."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}


def read_image_bytes(source: str) -> bytes | str:
    """A path as-is, or the bytes of an ``archive.tar::member`` image (read by offset, no archive scan)."""
    if TAR_SEP in source and not Path(source).exists():
        tar_path, member = source.split(TAR_SEP, 1)
        index = _tar_index(tar_path)
        if member not in index:
            raise FileNotFoundError(f"{tar_path} has no member {member!r}")
        offset, size = index[member]
        with open(tar_path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    return source


# -------------------------------------------------------------------- the plan and the shard files
@dataclass(frozen=True)
class ShardPlan:
    """What a store holds: ``sources`` in row order, cut into shards of ``shard_size``, encoded by ``encoder``."""

    sources: list[str]
    shard_size: int
    encoder: str

    @property
    def n_shards(self) -> int:
        return -(-len(self.sources) // self.shard_size)

    def shard_sources(self, i: int) -> list[str]:
        return self.sources[i * self.shard_size : (i + 1) * self.shard_size]


def shard_path(features_dir: Path, i: int) -> Path:
    return features_dir / f"shard-{i:05d}.npy"


def _marker_path(features_dir: Path, i: int) -> Path:
    return features_dir / f"shard-{i:05d}.done"


def read_plan(out: str | Path) -> ShardPlan:
    """The plan of the store in ``out``.

    Raises:
        FileNotFoundError: ``out`` holds no store.
    """
    path = Path(out) / FEATURES_DIR / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a feature store (no {FEATURES_DIR}/{PLAN_FILE}); create it with "
                                "`imagebind-llm cache extract`")
    return ShardPlan(**json.loads(path.read_text()))


def _write_plan(features_dir: Path, plan: ShardPlan) -> None:
    """Record the plan, or check that a resumed extraction uses the same one."""
    path = features_dir / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != asdict(plan):
            changed = [k for k, v in asdict(plan).items() if old.get(k) != v]
            raise CacheError(f"{features_dir} holds an extraction with different {', '.join(changed)}; resume or "
                             "reuse it with the same arguments, or use another --out folder")
        return
    tmp = path.with_name(f"{PLAN_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(plan)))
    os.replace(tmp, path)  # every rank writes the same plan, so the last rename wins harmlessly


def _shard_is_done(features_dir: Path, plan: ShardPlan, i: int) -> bool:
    marker, path = _marker_path(features_dir, i), shard_path(features_dir, i)
    if not (marker.is_file() and path.is_file()):
        return False
    info = json.loads(marker.read_text())
    return info["count"] == len(plan.shard_sources(i)) and path.stat().st_size == info["bytes"]


def missing_shards(out: str | Path) -> list[int]:
    """The shards of the store in ``out`` that are not finished yet."""
    plan = read_plan(out)
    features_dir = Path(out) / FEATURES_DIR
    return [i for i in range(plan.n_shards) if not _shard_is_done(features_dir, plan, i)]


def wait_for_shards(out: str | Path, timeout: float, poll: float = 10.0) -> None:
    """Block until every planned shard of ``out`` is done (rank 0 waiting for the other ranks)."""
    deadline = time.monotonic() + timeout
    while missing := missing_shards(out):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(missing)} shards of {out} are still missing after {timeout:.0f} s "
                               f"(e.g. {missing[:5]}); re-run the extraction to finish them")
        log.info("waiting for %d shards from other ranks", len(missing))
        time.sleep(poll)


def dist_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment ``torchrun`` sets; ``(0, 1)`` otherwise."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"invalid RANK={rank} for WORLD_SIZE={world}")
    return rank, world


# -------------------------------------------------------------------- writing
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
    """Encode this process's shards of ``sources`` into the store ``out``, skipping finished shards.

    Args:
        sources: image sources, in row order.
        out: the store folder (the shards go to ``out/features``).
        encode_images: ``list of sources -> [n, D]`` unit-norm features (numpy or torch).
        encoder: encoder name recorded in the plan (a resumed extraction must use the same).
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
    plan = ShardPlan(list(sources), shard_size, encoder)
    features_dir = Path(out) / FEATURES_DIR
    features_dir.mkdir(parents=True, exist_ok=True)
    _write_plan(features_dir, plan)
    mine = range(rank, plan.n_shards, world_size)
    todo = [i for i in mine if not _shard_is_done(features_dir, plan, i)]
    log.info("rank %d/%d: %d of its %d shards left to encode", rank, world_size, len(todo), len(mine))
    total = sum(len(plan.shard_sources(i)) for i in todo)
    with tqdm(total=total, unit="img", disable=not progress, desc=f"encode[{rank}]") as bar:
        for i in todo:
            _encode_shard(features_dir, i, plan.shard_sources(i), encode_images, batch_size, dtype, bar)
    return todo


def _encode_shard(features_dir: Path, i: int, sources: Sequence[str], encode_images: EncodeFn,
                  batch_size: int, dtype: str, bar: tqdm) -> None:
    parts = []
    for start in range(0, len(sources), batch_size):
        batch = list(sources[start : start + batch_size])
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


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x)


# -------------------------------------------------------------------- ImageBind
def encoder_name(config: str | Path | None) -> str:
    """The name a store or cache records for ImageBind built from ``config`` (None or ``"huge"``: the
    released model; else the JSON file's stem)."""
    return DEFAULT_ENCODER if config in (None, "huge") else Path(config).stem


def image_encoder(imagebind: str | Path | None, config: str | Path | None = None, device: str = "cpu") -> EncodeFn:
    """``list of sources -> [n, D]`` unit-norm ImageBind vision features (inference preprocessing:
    resize + centre crop).

    Args:
        imagebind: official ImageBind weights (a path or registry name).
        config: JSON of ImageBindModel arguments; None or ``"huge"``: the released huge model.
        device: torch device of the encoder.
    """

    # Loaded on first use: re-running a finished extraction (e.g. `cache build` after `cache extract`)
    # then never reads the multi-GB checkpoint.
    @functools.cache
    def model() -> torch.nn.Module:
        if not imagebind:
            raise ValueError("encoding images needs ImageBind weights (cache: --imagebind; training: model.imagebind)")
        return load_official(fetch(imagebind), None if config == "huge" else config, device=device)

    @torch.inference_mode()
    def encode(sources: list[str]) -> np.ndarray:
        images = load_images([read_image_bytes(s) for s in sources]).to(device)
        return F.normalize(model()({"vision": images})["vision"].float(), dim=-1).cpu().numpy()

    return encode


def extract_image_features(sources: Sequence[str], out: str | Path, *, imagebind: str | Path | None,
                           config: str | Path | None = None, device: str = "cpu", **options) -> list[int]:
    """Encode ``sources`` with ImageBind (`image_encoder`) into the store ``out``; ``options`` go to
    `extract_features` (shard_size, batch_size, dtype, rank, world_size, progress). Returns the shards
    this call encoded."""
    return extract_features(sources, out, image_encoder(imagebind, config, device), encoder=encoder_name(config),
                            **options)


# -------------------------------------------------------------------- reading
class FeatureStore:
    """Read-only, memory-mapped rows ``[D]`` of a finished store, in the order of its sources.

    Args:
        path: the ``out`` folder of the extraction.
        sources: when given, must equal the store's sources (guards against a store built from other
            data or another order).

    Raises:
        FileNotFoundError: no store in ``path``.
        CacheError: unfinished shards (the message says how to resume).
        ValueError: the store was built for other sources.
    """

    def __init__(self, path: str | Path, sources: Sequence[str] | None = None) -> None:
        plan = read_plan(path)
        if sources is not None and list(sources) != plan.sources:
            raise ValueError(f"the feature store {path} was extracted from other images (or another order) than "
                             "the ones given; extract again for these sources")
        if missing := missing_shards(path):
            raise CacheError(f"{len(missing)} shards of {path} are not finished (e.g. {missing[:5]}); re-run the "
                             "extraction to encode them")
        self.sources, self.shard_size, self.encoder = plan.sources, plan.shard_size, plan.encoder
        self.paths = [shard_path(Path(path) / FEATURES_DIR, i) for i in range(plan.n_shards)]
        self.shards = [np.load(p, mmap_mode="r") for p in self.paths]
        self.dim = self.shards[0].shape[1]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> np.ndarray:
        shard, row = divmod(index, self.shard_size)
        return self.shards[shard][row]
