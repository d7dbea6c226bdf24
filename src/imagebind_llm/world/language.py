"""Text from scene graphs: captions, detailed descriptions, open questions and MME yes/no question pairs.

All answers are read from the `Scene`. Colour words follow MME's spelling ("color") in questions; a "shape" is
one of the coloured objects, never the sign or the digit card.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .scene import COLOURS, POSITIONS, WORDS, Scene, Shape, all_pairs

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MME_SUFFIX = " Please answer yes or no."  # every question of the MME release ends so
MME_SUBTASKS = ("existence", "count", "position", "color", "OCR")  # MME perception subtasks this world answers
DESCRIBE = "Describe this image in detail."
T = TypeVar("T")


@dataclass(frozen=True)
class QA:
    """A question about a scene, its answer and its kind (an MME subtask name, or ``description``)."""

    kind: str
    question: str
    answer: str


# ------------------------------------------------------------------------------------------ phrases
def shape_phrase(s: Shape, size: bool = True) -> str:
    """``"a large red star"`` (``"a red star"`` without the size)."""
    words = [s.size] if size else []
    return " ".join(["a", *words, s.colour, s.shape])


def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape{'' if n == 1 else 's'}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _items(scene: Scene) -> list[tuple[int, str]]:
    """``(cell, "noun phrase at place")`` for everything in the scene, in reading order."""
    items = [(s.cell, f"{shape_phrase(s)} {POSITIONS[s.cell][1]}") for s in scene.shapes]
    if scene.sign is not None:
        items.append((scene.sign.cell, f"a sign reading {scene.sign.word} {POSITIONS[scene.sign.cell][1]}"))
    if scene.digit is not None:
        items.append((scene.digit.cell, f"a handwritten {scene.digit.value} {POSITIONS[scene.digit.cell][1]}"))
    return sorted(items)


def caption(scene: Scene) -> str:
    """One-sentence caption (lower case, no full stop): everything in the scene and where it is."""
    return _join([text for _, text in _items(scene)])


def description(scene: Scene) -> str:
    """A few sentences: how many shapes, each shape with size, colour and place, then the sign or the digit."""
    n = len(scene.shapes)
    lines = [f"The image shows {_count_phrase(n)} on a plain light background."]
    lines += [f"{shape_phrase(s).capitalize()} is {POSITIONS[s.cell][1]}." for s in scene.shapes]
    if scene.sign is not None:
        lines.append(f'A sign {POSITIONS[scene.sign.cell][1]} reads "{scene.sign.word}".')
    if scene.digit is not None:
        lines.append(f"A white card {POSITIONS[scene.digit.cell][1]} shows the handwritten digit "
                     f"{scene.digit.value}.")
    return " ".join(lines)


# ------------------------------------------------------------------------------------------ questions
def _unique(scene: Scene, key: Callable[[Shape], object]) -> list[Shape]:
    """The shapes whose ``key`` (pair, or shape name) no other shape of the scene shares."""
    keys = [key(s) for s in scene.shapes]
    return [s for s, k in zip(scene.shapes, keys) if keys.count(k) == 1]


def _pick(rng: np.random.Generator, shapes: list[Shape], prefer: frozenset[tuple[str, str]]) -> Shape:
    """A shape of ``shapes``, one with a preferred pair when there is one."""
    preferred = [s for s in shapes if s.pair in prefer]
    choices = preferred or shapes
    return choices[int(rng.integers(len(choices)))]


def _other(rng: np.random.Generator, choices: Iterable[T], exclude: T) -> T:
    """A random element of ``choices`` other than ``exclude`` (a wrong answer)."""
    rest = [c for c in choices if c != exclude]
    return rest[int(rng.integers(len(rest)))]


def mme_pair(scene: Scene, subtask: str, rng: np.random.Generator,
             prefer: frozenset[tuple[str, str]] = frozenset(),
             avoid: frozenset[tuple[str, str]] = frozenset()) -> tuple[QA, QA] | None:
    """Two yes/no questions about ``scene`` in MME's form, answers ``Yes`` then ``No``; None if the scene has
    nothing to ask (no sign or digit for OCR; no shape named unambiguously for position or color).

    Questions name shapes with a pair in ``prefer`` when they can (held-out scenes ask about unseen pairs), and
    wrong answers never name a pair of ``avoid`` (training text never mentions a held-out pair, not even as a no).
    """
    def pair(yes: str, no: str) -> tuple[QA, QA]:
        return QA(subtask, yes + MME_SUFFIX, "Yes"), QA(subtask, no + MME_SUFFIX, "No")

    if subtask == "existence":
        present = _pick(rng, list(scene.shapes), prefer)
        absent = [p for p in all_pairs() if p not in scene.pairs and p not in avoid]
        colour, shape = absent[int(rng.integers(len(absent)))]
        return pair(f"Is there {shape_phrase(present, size=False)} in this image?",
                    f"Is there a {colour} {shape} in this image?")
    if subtask == "count":
        n = len(scene.shapes)
        wrong = _other(rng, range(1, 5), n)
        return pair(*(f"{'Is there' if m == 1 else 'Are there'} exactly {_count_phrase(m)} in this image?"
                      for m in (n, wrong)))
    if subtask == "position":
        named = _unique(scene, lambda s: s.pair)
        if not named:
            return None
        s = _pick(rng, named, prefer)
        wrong = _other(rng, range(9), s.cell)
        return pair(*(f"Is the {s.colour} {s.shape} {POSITIONS[cell][1]} of the image?" for cell in (s.cell, wrong)))
    if subtask == "color":
        named = _unique(scene, lambda s: s.shape)
        if not named:
            return None
        s = _pick(rng, named, prefer)
        wrong = _other(rng, [c for c in COLOURS if (c, s.shape) not in avoid], s.colour)
        return pair(f"Is the {s.shape} in this image {s.colour}?", f"Is the {s.shape} in this image {wrong}?")
    if subtask == "OCR":
        if scene.sign is not None:
            wrong = _other(rng, WORDS, scene.sign.word)
            return pair(f'Does the sign say "{scene.sign.word}"?', f'Does the sign say "{wrong}"?')
        if scene.digit is not None:
            wrong = _other(rng, range(10), scene.digit.value)
            return pair(f"Is the handwritten digit a {scene.digit.value}?", f"Is the handwritten digit a {wrong}?")
        return None
    raise ValueError(f"unknown MME subtask {subtask!r}; choose one of {MME_SUBTASKS}")


def open_questions(scene: Scene, rng: np.random.Generator,
                   prefer: frozenset[tuple[str, str]] = frozenset()) -> list[QA]:
    """Short-answer questions: count (all shapes, and shapes of one colour), position, colour, sign word or
    digit, and the detailed description."""
    n = len(scene.shapes)
    out = [QA("count", "How many shapes are there in the image?", str(n))]
    colour = scene.shapes[int(rng.integers(n))].colour
    out.append(QA("count", f"How many {colour} shapes are there in the image?",
                  str(sum(s.colour == colour for s in scene.shapes))))
    named = _unique(scene, lambda s: s.pair)
    if named:
        s = _pick(rng, named, prefer)
        out.append(QA("position", f"Where is the {s.colour} {s.shape} in the image?", POSITIONS[s.cell][0]))
    named = _unique(scene, lambda s: s.shape)
    if named:
        s = _pick(rng, named, prefer)
        out.append(QA("color", f"What color is the {s.shape}?", s.colour))
    if scene.sign is not None:
        out.append(QA("OCR", "What word is written on the sign?", scene.sign.word))
    if scene.digit is not None:
        out.append(QA("OCR", "Which digit is written on the card?", str(scene.digit.value)))
    out.append(QA("description", DESCRIBE, description(scene)))
    return out


def questions(scene: Scene, rng: np.random.Generator, prefer: frozenset[tuple[str, str]] = frozenset(),
              avoid: frozenset[tuple[str, str]] = frozenset()) -> list[QA]:
    """Every question of a scene in a random order: the open ones and each MME subtask's yes/no pair
    (``prefer`` and ``avoid`` as in `mme_pair`)."""
    qas = open_questions(scene, rng, prefer)
    for subtask in MME_SUBTASKS:
        qas.extend(mme_pair(scene, subtask, rng, prefer, avoid) or ())
    return [qas[i] for i in rng.permutation(len(qas))]

