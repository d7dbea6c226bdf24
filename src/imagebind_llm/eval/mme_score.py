"""MME scoring exactly as the benchmark's ``eval_tool/calculation.py`` does it.

A result file ``<subtask>.txt`` holds lines ``image<TAB>question<TAB>ground truth<TAB>prediction``, the two
questions of an image on adjacent lines. Lines are read with their trailing newline (it stays part of the
prediction). Ground truth and prediction are lower-cased; a prediction is ``yes``/``no`` when it equals it,
else ``yes`` when ``"yes"`` occurs in its first 4 characters, else ``no`` when ``"no"`` does, else ``other``
(so "not sure" and "know" count as no). ``acc`` is over all questions (other is wrong), ``acc_plus`` the
share of images whose two answers are both right, and a subtask scores ``100 * acc + 100 * acc_plus``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
GROUPS = {"perception": PERCEPTION, "cognition": COGNITION}


class ResultFileError(ValueError):
    """A malformed result file; the message names the file and line."""


def parse_prediction(prediction: str) -> str:
    """``yes``, ``no`` or ``other`` for a lower-cased prediction, by the official rule."""
    if prediction in ("yes", "no"):
        return prediction
    head = prediction[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


@dataclass
class SubtaskScore:
    """One subtask's official metrics (``tp``/``fn``/``tn``/``fp`` with yes as the positive class)."""

    score: float
    acc: float
    acc_plus: float
    questions: int
    images: int
    other: int
    tp: int
    fn: int
    tn: int
    fp: int
    precision: float
    recall: float


def score_lines(lines: Sequence[str], name: str = "<lines>") -> SubtaskScore:
    """Score the lines of one result file (each with its trailing newline, as ``readlines`` gives them).

    Raises:
        ResultFileError: an odd number of lines, a line without 4 tab-separated columns, or a ground truth that
            is not yes/no.
    """
    if len(lines) % 2:
        raise ResultFileError(f"{name}: {len(lines)} lines; MME has exactly two questions per image (adjacent lines)")
    gts, preds, both_right = [], [], 0
    for start in range(0, len(lines), 2):
        right = 0
        for number in (start, start + 1):
            columns = lines[number].split("\t")
            if len(columns) != 4:
                raise ResultFileError(f"{name}:{number + 1}: {len(columns)} tab-separated columns; expected 4 "
                                      "(image, question, ground truth, prediction)")
            gt, prediction = columns[2].lower(), parse_prediction(columns[3].lower())
            if gt not in ("yes", "no"):
                raise ResultFileError(f"{name}:{number + 1}: ground truth {columns[2]!r} is not yes or no")
            gts.append(gt)
            preds.append(prediction)
            right += gt == prediction
        both_right += right == 2
    return _metrics(gts, preds, both_right, images=len(lines) // 2)


def _metrics(gts: list[str], preds: list[str], both_right: int, images: int) -> SubtaskScore:
    n = len(gts)
    pairs = list(zip(gts, preds))
    tp, fn = pairs.count(("yes", "yes")), pairs.count(("yes", "no"))
    tn, fp = pairs.count(("no", "no")), pairs.count(("no", "yes"))
    acc = sum(g == p for g, p in pairs) / n if n else 0.0
    acc_plus = both_right / images if images else 0.0
    return SubtaskScore(score=100 * acc + 100 * acc_plus, acc=acc, acc_plus=acc_plus, questions=n, images=images,
                        other=sum(p == "other" for p in preds), tp=tp, fn=fn, tn=tn, fp=fp,
                        precision=tp / (tp + fp) if tp + fp else 0.0, recall=tp / (tp + fn) if tp + fn else 0.0)


def score_file(path: Path) -> SubtaskScore:
    """Score one ``<subtask>.txt`` result file."""
    with open(path, encoding="utf-8") as f:  # universal newlines, as the official open(...).readlines()
        return score_lines(f.readlines(), str(path))


def score_dir(results: Path) -> tuple[dict[str, dict], list[str]]:
    """Score every subtask file in ``results``: ``({"perception": {"total", "subtasks": {name: metrics}}, ...},
    missing subtasks)``."""
    report, missing = {}, []
    for group, names in GROUPS.items():
        subtasks = {}
        for name in names:
            path = Path(results) / f"{name}.txt"
            if path.is_file():
                subtasks[name] = asdict(score_file(path))
            else:
                missing.append(name)
        report[group] = {"total": sum(s["score"] for s in subtasks.values()), "subtasks": subtasks}
    return report, missing
