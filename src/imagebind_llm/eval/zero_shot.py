"""Zero-shot evaluation of ImageBind embeddings: classification and cross-modal retrieval.

Classification embeds each class name through text prompt templates (``"a photo of a {}."``), averages
the normalised template embeddings per class and predicts the class whose embedding is closest to the
item's (as ImageBind and CLIP do; the same text templates serve audio, depth, thermal, ...).
Retrieval ranks every target for every query by cosine similarity and reports recall@k both ways.

Datasets:

- a folder with one subfolder per class, holding files of one modality (chosen by extension);
- a manifest: a TSV file whose header names modalities (``image<TAB>text``), or a JSONL file whose rows
  have modality keys (``{"image": "a.jpg", "text": ["a dog", "a puppy"]}``; a list gives several
  values). Relative paths are relative to the manifest. An item repeated on several rows (or a list)
  gives it several correct partners (many captions per image). A ``label`` column makes a manifest a
  classification set.

Features are computed in batches and, with a cache folder, stored as ``.npy`` keyed by a hash of the
model id, the modality and the sources (paths with their size and modification time), so a rerun
skips encoding.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imagebind_llm.engine import UnknownModalityError, modality

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ("a {}.", "the {}.", "a photo of a {}.", "a photo of the {}.", "an example of a {}.")
SUFFIXES = {  # the files a class folder contributes, per modality
    "image": (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg", ".mp3", ".m4a", ".aac", ".opus"),
    "video": (".mp4", ".avi", ".mov", ".mkv", ".webm"),
    "point": (".npy", ".pt", ".ply", ".pcd", ".xyz", ".pts", ".obj"),
    "depth": (".png", ".npy", ".tif", ".tiff"),
    "thermal": (".png", ".jpg", ".jpeg", ".npy", ".tif", ".tiff"),
    "imu": (".npy", ".csv", ".txt"),
}
LABEL = "label"  # the manifest column that makes it a classification set
RECALL_KS = (1, 5, 10)


class Embedder(Protocol):
    """What the evaluation needs of a model: ``embed_modality(name, batch [B, ...]) -> [B, D]``
    (`imagebind_llm.model.ImageBindLLM` has it; `EncoderEmbedder` wraps a bare ImageBind)."""

    def embed_modality(self, name: str, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class EncoderEmbedder:
    """A bare ImageBind encoder (``encoder({tower: x}) -> {tower: [B, D]}``) as an `Embedder`."""

    encoder: nn.Module

    @torch.inference_mode()
    def embed_modality(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 embeddings ``[B, D]`` of one modality batch ``[B, ...]``."""
        weight = next(self.encoder.parameters())
        x = x.to(weight.device, weight.dtype) if x.is_floating_point() else x.to(weight.device)
        tower = modality(name).tower
        return F.normalize(self.encoder({tower: x})[tower].float(), dim=-1)


@dataclass(frozen=True)
class ClassificationSet:
    """``sources[i]`` (a path, or text) belongs to ``classes[labels[i]]``."""

    sources: list[str]
    labels: list[int]
    classes: list[str]


@dataclass(frozen=True)
class PairedSet:
    """Distinct queries and targets; ``positives[i]`` holds the indices of the targets that match query ``i``."""

    queries: list[str]
    targets: list[str]
    positives: list[frozenset[int]]


# ------------------------------------------------------------------------------------------- datasets
def read_folder(root: str | Path, name: str) -> ClassificationSet:
    """A folder with one subfolder per class (its name, ``_`` read as a space) of ``name`` files.

    Raises:
        ValueError: no class folder, or a modality without files (text).
    """
    root = Path(root)
    suffixes = SUFFIXES.get(modality(name).name)
    if suffixes is None:
        raise ValueError(f"a class folder cannot hold {name} files; use a manifest with a {name!r} column")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    sources, labels = [], []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
        sources += [str(p) for p in files]
        labels += [label] * len(files)
    if not sources:
        raise ValueError(f"no {name} files ({', '.join(suffixes)}) in class subfolders of {root}")
    return ClassificationSet(sources, labels, [p.name.replace("_", " ") for p in folders])


