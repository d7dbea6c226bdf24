"""The MME benchmark: answer every question of the official release through the engine and write the result
files that the official ``eval_tool/calculation.py`` (and `imagebind_llm.eval.mme_score`) scores.

Data: ``MME_Benchmark_release_version/<subtask>/`` holds either ``images/<name>.jpg|png`` with
``questions_answers_YN/<name>.txt``, or ``<name>.jpg|png`` next to ``<name>.txt``; each ``.txt`` line is
``question<TAB>Yes|No``, two per image. Questions are asked in a fixed order: images sorted by file name, an
image's questions in the order of its ``.txt`` file.

Two ways to answer:

* ``generate`` (the official one): greedy decoding of at most 30 new tokens after the prompt of LLaMA-Adapter's
  ``util/evaluate_mme.py``, the Alpaca no-input prompt whose header ends "...completes the request using a
  single word or phrase."; the answer, its tabs and line breaks turned into spaces, is the prediction.
* ``likelihood``: the prediction is "Yes" when log p("Yes" | prompt, image) > log p("No" | prompt, image),
  else "No" (the continuation written right after ``### Response:``, as ImageBind-LLM's training data has
  it). Not the official protocol: write it to its own results folder and report it separately.

Results go to ``<out>/<subtask>.txt``: ``image<TAB>question<TAB>ground truth<TAB>prediction`` per line, the
two questions of an image on adjacent lines. Each line is flushed as it is written, so a killed run loses at
most the line being written; a rerun keeps the complete lines (after checking that they are the first
questions of the subtask), cuts off a partial last line and asks only the rest. ``<out>/mme_run.json``
records the settings, and a rerun with other settings is refused rather than mixing answers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from imagebind_llm.engine import Engine, Request
from imagebind_llm.eval.mme_score import COGNITION, PERCEPTION
from imagebind_llm.llm.generate import GREEDY
from imagebind_llm.llm.templates import AlpacaTemplate

SUBTASKS = PERCEPTION + COGNITION
RELEASE_FOLDER = "MME_Benchmark_release_version"
IMAGE_SUFFIXES = (".jpg", ".png")
MME_HEADER = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request using a single word or phrase.")
MODES = ("generate", "likelihood")
SETTINGS_FILE = "mme_run.json"


class MMEError(ValueError):
    """A malformed MME folder, or a results folder that cannot be resumed; the message names the file."""


@dataclass(frozen=True)
class Question:
    """One MME question: its image, the question text and the ground truth (``Yes`` or ``No``)."""

    image: Path
    question: str
    answer: str

    def line(self, prediction: str) -> str:
        """The result line (with its newline); in the prediction, runs of whitespace (tabs, line breaks) become
        single spaces and the ends are stripped."""
        return f"{self.image.name}\t{self.question}\t{self.answer}\t{' '.join(prediction.split())}\n"


@dataclass(frozen=True)
class MMEOptions:
    """How the questions are answered.

    Attributes:
        mode: ``generate`` (greedy answers, the official protocol) or ``likelihood`` (Yes/No by log-probability).
        prompt_header: the Alpaca header sentence (default: the official MME script's).
        max_new_tokens: answer length limit in ``generate`` mode (official: 30).
        batch: questions submitted to the engine together.
    """

    mode: str = "generate"
    prompt_header: str = MME_HEADER
    max_new_tokens: int = 30
    batch: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        if self.max_new_tokens < 1 or self.batch < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and batch={self.batch} must be >= 1")

    def settings(self) -> dict[str, Any]:
        """What the answers depend on (the batch does not change them)."""
        out: dict[str, Any] = {"mode": self.mode, "prompt_header": self.prompt_header}
        if self.mode == "generate":
            out["max_new_tokens"] = self.max_new_tokens
        return out


def mme_prompt(question: str, header: str = MME_HEADER) -> str:
    """The Alpaca no-input prompt with ``header``: ``header\\n\\n### Instruction:\\n{question}\\n\\n### Response:``."""
    return AlpacaTemplate().render([{"role": "system", "content": header}, {"role": "user", "content": question}])


# ---------------------------------------------------------------- reading the benchmark
def load_mme(data: Path, subtasks: Sequence[str] = SUBTASKS) -> tuple[dict[str, list[Question]], list[str]]:
    """The questions of each subtask found in ``data`` (the release folder, or a folder holding it), in the
    fixed order, and the subtasks without a folder.

    Raises:
        MMEError: an unknown subtask name, no subtask folder at all, or a malformed subtask (see `load_subtask`).
    """
    unknown = [name for name in subtasks if name not in SUBTASKS]
    if unknown:
        raise MMEError(f"unknown MME subtasks {unknown}; choose among {list(SUBTASKS)}")
    data = Path(data)
    if (data / RELEASE_FOLDER).is_dir():
        data = data / RELEASE_FOLDER
    found = {name: load_subtask(data / name) for name in subtasks if (data / name).is_dir()}
    if not found:
        raise MMEError(f"{data}: no MME subtask folder ({', '.join(subtasks)}); give the {RELEASE_FOLDER} folder")
    return found, [name for name in subtasks if name not in found]


def load_subtask(folder: Path) -> list[Question]:
    """The questions of one subtask folder (either layout), images sorted by name.

    Raises:
        MMEError: no question files, a question file without its image, a line that is not
            ``question<TAB>Yes|No``, or an image without exactly two questions.
    """
    images, texts = folder / "images", folder / "questions_answers_YN"
    if images.is_dir() and texts.is_dir():
        files = sorted(texts.glob("*.txt"))
    else:
        images, files = folder, sorted(folder.glob("*.txt"))
    if not files:
        raise MMEError(f"{folder}: no question files (<image>.txt, or questions_answers_YN/<image>.txt)")
    pairs = sorted((_image_of(file, images), file) for file in files)
    return [question for image, file in pairs for question in _read_questions(file, image)]


def _image_of(questions: Path, images: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        image = images / (questions.stem + suffix)
        if image.is_file():
            return image
    raise MMEError(f"{questions}: no image {questions.stem}.jpg or .png in {images}")


def _read_questions(file: Path, image: Path) -> list[Question]:
    out = []
    with open(file, encoding="utf-8") as f:  # universal newlines, as the official script reads them
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            columns = line.rstrip("\n").split("\t")
            if len(columns) != 2 or columns[1].lower() not in ("yes", "no"):
                raise MMEError(f"{file}:{number}: expected 'question<TAB>Yes|No', got {line.rstrip()!r}")
            out.append(Question(image, columns[0], columns[1]))
    if len(out) != 2:
        raise MMEError(f"{file}: {len(out)} questions; MME has exactly two per image")
    return out


# ---------------------------------------------------------------- answering
def run_mme(engine: Engine, tasks: Mapping[str, Sequence[Question]], out: Path, options: MMEOptions = MMEOptions(),
            model: Mapping[str, Any] | None = None, progress: bool = True) -> int:
    """Answer the questions not yet in ``out/<subtask>.txt`` and append their lines; returns how many.

    Args:
        engine: the engine to ask (``max_batch`` at least ``options.batch`` to decode a chunk together).
        tasks: subtask name -> its questions in order (`load_mme`).
        out: the results folder (created).
        model: a description of the model, recorded with the settings so that a rerun with another is refused.
        progress: show a tqdm bar on stderr.

    Raises:
        MMEError: ``out`` holds answers of other settings or of other questions.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _record_settings(out / SETTINGS_FILE, {**options.settings(), "model": dict(model or {})})
    done = {name: _resume(out / f"{name}.txt", questions) for name, questions in tasks.items()}
    total = sum(len(questions) for questions in tasks.values())
    asked = 0
    with tqdm(total=total, initial=sum(done.values()), unit="q", desc="MME", disable=not progress) as bar:
        for name, questions in tasks.items():
            bar.set_postfix_str(name)
            with open(out / f"{name}.txt", "a", encoding="utf-8", newline="\n") as f:
                for start in range(done[name], len(questions), options.batch):
                    chunk = questions[start:start + options.batch]
                    for question, prediction in zip(chunk, _answer(engine, chunk, options)):
                        f.write(question.line(prediction))
                        f.flush()
                        bar.update()
                    os.fsync(f.fileno())
                    asked += len(chunk)
    return asked


def _record_settings(path: Path, settings: dict[str, Any]) -> None:
    """Record ``settings`` in ``path``, or check that they are the recorded ones."""
    if not path.is_file():
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    changed = sorted(key for key in {*recorded, *settings} if recorded.get(key) != settings.get(key))
    if changed:
        raise MMEError(f"{path.parent} holds answers made with other settings ({', '.join(changed)}: "
                       f"{[recorded.get(k) for k in changed]} there, {[settings.get(k) for k in changed]} now); "
                       "choose another --out")


def _resume(path: Path, questions: Sequence[Question]) -> int:
    """How many questions ``path`` already answers; a partial last line is cut off the file.

    Raises:
        MMEError: a complete line that is not the expected question's (another data set or order).
    """
    if not path.is_file():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    try:
        lines = data[:keep].decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as e:
        raise MMEError(f"{path}: not UTF-8 text ({e}); not a results file of ours") from None
    if len(lines) > len(questions):
        raise MMEError(f"{path}: {len(lines)} answers but the subtask has {len(questions)} questions")
    for number, (line, question) in enumerate(zip(lines, questions), 1):
        if line.split("\t")[:3] != [question.image.name, question.question, question.answer]:
            raise MMEError(f"{path}:{number}: not the answer to {question.image.name!r} {question.question!r}; the "
                           "file was written for other data (delete it, or choose another --out)")
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return len(lines)


def _answer(engine: Engine, chunk: Sequence[Question], options: MMEOptions) -> list[str]:
    """The predictions for ``chunk``, in order."""
    if options.mode == "likelihood":
        return _likelihood_answers(engine, chunk, options.prompt_header)
    features = {image: _encode(engine, image) for image in dict.fromkeys(q.image for q in chunk)}
    sampling = GREEDY.replace(max_new_tokens=options.max_new_tokens)
    handles = [engine.submit(Request(sampling=sampling, features=features[q.image],
                                     prompt_ids=_prompt_ids(engine, mme_prompt(q.question, options.prompt_header))))
               for q in chunk]
    return [handle.result().text for handle in handles]


def _encode(engine: Engine, image: Path) -> torch.Tensor | None:
    """The image's ImageBind feature, computed once for both of its questions."""
    try:
        return engine.encode(Request(messages=[{"role": "user", "content": [_image_part(image)]}]))
    except (OSError, ValueError) as e:
        raise MMEError(f"{image}: {e}") from e


def _image_part(image: Path) -> dict[str, Any]:
    return {"type": "image", "image": str(image), "weight": 1.0}


def _prompt_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer.encode(prompt, bos=engine.tokenizer.add_bos)


def _likelihood_answers(engine: Engine, chunk: Sequence[Question], header: str) -> list[str]:
    """"Yes" or "No" for each question: the likelier continuation of the MME prompt."""
    requests = []
    for q in chunk:
        content = [_image_part(q.image), {"type": "text", "text": q.question}]
        request = Request(messages=[{"role": "system", "content": header}, {"role": "user", "content": content}])
        if engine.template.render(request.text_messages()) != mme_prompt(q.question, header):
            raise ValueError("--mode likelihood scores through the engine's prompt template: build the engine "
                             "with template='alpaca'")
        requests.append(request)
    scores = engine.loglikelihood([r for r in requests for _ in (0, 1)], ["Yes", "No"] * len(requests))
    return ["Yes" if yes.logprob > no.logprob else "No" for yes, no in zip(scores[::2], scores[1::2])]
