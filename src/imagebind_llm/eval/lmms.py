"""An lmms-eval model backed by our engine: ``python -m lmms_eval --model imagebind_llm --model_args name=demo``.

`ImageBindLLMEval` answers lmms-eval's three request kinds:

- ``generate_until``: one engine `Request` per instance, its media taken from the document's visuals
  (PIL images, ``{"array", "sampling_rate"}`` audio, image/audio/video paths) and its sampling from the
  task's ``gen_kwargs`` (``max_new_tokens``, ``temperature``/``do_sample``, ``top_p``, ``until``);
- ``loglikelihood``: the engine's scoring (`Engine.loglikelihood`) of the continuation after the prompt,
  returned as lmms-eval's models do: the mean negative log-likelihood per token, and whether greedy;
- ``generate_until_multi_round``: rounds asked one after the other, the task's ``doc_to_text`` giving
  each next prompt.

It subclasses lmms-eval's ``lmms`` when lmms-eval is installed, else a local base with the same methods,
so it can be used (and tested) without lmms-eval. lmms-eval finds it through the ``lmms_eval.models``
entry-point group (`lmms_eval_models`); nothing is copied into lmms-eval.

ImageBind-LLM mixes one input per modality: a document with several images (or audio clips) is
answered about the first one (a warning says so).
"""

from __future__ import annotations

import abc
import argparse
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from imagebind_llm.engine import Engine, Request
from imagebind_llm.engine.cli import build_engine, default_template, uses_demo
from imagebind_llm.llm.generate import SamplingOptions

from .zero_shot import SUFFIXES

log = logging.getLogger(__name__)

MODEL_ID = "imagebind_llm"
DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval models' usual default when a task sets none
AUTO_BATCH = 8  # engine rows for ``batch_size=auto``
_PATH_MODALITIES = ("image", "audio", "video")  # a visual given as a path: its modality by extension


class _LocalBase(abc.ABC):
    """lmms-eval's ``lmms_eval.api.model.lmms`` interface, for when lmms-eval is not installed."""

    is_simple = True

    def __init__(self) -> None:
        self._rank, self._world_size = 0, 1
        self.task_dict: dict[str, Any] = {}  # lmms-eval fills {task: {split: documents}}

    @abc.abstractmethod
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]: ...

    @abc.abstractmethod
    def generate_until(self, requests: list[Any]) -> list[str]: ...

    @abc.abstractmethod
    def generate_until_multi_round(self, requests: list[Any]) -> list[list[str]]: ...

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> Any:
        """``"k1=v1,k2=v2"`` (values read as bool, int, float or string) plus non-None ``additional_config``."""
        args = dict(item.split("=", 1) for item in filter(None, arg_string.strip().split(",")))
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{k.strip(): _value(v) for k, v in args.items()}, **extra)

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size


