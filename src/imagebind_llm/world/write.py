"""Write a world folder (layout: see the package docstring), atomically and reproducibly.

Every scene and cloud draws from its own generator ``default_rng([seed, split, stream, index])``, so one item
never depends on how many others there are, and the same seed gives byte-identical files. The folder is built
under a temporary name next to ``out`` and renamed into place at the end; a failure or an interrupt removes it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .audio import SAMPLE_RATE, SPEEDS, VOICES, espeak_missing, speak, write_wav
from .language import MME_SUBTASKS, QA, caption, mme_pair, questions
from .points import POINTS_PER_CLOUD, PRIMITIVES, point_cloud, render_primitive, sample_solid
from .scene import (COLOURS, DIGIT_HELDOUT_EVERY, FONTS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, WORDS, Scene,
                    WorldError, counterfactual, digit_indices, digit_scans, font, heldout_pairs, render_scene,
                    sample_scene)

log = logging.getLogger(__name__)

SPLITS = {"train": 0, "heldout": 1}
SCENE_STREAM, CLOUD_STREAM, PAIRS_STREAM, VARIANT_STREAM = 0, 1, 2, 3
HELDOUT_TEXT = ("none", "sign", "none", "digit")  # held-out scene i: text HELDOUT_TEXT[i % 4], 1 + i % 3 shapes
FORMAT = 1
RENDER_QUESTION = "What object is this?"


@dataclass(frozen=True)
class SceneRecord:
    """A scene with everything said about it."""

    name: str
    scene: Scene
    caption: str
    qas: list[QA]
    mme: dict[str, tuple[QA, QA]]
    voice: str
    speed: int


def make_scene(seed: int, split: str, index: int, pairs: list[tuple[str, str]], variants: int = 1) -> SceneRecord:
    """Scene ``index`` of ``split``: training scenes never hold a pair of ``pairs``; held-out scene ``i`` holds
    ``pairs[i % len(pairs)]`` as its only shape of that kind. ``variants > 1`` (training scenes): scenes come in
    families of that many, the first a new scene and each other one its `counterfactual`."""
    held = frozenset(pairs)
    first = index - index % variants if split == "train" else index
    rng = np.random.default_rng([seed, SPLITS[split], SCENE_STREAM, first])
    if split == "train":
        scene = sample_scene(rng, exclude=held)
        if index != first:
            rng = np.random.default_rng([seed, SPLITS[split], VARIANT_STREAM, index])
            scene = counterfactual(scene, rng, exclude=held)
    else:
        scene = sample_scene(rng, require=pairs[index % len(pairs)], n_shapes=1 + index % 3,
                             text=HELDOUT_TEXT[index % len(HELDOUT_TEXT)], heldout=True)
    prefer, avoid = (held, frozenset()) if split == "heldout" else (frozenset(), held)
    qas = questions(scene, rng, prefer, avoid)
    mme = {}
    if split == "heldout":
        mme = {task: qa for task in MME_SUBTASKS if (qa := mme_pair(scene, task, rng, prefer)) is not None}
    voice, speed = VOICES[int(rng.integers(len(VOICES)))], SPEEDS[int(rng.integers(len(SPEEDS)))]
    return SceneRecord(f"{index:06d}", scene, caption(scene), qas, mme, voice, speed)


def scene_json(record: SceneRecord) -> dict[str, Any]:
    """The scene graph of a record as one JSON object (a line of ``scenes.jsonl``)."""
    s = record.scene
    return {
        "id": record.name, "image": f"scenes/{record.name}.png", "caption": record.caption,
        "shapes": [{"shape": x.shape, "colour": x.colour, "size": x.size, "cell": x.cell,
                    "position": POSITIONS[x.cell][0], "offset": list(x.offset)} for x in s.shapes],
        "sign": None if s.sign is None else {"word": s.sign.word, "cell": s.sign.cell, "font": s.sign.font},
        "digit": None if s.digit is None else {"value": s.digit.value, "scan": s.digit.index, "cell": s.digit.cell},
        "background": list(s.background), "voice": record.voice, "speed": record.speed,
    }


# ------------------------------------------------------------------------------------------ files
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def _llava(record: SceneRecord) -> dict[str, Any]:
    turns = []
    for i, qa in enumerate(record.qas):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question},
                  {"from": "gpt", "value": qa.answer}]
    return {"id": record.name, "image": f"scenes/{record.name}.png", "conversations": turns}


def _label(record: SceneRecord) -> str:
    """``"red star"``: the zero-shot class of a one-shape scene."""
    return " ".join(record.scene.shapes[0].pair)


def _write_mme(root: Path, records: list[SceneRecord]) -> dict[str, int]:
    """MME release layout: ``<subtask>/images/<name>.png`` and ``questions_answers_YN/<name>.txt``."""
    counts = {}
    for task in MME_SUBTASKS:
        asked = [r for r in records if task in r.mme]
        (root / task / "images").mkdir(parents=True)
        (root / task / "questions_answers_YN").mkdir()
        for r in asked:
            shutil.copyfile(root.parent / "scenes" / f"{r.name}.png", root / task / "images" / f"{r.name}.png")
            lines = "".join(f"{qa.question}\t{qa.answer}\n" for qa in r.mme[task])
            (root / task / "questions_answers_YN" / f"{r.name}.txt").write_text(lines, encoding="utf-8")
        counts[task] = len(asked)
    return counts


def _write_audio(folder: Path, records: list[SceneRecord], workers: int, progress: bool) -> None:
    (folder / "audio").mkdir()

    def one(record: SceneRecord) -> None:
        write_wav(folder / "audio" / f"{record.name}.wav", speak(record.caption, record.voice, record.speed))

    pool = ThreadPoolExecutor(workers)  # espeak-ng runs as a process: threads overlap them
    try:
        for _ in tqdm(pool.map(one, records), total=len(records), desc=f"{folder.name} audio", disable=not progress):
            pass
    finally:
        pool.shutdown(cancel_futures=True)  # on an error or Ctrl-C, do not wait for the clips not yet started


def _write_clouds(folder: Path, seed: int, split: str, count: int, progress: bool) -> list[dict[str, str]]:
    """``count`` clouds and renders; primitive ``i % 6`` for cloud ``i``. Returns the manifest rows."""
    (folder / "points").mkdir()
    (folder / "renders").mkdir()
    rows = []
    for index in tqdm(range(count), desc=f"{split} clouds", disable=not progress):
        rng = np.random.default_rng([seed, SPLITS[split], CLOUD_STREAM, index])
        primitive = PRIMITIVES[index % len(PRIMITIVES)]
        solid = sample_solid(rng, primitive)
        name = f"{index:06d}"
        np.save(folder / "points" / f"{name}.npy", point_cloud(solid, rng))
        render_primitive(solid).save(folder / "renders" / f"{name}.png")
        rows.append({"vision": f"renders/{name}.png", "point": f"points/{name}.npy", "label": primitive})
    return rows


def _write_render_text(folder: Path, rows: list[dict[str, str]]) -> None:
    """What text says about the renders (images only: the LLM never sees a point cloud): the pairs
    ``pairs_render_text.jsonl`` that teach the vision tower the primitives, stage-1 captions
    ``render_captions.tsv`` and stage-2 questions ``render_instructions.json`` naming each primitive."""
    captions = [f"a 3D {r['label']}" for r in rows]
    _write_jsonl(folder / "pairs_render_text.jsonl", [{"vision": r["vision"], "text": c} for r, c in zip(rows, captions)])
    with open(folder / "render_captions.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows([r["vision"], c] for r, c in zip(rows, captions))
    chats = [{"id": Path(r["vision"]).stem, "image": r["vision"], "conversations": [
        {"from": "human", "value": f"<image>\n{RENDER_QUESTION}"}, {"from": "gpt", "value": f"A {r['label']}."}]}
        for r in rows]
    (folder / "render_instructions.json").write_text(json.dumps(chats, indent=1) + "\n", encoding="utf-8")


def write_split(folder: Path, seed: int, split: str, count: int, pairs: list[tuple[str, str]], audio: bool,
                clouds: int, workers: int, progress: bool, variants: int = 1) -> dict[str, Any]:
    """One split's files under ``folder``; returns its counts for ``world.json``."""
    (folder / "scenes").mkdir(parents=True)
    records = []
    for index in tqdm(range(count), desc=f"{split} scenes", disable=not progress):
        record = make_scene(seed, split, index, pairs, variants)
        render_scene(record.scene).save(folder / "scenes" / f"{record.name}.png")
        records.append(record)
    _write_jsonl(folder / "scenes.jsonl", [scene_json(r) for r in records])
    with open(folder / "captions.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["image", "caption"])
        writer.writerows([f"scenes/{r.name}.png", r.caption] for r in records)
    (folder / "instructions.json").write_text(json.dumps([_llava(r) for r in records], indent=1, ensure_ascii=False)
                                              + "\n", encoding="utf-8")
    _write_jsonl(folder / "pairs_vision_text.jsonl",
                 [{"vision": f"scenes/{r.name}.png", "text": r.caption} for r in records])
    counts: dict[str, Any] = {"scenes": count, "questions": sum(len(r.qas) for r in records)}
    single = [r for r in records if len(r.scene.shapes) == 1]  # one shape: its pair labels the whole scene
    if split == "heldout":
        counts["mme"] = _write_mme(folder / "mme", records)
        _write_jsonl(folder / "zeroshot_image.jsonl",
                     [{"image": f"scenes/{r.name}.png", "label": _label(r)} for r in single])
    if audio:
        _write_audio(folder, records, workers, progress)
        _write_jsonl(folder / "pairs_vision_audio.jsonl",
                     [{"vision": f"scenes/{r.name}.png", "audio": f"audio/{r.name}.wav"} for r in records])
        if split == "heldout":
            _write_jsonl(folder / "zeroshot_audio.jsonl",
                         [{"audio": f"audio/{r.name}.wav", "label": _label(r)} for r in single])
    counts["audio"] = count if audio else 0
    if clouds:
        rows = _write_clouds(folder, seed, split, clouds, progress)
        _write_jsonl(folder / "pairs_vision_point.jsonl", [{"vision": r["vision"], "point": r["point"]} for r in rows])
        _write_render_text(folder, rows)
        if split == "heldout":
            _write_jsonl(folder / "zeroshot_point.jsonl", [{"point": r["point"], "label": r["label"]} for r in rows])
    counts["points"] = clouds
    return counts


# ------------------------------------------------------------------------------------------ the folder
def _check_resources(audio: bool) -> None:
    """Fail before any work when a font, scikit-learn's digits or (with ``audio``) espeak-ng is missing."""
    for index in range(len(FONTS)):
        font(index, 12)
    digit_scans()
    if audio and espeak_missing():
        raise WorldError(f"{espeak_missing()}; generate without audio (--no-audio)")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise WorldError(f"output {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise WorldError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it")
        if not (out / "world.json").is_file():
            raise WorldError(f"refusing to replace {out}: it holds no world.json, so it is not a world folder")


def generate(out: str | Path, seed: int = 0, train: int = 1000, heldout: int = 200, audio: bool = True,
             points: int = 0, heldout_points: int | None = None, overwrite: bool = False, workers: int | None = None,
             progress: bool = False, variants: int = 1) -> Path:
    """Write a world folder at ``out``; returns its path.

    Args:
        seed: everything follows from it (same seed, same bytes).
        train, heldout: scenes per split (at least 1 each).
        audio: speak every caption with espeak-ng (needs the ``espeak-ng`` program).
        points: training point clouds with their renders (0: none).
        heldout_points: held-out clouds (default: ``max(6, points // 4)`` when ``points``, else 0).
        overwrite: replace an existing world folder at ``out``.
        workers: parallel espeak-ng processes (default: the CPU count).
        variants: training scenes come in families of this many, a scene and its counterfactuals (each
            with one shape kind, the sign's word or the digit changed), consecutive in every file, for
            hard-negative batches (``train bind`` with ``data.group_size`` = ``variants``).

    Raises:
        WorldError: bad counts, an ``out`` that exists (without ``overwrite``) or is no world folder, a missing
            font, scikit-learn or espeak-ng.
    """
    if heldout_points is None:
        heldout_points = max(len(PRIMITIVES), points // 4) if points else 0
    workers = (os.cpu_count() or 1) if workers is None else workers
    for name, value, low in (("seed", seed, 0), ("train", train, 1), ("heldout", heldout, 1), ("points", points, 0),
                             ("heldout_points", heldout_points, 0), ("workers", workers, 1), ("variants", variants, 1)):
        if not isinstance(value, int) or value < low:
            raise WorldError(f"{name} must be an integer >= {low}, got {value!r}")
    _check_resources(audio)
    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        pairs = heldout_pairs(np.random.default_rng([seed, PAIRS_STREAM]))
        counts = {split: write_split(tmp / split, seed, split, n, pairs, audio, clouds, workers, progress, variants)
                  for split, n, clouds in (("train", train, points), ("heldout", heldout, heldout_points))}
        (tmp / "world.json").write_text(json.dumps(world_info(seed, counts, pairs, variants), indent=1) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


def _replace(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing what is there (checked by `_check_out`)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def world_info(seed: int, counts: dict[str, Any], pairs: list[tuple[str, str]], variants: int = 1) -> dict[str, Any]:
    """The contents of ``world.json``: seed, counts, vocabularies and the held-out pairs."""
    return {
        "format": FORMAT, "seed": seed, "counts": counts, "train_variants": variants, "image_size": IMAGE_SIZE,
        "shapes": list(SHAPES), "colours": list(COLOURS), "sizes": list(SIZES),
        "positions": [name for name, _ in POSITIONS], "words": list(WORDS),
        "heldout_pairs": [list(p) for p in pairs],
        "digits": {"source": "sklearn.datasets.load_digits (UCI handwritten digits)",
                   "heldout_rule": f"scan index % {DIGIT_HELDOUT_EVERY} == 0",
                   "train_scans": len(digit_indices(False)), "heldout_scans": len(digit_indices(True))},
        "primitives": list(PRIMITIVES), "points_per_cloud": POINTS_PER_CLOUD,
        "voices": list(VOICES), "speeds_wpm": list(SPEEDS), "sample_rate": SAMPLE_RATE,
        "mme_subtasks": list(MME_SUBTASKS),
    }
