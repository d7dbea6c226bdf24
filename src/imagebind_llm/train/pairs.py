"""Paired data for `train bind`: manifests (or a generator) -> pairs -> model-ready tensors -> batches.

A pair is ``{modality: source}`` with encoder modality names (`imagebind_llm.encoders.MODALITIES`); a
source is a file path, an ``archive.tar::member``, or for ``text`` the text itself. Formats (from the
suffix):

* ``.jsonl``: one pair per line, e.g. ``{"vision": "scenes/1.png", "audio": "audio/1.wav"}`` or
  ``{"vision": "scenes/1.png", "text": "a red cube on the left"}``; paths relative to the manifest's folder,
  keys that name no modality (``id``, ``label``) ignored;
* ``.tsv``: a header row naming the modalities (``vision<TAB>text``), then one pair per row, likewise;
* ``.tar`` (webdataset): members ``{key}.{field}``, grouped by key; the field's first part names the modality
  (``0001.vision.png``, ``0001.audio.wav``, ``0001.text.txt``), and the webdataset habits ``0001.jpg`` (vision)
  and ``0001.txt`` (text) work too.

Files are read with the project's inference preprocessing (the loaders of the one modality table,
`imagebind_llm.model.media`), so a cached anchor feature equals the live one. A generator
(``data.generator: module:function``) is a callable ``seed -> iterator of {modality: tensor}`` giving
preprocessed items instead; `toy_pairs` is one (a tiny task for smoke runs and tests).
"""

from __future__ import annotations

import csv
import importlib
import itertools
import json
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from imagebind_llm.cache.shards import IMAGE_SUFFIXES, TAR_SEP, read_image_bytes
from imagebind_llm.encoders import MODALITIES
from imagebind_llm.model.media import modality
from imagebind_llm.preprocess import MediaError, tokenize
from imagebind_llm.train.data import DataFormatError, tar_files

Pair = dict[str, str]
Generator = Callable[[int], Iterator[Mapping[str, torch.Tensor]]]
FEATURES = "anchor_features"  # batch key of the anchor side read from a feature store, [B, D]


# -------------------------------------------------------------------- manifests
def read_pairs(paths: Sequence[str | Path], modalities: Sequence[str]) -> list[Pair]:
    """The pairs of every manifest of ``paths``, in order, each holding (at least) ``modalities``.

    Raises:
        FileNotFoundError: a manifest does not exist.
        DataFormatError: an unsupported suffix, an empty manifest, or a pair lacking one of ``modalities``.
    """
    pairs: list[Pair] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"paired manifest {path} does not exist")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            new = _read_jsonl(path)
        elif suffix == ".tsv":
            with path.open(newline="", encoding="utf-8") as f:
                new = [(f"{path}:{i + 2}", _resolve(row, path.parent))
                       for i, row in enumerate(csv.DictReader(f, delimiter="\t"))]
        elif suffix == ".tar":
            new = _read_tar(path)
        else:
            raise DataFormatError(f"{path}: unsupported paired manifest type {suffix!r}; use .jsonl, .tsv or "
                                  "webdataset .tar shards")
        if not new:
            raise DataFormatError(f"{path} holds no pairs")
        for where, pair in new:
            missing = [m for m in modalities if m not in pair]
            if missing:
                raise DataFormatError(f"{where}: the pair has no {missing} (it has {sorted(pair)}); every pair "
                                      f"needs {list(modalities)}")
            pairs.append({m: pair[m] for m in modalities})
    return pairs


def _read_jsonl(path: Path) -> list[tuple[str, Pair]]:
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: invalid JSON ({e})") from None
        if not isinstance(row, dict) or not all(isinstance(v, str) for k, v in row.items() if k in MODALITIES):
            raise DataFormatError(f"{where}: expected an object of modality -> path (or text) strings, got {row!r}")
        pairs.append((where, _resolve(row, path.parent)))
    return pairs


def _resolve(row: Mapping[str, Any], root: Path) -> Pair:
    """The modality entries of ``row``, file paths made relative to ``root`` (the manifest's folder)."""
    return {m: v if m == "text" or Path(v).is_absolute() else str(root / v) for m, v in row.items() if m in MODALITIES}


def _read_tar(path: Path) -> list[tuple[str, Pair]]:
    groups: dict[str, Pair] = {}
    with tarfile.open(path) as tar:
        for key, suffix, member in tar_files(tar):
            name = _tar_field_modality(suffix[1:])
            if name == "text":
                groups.setdefault(key, {})[name] = tar.extractfile(member).read().decode("utf-8").strip()
            elif name is not None:
                groups.setdefault(key, {})[name] = f"{path}{TAR_SEP}{member.name}"
    return [(f"{path}::{key}", groups[key]) for key in sorted(groups)]