def read_manifest(path: str | Path) -> list[dict[str, list[str]]]:
    """Rows of a ``.tsv`` (header: column names) or ``.jsonl`` manifest as ``{column: [values]}``.

    Raises:
        ValueError: another extension, or a JSONL line that is not an object of strings (or lists of them).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".tsv":
        return [{k: [v] for k, v in row.items() if v} for row in csv.DictReader(text.splitlines(), delimiter="\t")]
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: a manifest is a .tsv file (with a header) or a .jsonl file")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append({k: [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in row.items()})
    return rows


def paired_set(rows: Sequence[dict[str, list[str]]], query: str, target: str, base: Path) -> PairedSet:
    """The distinct ``query`` and ``target`` values of manifest rows and which pairs match."""
    queries: dict[str, int] = {}
    targets: dict[str, int] = {}
    matches: dict[int, set[int]] = {}
    for row in rows:
        for q in _column(row, query, base):
            for t in _column(row, target, base):
                matches.setdefault(queries.setdefault(q, len(queries)), set()).add(targets.setdefault(t, len(targets)))
    if not matches:
        raise ValueError(f"no rows with both {query!r} and {target!r} values in the manifest")
    return PairedSet(list(queries), list(targets), [frozenset(matches[i]) for i in range(len(queries))])


def labelled_set(rows: Sequence[dict[str, list[str]]], query: str, base: Path) -> ClassificationSet:
    """A classification set from manifest rows with a ``label`` column."""
    pairs = [(source, row[LABEL][0]) for row in rows if LABEL in row for source in _column(row, query, base)]
    if not pairs:
        raise ValueError(f"classifying a manifest needs {query!r} and {LABEL!r} columns")
    classes = sorted({label for _, label in pairs})
    index = {c: i for i, c in enumerate(classes)}
    return ClassificationSet([s for s, _ in pairs], [index[label] for _, label in pairs], classes)


def _column(row: dict[str, list[str]], name: str, base: Path) -> list[str]:
    """A row's values of modality ``name`` (its column spelled as any of the modality's names, e.g. ``vision``
    for ``image``), file paths made absolute against ``base``."""
    entry = modality(name)
    values = next((v for key, v in row.items() if key != LABEL and _modality_or_none(key) is entry), [])
    return [str(base / v) for v in values] if entry.is_file else values


def _modality_or_none(name: str):
    try:
        return modality(name)
    except UnknownModalityError:
        return None


# ------------------------------------------------------------------------------------------- features
@dataclass(frozen=True)
class FeatureCache:
    """Feature matrices ``[N, D]`` as ``ROOT/<hash>.npy``, keyed by model id, modality and sources."""

    root: Path

    def path(self, model_id: str, name: str, sources: Sequence[str]) -> Path:
        """Where the features of ``sources`` are stored; a file's size and modification time are part of its key."""
        entry = modality(name)
        items = [_file_key(s) for s in sources] if entry.is_file else list(sources)
        digest = hashlib.sha256(json.dumps([model_id, entry.name, items]).encode()).hexdigest()[:32]
        return self.root / f"{entry.name}-{digest}.npy"


def _file_key(source: str) -> str:
    stat = Path(source).stat()
    return f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def encode(embedder: Embedder, name: str, sources: Sequence[str], *, batch_size: int = 32,
           cache: FeatureCache | None = None, model_id: str = "") -> torch.Tensor:
    """L2-normalised features ``[N, D]`` of ``N`` sources (paths, or strings for text), ``batch_size`` a call.

    With a ``cache``, features stored for the same ``model_id``, modality and sources are read instead.
    """
    path = cache.path(model_id, name, sources) if cache is not None else None
    if path is not None and path.is_file():
        log.info("%s features read from %s", name, path)
        return torch.from_numpy(np.load(path))
    entry = modality(name)
    batches = [embedder.embed_modality(entry.name, entry.load(list(sources[i:i + batch_size])))
               for i in range(0, len(sources), batch_size)]
    features = F.normalize(torch.cat(batches).float(), dim=-1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, features.numpy())
    return features