def _value(text: str) -> bool | int | float | str:
    """lmms-eval's reading of a ``--model_args`` value."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.isnumeric():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text


try:
    from lmms_eval.api.model import lmms as _Base
except ImportError:
    _Base = _LocalBase


class ImageBindLLMEval(_Base):
    """ImageBind-LLM for lmms-eval; ``--model_args`` are our model options (those of ``imagebind-llm ask``).

    Args:
        name, model, adapter, weights, imagebind, imagebind_config, phase, dtype, device, quantize: the model
            (as ``--name``, ``--model``, ... of the command line); none of name/model/adapter/weights: the demo.
        cache: a retrieval cache folder (``imagebind-llm cache build``).
        template: prompt template; default alpaca for ImageBind-LLM weights, else the model's own.
        max_batch: engine rows decoded together; default lmms-eval's ``batch_size``
            (``auto``: ``max_batch_size``, else 8).
        max_context: the engine's context per row.
        engine: an engine to use instead of building one (the model options are then ignored).
    """

    def __init__(self, name: str | None = None, model: str | None = None, adapter: str | None = None,
                 weights: str | None = None, imagebind: str | None = None, imagebind_config: str | None = None,
                 phase: str | None = None, dtype: str = "float32", device: str = "cpu", quantize: str | None = None,
                 cache: str | None = None,
                 template: str | None = None, max_batch: int | None = None, max_context: int | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, engine: Engine | None = None) -> None:
        super().__init__()
        if engine is None:
            args = argparse.Namespace(name=name, model=model, adapter=adapter, weights=weights, imagebind=imagebind,
                                      imagebind_config=imagebind_config, phase=phase, dtype=dtype, device=device,
                                      quantize=quantize, cache=cache)
            rows = max_batch or ((max_batch_size or AUTO_BATCH) if batch_size == "auto" else int(batch_size))
            uses_demo(args)
            template = template or default_template(args)
            engine = build_engine(args, max_batch=rows, max_context=max_context, template=template, background=False)
        self.engine = engine

    # ------------------------------------------------------------------------------- lmms-eval's methods
    def generate_until(self, requests: list[Any]) -> list[str]:
        """``Instance.args = (context, gen_kwargs, doc_to_visual, doc_id, task, split)`` -> the answers.

        Requests go to the engine as many at a time as it accepts (its rows and queue), so a document's
        media are loaded only when its window comes."""
        answers = []
        window = self.engine.max_batch + self.engine.max_queue
        for start in range(0, len(requests), window):
            answers += self._generate([self._generation_request(r.args) for r in requests[start:start + window]])
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """``Instance.args = (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``, or
        ``(context, continuation)`` without media -> ``(loss, is_greedy)`` per instance, ``max_batch`` a pass.

        ``loss`` is the continuation's mean negative log-likelihood per token (the engine's summed log
        probability over its tokens, negated), the value lmms-eval's own models return (llava, qwen_vl, ...):
        lmms-eval 0.7.3 picks a multiple-choice answer with ``argmin`` (``api/task.py``), so a log probability
        would choose the least likely answer.
        """
        results = []
        for start in range(0, len(requests), self.engine.max_batch):
            pairs = [self._scoring_pair(r.args) for r in requests[start:start + self.engine.max_batch]]
            scores = self.engine.loglikelihood([request for request, _ in pairs], [text for _, text in pairs])
            results += [(-s.logprob / s.tokens, s.greedy) for s in scores]
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[list[str]]:
        """``Instance.args = (context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split)``.

        Round 0 answers ``context`` about ``doc_to_visual(doc)``; then ``doc_to_text(doc, previous_output=
        answers, round_idx=i, previous_round_info=info)`` gives ``(visuals, context, done, answers, info)``
        for round ``i`` until ``done``. Returns the answers of each request's rounds.
        """
        results = []
        for context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split in (r.args for r in requests):
            doc, sampling = self._doc(task, split, doc_id), self._sampling(gen_kwargs)
            visuals, answers, info, round_idx = doc_to_visual(doc), [], None, 0
            while True:
                answers.append(self._generate([Request.ask(context, _media(visuals), sampling=sampling)])[0])
                round_idx += 1
                visuals, context, done, answers, info = doc_to_text(
                    doc, previous_output=answers, round_idx=round_idx, previous_round_info=info)
                answers = list(answers)
                if done:
                    break
            results.append(answers)
        return results

    # ------------------------------------------------------------------------------- helpers
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _generation_request(self, args: tuple) -> Request:
        """A generate_until instance's request: prompt, the document's media, sampling from ``gen_kwargs``."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        media = _media(doc_to_visual(self._doc(task, split, doc_id)))
        return Request.ask(context, media, sampling=self._sampling(gen_kwargs))

    def _scoring_pair(self, args: tuple) -> tuple[Request, str]:
        """A loglikelihood instance's request (prompt and media) and continuation."""
        if len(args) == 2:
            return Request.ask(args[0]), str(args[1])
        context, target, doc_to_visual, doc_id, task, split = args
        doc = self._doc(task, split, doc_id)
        continuation = target if isinstance(target, str) else target(doc)
        return Request.ask(context, _media(doc_to_visual(doc))), str(continuation)

    def _sampling(self, gen_kwargs: dict[str, Any]) -> SamplingOptions:
        """lmms-eval's generation kwargs as our options: greedy unless ``temperature`` > 0 with sampling on;
        ``until`` (a string or a list) ends the answer, as do the prompt template's stop strings."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample", True) else 0.0
        top_p = gen_kwargs.get("top_p")
        return SamplingOptions(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                               temperature=temperature, top_p=float(top_p) if top_p and 0 < top_p < 1 else None,
                               stop_strings=(*until, *getattr(self.engine.template, "stop_strings", ())))

    def _generate(self, requests: Sequence[Request]) -> list[str]:
        """The engine's answers (stripped) to requests it can accept at once."""
        handles = [self.engine.submit(r) for r in requests]
        return [h.result().text.strip() for h in handles]


def _media(visuals: Any) -> dict[str, Any]:
    """A document's visuals as ``{modality: source}`` for `Request.ask` (the first of each modality)."""
    media: dict[str, Any] = {}
    for visual in _flatten(visuals):
        name, source = _media_part(visual)
        if name in media:
            log.warning("the document has several %s inputs; ImageBind-LLM takes one per modality: the first", name)
            continue
        media[name] = source
    return media


def _flatten(visuals: Any) -> Iterator[Any]:
    if isinstance(visuals, (list, tuple)):
        for v in visuals:
            yield from _flatten(v)
    elif visuals is not None:
        yield visuals


def _media_part(visual: Any) -> tuple[str, Any]:
    """``(modality, source)`` of one visual: a PIL image, an audio dict, or a file path."""
    if isinstance(visual, Image.Image):
        return "image", visual
    if isinstance(visual, dict) and "array" in visual and "sampling_rate" in visual:
        return "audio", _wav_bytes(np.asarray(visual["array"], dtype=np.float32), int(visual["sampling_rate"]))
    if isinstance(visual, (str, Path)):
        suffix = Path(visual).suffix.lower()
        for name in _PATH_MODALITIES:
            if suffix in SUFFIXES[name]:
                return name, str(visual)
        raise ValueError(f"visual {visual}: unknown extension {suffix!r} (images, audio or videos)")
    raise ValueError(f"cannot use a visual of type {type(visual).__name__}: give PIL images, "
                     "{'array', 'sampling_rate'} audio or image/audio/video paths")


def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """Audio samples ``[T]`` or ``[T, channels]`` as a float WAV file in memory."""
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


def lmms_eval_models() -> Any:
    """The payload of our ``lmms_eval.models`` entry point: the manifest of ``--model imagebind_llm``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{ImageBindLLMEval.__name__}")