def _tar_field_modality(field: str) -> str | None:
    """``vision.png`` -> vision, ``text.txt``/``txt`` -> text, ``jpg`` -> vision; None for other members."""
    head = field.split(".", 1)[0]
    if head in MODALITIES:
        return head
    if head == "txt":
        return "text"
    return "vision" if f".{head}" in IMAGE_SUFFIXES else None


def load_item(name: str, source: str) -> torch.Tensor:
    """One source of modality ``name`` as the encoder's input item (no batch axis), e.g. ``[3, 224, 224]``.

    Raises:
        DataFormatError: the file cannot be read or decoded (naming it).
    """
    entry = modality(name)
    try:
        return entry.load([read_image_bytes(source) if entry.is_file else source])[0]
    except (MediaError, OSError) as e:
        problem = e.problem if isinstance(e, MediaError) else str(e)
        raise DataFormatError(f"{source} ({name}): {problem}; fix or remove the pair") from None


# -------------------------------------------------------------------- generators
def generated_pairs(spec: str, n: int, seed: int, modalities: Sequence[str]) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` pairs of the generator ``spec`` (``"package.module:function"``) started with ``seed``.

    Raises:
        ValueError: ``spec`` is not ``module:function``, gives fewer than ``n`` pairs, or pairs without
            ``modalities`` tensors.
    """
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"data.generator={spec!r} must look like package.module:function")
    generator: Generator = getattr(importlib.import_module(module), name)
    pairs = [dict(p) for p in itertools.islice(generator(seed), n)]
    if len(pairs) < n:
        raise ValueError(f"data.generator {spec} gave {len(pairs)} pairs, {n} were asked for")
    bad = next((p for p in pairs if not all(isinstance(p.get(m), torch.Tensor) for m in modalities)), None)
    if bad is not None:
        raise ValueError(f"data.generator {spec} gave a pair with keys {sorted(bad)}; each must map "
                         f"{list(modalities)} to tensors")
    return [{m: p[m] for m in modalities} for p in pairs]


TOY_COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
               "yellow": (1.0, 1.0, -1.0)}
TOY_PLACES = ("top left", "top right", "bottom left", "bottom right")


def toy_pairs(seed: int, size: int = 224) -> Iterator[dict[str, torch.Tensor]]:
    """A tiny vision-text task: pair ``i`` is a noisy image ``[3, size, size]`` holding a coloured square in
    one quadrant and the tokens ``[77]`` of its description ("a red square at the top left"); the 16
    colour x place combinations cycle, so any 16 consecutive pairs hold each once. Noise from ``seed``."""
    combos = [(c, p) for p in range(len(TOY_PLACES)) for c in TOY_COLOURS]
    tokens = tokenize([f"a {c} square at the {TOY_PLACES[p]}" for c, p in combos])
    generator = torch.Generator().manual_seed(seed)
    half = size // 2
    for i in itertools.count():
        colour, place = combos[i % len(combos)]
        image = 0.05 * torch.randn(3, size, size, generator=generator)
        top, left = half * (place // 2), half * (place % 2)
        image[:, top : top + half, left : left + half] += torch.tensor(TOY_COLOURS[colour])[:, None, None]
        yield {"vision": image, "text": tokens[i % len(combos)]}


# -------------------------------------------------------------------- dataset
class PairDataset(Dataset):
    """Pairs -> items ``{modality: tensor}``; indexed by ``(epoch, index)`` as `imagebind_llm.train.data.batch_order`
    yields (the items do not depend on the epoch: preprocessing is deterministic).

    Args:
        pairs: sources (`read_pairs`) or preprocessed tensors (`generated_pairs`).
        features: optional feature store with one row per pair for ``anchor``: its rows replace the anchor
            items (key ``FEATURES``, ``[D]``) and the anchor files are not read.
        anchor: the modality ``features`` holds.
    """

    def __init__(self, pairs: Sequence[Mapping[str, str | torch.Tensor]], features: Any = None,
                 anchor: str | None = None) -> None:
        if features is not None and len(features) != len(pairs):
            raise ValueError(f"the anchor feature store has {len(features)} rows for {len(pairs)} pairs")
        self.pairs, self.features, self.anchor = list(pairs), features, anchor

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        _, index = key
        item = {}
        for name, value in self.pairs[index].items():
            if self.features is not None and name == self.anchor:
                item[FEATURES] = torch.tensor(np.asarray(self.features[index]), dtype=torch.float32)
            else:
                item[name] = value if isinstance(value, torch.Tensor) else load_item(name, value)
        return item


def collate_pairs(items: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items into ``{modality: [B, ...]}`` (and ``FEATURES`` ``[B, D]``)."""
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}