def class_features(embedder: Embedder, classes: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                   **options) -> torch.Tensor:
    """``[C, D]``: each class name through every template, embedded as text, normalised, averaged,
    normalised again. ``options`` go to `encode`."""
    prompts = [t.format(c) for c in classes for t in templates]
    features = encode(embedder, "text", prompts, **options).view(len(classes), len(templates), -1)
    return F.normalize(features.mean(dim=1), dim=-1)


# ------------------------------------------------------------------------------------------- metrics
def classify(features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Predicted class ``[N]`` (long) of items ``[N, D]`` given class embeddings ``[C, D]``: the most similar."""
    return (features @ classes.T).argmax(dim=1)


def topk_accuracy(similarity: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of ``similarity [N, C]`` whose label ``labels [N]`` is among their ``k`` best columns."""
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def recall_at_k(similarity: torch.Tensor, k: int, positives: Sequence[frozenset[int]] | None = None) -> float:
    """Fraction of rows of ``similarity [N, M]`` with a correct column among their ``k`` most similar.

    ``positives[i]`` are row ``i``'s correct columns; default: the diagonal (column ``i``).
    """
    n = similarity.shape[0]
    positives = positives if positives is not None else [frozenset([i]) for i in range(n)]
    if len(positives) != n:
        raise ValueError(f"{len(positives)} positive sets for {n} rows")
    top = similarity.topk(min(k, similarity.shape[1]), dim=1).indices.tolist()
    return sum(bool(positives[i].intersection(top[i])) for i in range(n)) / n


def transpose(positives: Sequence[frozenset[int]], columns: int) -> list[frozenset[int]]:
    """The matches seen from the columns: ``out[j]`` holds the rows ``i`` with ``j in positives[i]``."""
    out: list[set[int]] = [set() for _ in range(columns)]
    for i, row in enumerate(positives):
        for j in row:
            out[j].add(i)
    return [frozenset(s) for s in out]


# ------------------------------------------------------------------------------------------- evaluations
def evaluate_classification(embedder: Embedder, data: ClassificationSet, query: str,
                            templates: Sequence[str] = DEFAULT_TEMPLATES, **options) -> dict[str, float]:
    """``{"top1", "top5", "items", "classes"}`` of zero-shot classification of ``query`` items."""
    items = encode(embedder, query, data.sources, **options)
    similarity = items @ class_features(embedder, data.classes, templates, **options).T
    labels = torch.tensor(data.labels)
    return {"top1": topk_accuracy(similarity, labels, 1), "top5": topk_accuracy(similarity, labels, 5),
            "items": len(data.sources), "classes": len(data.classes)}


def evaluate_retrieval(embedder: Embedder, data: PairedSet, query: str, target: str,
                       **options) -> dict[str, float]:
    """``{"<query>_to_<target>_R@k", "<target>_to_<query>_R@k" for k in 1, 5, 10, "queries", "targets"}``."""
    similarity = encode(embedder, query, data.queries, **options) @ encode(embedder, target, data.targets, **options).T
    back = transpose(data.positives, len(data.targets))
    metrics: dict[str, float] = {}
    for k in RECALL_KS:
        metrics[f"{query}_to_{target}_R@{k}"] = recall_at_k(similarity, k, data.positives)
        metrics[f"{target}_to_{query}_R@{k}"] = recall_at_k(similarity.T, k, back)
    return {**metrics, "queries": len(data.queries), "targets": len(data.targets)}
