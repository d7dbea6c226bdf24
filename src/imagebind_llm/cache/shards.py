"""The feature shard store: images encoded once into resumable shards, read by the cache build and by training.

A store lives in a folder ``out`` (a cache folder, or a training ``data.features`` folder)::

    out/features/plan.json          {"sources", "shard_size", "encoder"}: fixed for the store
    out/features/shard-00000.npy    [m, D] unit-norm features of sources [0, m)
    out/features/shard-00000.done   {"count", "dim", "bytes", "sha256", "key", "skipped"}: the shard's record

Sources are image paths or ``archive.tar::member`` (a member of a webdataset shard). A shard and its
``.done`` marker are renamed into place together, the marker last; a shard with a valid marker (its
checksum is verified on resume) is never encoded again, so re-running the same command after an
interruption resumes where it stopped. The marker's ``key`` hashes the encoder and the shard's sources:
when the source list changes (``overwrite``), the shards whose sources still match are kept. Images that
cannot be read fail the extraction, or with ``skip_bad`` are left out and listed in ``skipped``. Under
``torchrun`` every process (``RANK`` of ``WORLD_SIZE``) encodes the shards ``i`` with
``i % WORLD_SIZE == RANK``; no process group is needed.

Writers: `extract_features` (any ``sources -> [n, D]`` function) and `extract_image_features` (ImageBind
from an official checkpoint; the ``imagebind-llm cache extract`` command). Reader: `FeatureStore`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from imagebind_llm.cache.feature_cache import DEFAULT_ENCODER, CacheError, check_unit_norm
from imagebind_llm.encoders import load_official
from imagebind_llm.hub import fetch, sha256_file
from imagebind_llm.hub.files import atomic_files, atomic_write, make_dir
from imagebind_llm.preprocess import MediaError, load_images

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
PLAN_FILE = "plan.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TAR_SEP = "::"  # "archive.tar::member" addresses an image inside a webdataset shard
EncodeFn = Callable[[list[str]], np.ndarray]  # sources -> [n, D] unit-norm features; may raise UnreadableImage


class UnreadableImage(CacheError):
    """An image source that cannot be read or decoded; an `EncodeFn` raises it to name the source."""

    def __init__(self, source: str, problem: str) -> None:
        self.source, self.problem = source, problem
        super().__init__(f"cannot read image {source}: {problem}; fix or remove it (finished shards are kept), "
                         "or pass --skip-bad to leave unreadable images out")


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
        CacheError: the plan file is malformed.
    """
    path = Path(out) / FEATURES_DIR / PLAN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a feature store (no {FEATURES_DIR}/{PLAN_FILE}); create it with "
                                "`imagebind-llm cache extract`")
    try:
        return ShardPlan(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise CacheError(f"{path} is not a valid shard plan ({e}); extract into a new --out folder") from None


def _write_plan(features_dir: Path, plan: ShardPlan, overwrite: bool) -> None:
    """Record the plan, or check that a resumed extraction uses the same one.

    With ``overwrite``, a different plan replaces the old one and the shards that no longer match it go.
    """
    path = features_dir / PLAN_FILE
    if path.is_file():
        old = asdict(read_plan(features_dir.parent))
        if old == asdict(plan):
            return
        changed = ", ".join(k for k, v in asdict(plan).items() if old.get(k) != v)
        if not overwrite:
            raise CacheError(f"{features_dir} holds an extraction with different {changed}; re-run with the same "
                             "arguments to resume it, pass --overwrite to extract these instead (finished shards "
                             "whose images still match are kept), or use another --out folder")
        kept = _drop_stale_shards(features_dir, plan)
        log.warning("%s: new %s; keeping the %d finished shards that still match", features_dir, changed, kept)
    with atomic_write(path) as tmp:  # every rank writes the same plan, so the last rename wins harmlessly
        tmp.write_text(json.dumps(asdict(plan)))


def _shard_key(plan: ShardPlan, i: int) -> str:
    """What shard ``i`` of ``plan`` holds: a hash of the encoder and of the shard's sources."""
    return hashlib.sha256(json.dumps([plan.encoder, plan.shard_sources(i)]).encode()).hexdigest()


def _read_marker(marker: Path) -> dict[str, Any] | None:
    """A shard's ``.done`` record, or None when it is missing or unreadable."""
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _drop_stale_shards(features_dir: Path, plan: ShardPlan) -> int:
    """Remove the finished shards that do not hold what ``plan`` puts there; returns how many are kept."""
    kept = 0
    for marker in sorted(features_dir.glob("shard-*.done")):
        i = int(marker.stem.removeprefix("shard-"))
        info = _read_marker(marker)
        if i < plan.n_shards and info is not None and info.get("key") == _shard_key(plan, i):
            kept += 1
            continue
        marker.unlink(missing_ok=True)  # missing_ok: other ranks may be dropping it too
        shard_path(features_dir, i).unlink(missing_ok=True)
    return kept


def _shard_is_done(features_dir: Path, plan: ShardPlan, i: int, *, verify: bool = False) -> bool:
    """Whether shard ``i`` is finished: its marker matches the plan and the file's size (``verify``: and
    its SHA-256; a shard failing it is logged and encoded again)."""
    marker, path = _marker_path(features_dir, i), shard_path(features_dir, i)
    info = _read_marker(marker) if path.is_file() else None
    if info is None or not isinstance(info.get("skipped", []), list):
        return False
    key = _shard_key(plan, i)
    count = len(plan.shard_sources(i)) - len(info.get("skipped", []))
    if info.get("key", key) != key or info.get("count") != count or path.stat().st_size != info.get("bytes"):
        return False
    if verify and sha256_file(path) != info.get("sha256"):
        log.warning("%s fails its SHA-256 check: encoding it again", path)
        return False
    return True


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
    skip_bad: bool = False,
    overwrite: bool = False,
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
        skip_bad: leave out the images `encode_images` reports as unreadable (`UnreadableImage`); they
            are listed in their shard's marker and missing from `FeatureStore`.
        overwrite: replace a store planned for other sources, shard size or encoder, keeping the
            finished shards whose encoder and sources still match.

    Returns:
        The shard numbers this call encoded (finished shards are skipped).

    Raises:
        UnreadableImage: an image cannot be read (without ``skip_bad``); the finished shards are kept.
        CacheError: ``out`` holds a store of another plan (without ``overwrite``).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size}, {batch_size}")
    if rank is None or world_size is None:
        rank, world_size = dist_rank()
    plan = ShardPlan(list(sources), shard_size, encoder)
    features_dir = make_dir(Path(out) / FEATURES_DIR, "feature store folder")
    _write_plan(features_dir, plan, overwrite)
    mine = range(rank, plan.n_shards, world_size)
    todo = [i for i in mine if not _shard_is_done(features_dir, plan, i, verify=True)]
    log.info("rank %d/%d: %d of its %d shards left to encode", rank, world_size, len(todo), len(mine))
    total = sum(len(plan.shard_sources(i)) for i in todo)
    with tqdm(total=total, unit="img", disable=not progress, desc=f"encode[{rank}]") as bar:
        for i in todo:
            _encode_shard(features_dir, plan, i, encode_images, batch_size, dtype, bar, skip_bad)
    return todo


def _encode_shard(features_dir: Path, plan: ShardPlan, i: int, encode_images: EncodeFn, batch_size: int,
                  dtype: str, bar: tqdm, skip_bad: bool) -> None:
    """Encode shard ``i`` and rename it into place with its marker (the marker last)."""
    sources = plan.shard_sources(i)
    parts, skipped = [], []
    for start in range(0, len(sources), batch_size):
        batch = list(sources[start : start + batch_size])
        feats = _encode_batch(batch, encode_images, skipped if skip_bad else None)
        if feats is not None:
            parts.append(feats.astype(dtype))
        bar.update(len(batch))
    if not parts:
        raise CacheError(f"all {len(sources)} images of shard {i} are unreadable (e.g. {skipped[0]}); check the "
                         "image list")
    feats = np.concatenate(parts)
    with atomic_files(shard_path(features_dir, i), _marker_path(features_dir, i)) as (npy, marker):
        np.save(npy, feats)
        marker.write_text(json.dumps({"count": len(feats), "dim": feats.shape[1], "bytes": npy.stat().st_size,
                                      "sha256": sha256_file(npy), "key": _shard_key(plan, i), "skipped": skipped}))


def _encode_batch(batch: list[str], encode_images: EncodeFn, skipped: list[str] | None) -> np.ndarray | None:
    """``encode_images(batch)`` checked; with a ``skipped`` list, unreadable images are left out and listed
    there (None when none is left)."""
    batch = list(batch)
    while batch:
        try:
            feats = _to_numpy(encode_images(batch))
        except UnreadableImage as e:
            if skipped is None or e.source not in batch:
                raise
            log.warning("leaving out %s: %s", e.source, e.problem)
            skipped.append(e.source)
            batch.remove(e.source)
            continue
        if feats.ndim != 2 or len(feats) != len(batch):
            raise ValueError(f"encode_images returned shape {feats.shape} for {len(batch)} images; expected [n, D]")
        check_unit_norm(feats, f"features of {batch[0]}...")
        return feats
    return None


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

    def load(source: str) -> torch.Tensor:
        try:
            return load_images(read_image_bytes(source))
        except (MediaError, OSError) as e:
            raise UnreadableImage(source, e.problem if isinstance(e, MediaError) else str(e)) from None

    @torch.inference_mode()
    def encode(sources: list[str]) -> np.ndarray:
        images = torch.cat([load(s) for s in sources]).to(device)
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

    Images left out as unreadable (``skip_bad``) have no row: `sources` lists the ones that do.

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
        if missing := missing_shards(path):
            raise CacheError(f"{len(missing)} shards of {path} are not finished (e.g. {missing[:5]}); re-run the "
                             "extraction to encode them")
        features_dir = Path(path) / FEATURES_DIR
        skipped = [_read_marker(_marker_path(features_dir, i)).get("skipped", []) for i in range(plan.n_shards)]
        self.sources = [s for i, left in enumerate(skipped) for s in plan.shard_sources(i) if s not in left]
        if sources is not None and list(sources) != self.sources:
            left_out = [s for shard in skipped for s in shard]
            if left_out and list(sources) == plan.sources:
                raise ValueError(f"{len(left_out)} images were left out of the feature store {path} as unreadable "
                                 f"(e.g. {left_out[0]}); remove them from the data, or fix them and extract again")
            raise ValueError(f"the feature store {path} was extracted from other images (or another order) than "
                             "the ones given; extract again for these sources")
        self.encoder = plan.encoder
        self.paths = [shard_path(features_dir, i) for i in range(plan.n_shards)]
        self.shards = [np.load(p, mmap_mode="r") for p in self.paths]
        self.starts = np.cumsum([0] + [len(a) for a in self.shards])[:-1]
        self.dim = self.shards[0].shape[1]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a feature store of {len(self)} rows")
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.shards[shard][index - self.starts[shard]]
