"""`Request`: what a caller asks of the engine — chat messages whose content may hold media parts, plus
how to sample (`SamplingOptions`) and how to blend with the cache (`BlendOptions`).

A message is ``{"role": "user", "content": "text"}`` or ``{"role": "user", "content": [parts]}`` with
parts ``{"type": "text", "text": "..."}`` and media parts ``{"type": "image", "image": source,
"weight": 0.4}`` for every modality of `imagebind_llm.model.media.MODALITIES`. A source is a path,
bytes, a file object (``text``: a string) or an already loaded tensor ``[1, ...]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.llm.generate import SamplingOptions
from imagebind_llm.llm.templates import Message
from imagebind_llm.model.media import MediaInputs, check_weight, check_weights, modality


@dataclass
class Request:
    """One generation (or scoring) request.

    Attributes:
        messages: the conversation, the last message from the user.
        sampling: how to sample the answer (default: the official ImageBind-LLM options).
        blend: cache blend options; unset fields use the cache's stored defaults.
        prompt_ids: token ids of an already formatted prompt; when given, ``messages`` only carry the media.
        features: the media's mixed ImageBind feature ``[1, feature_dim]`` computed before
            (`Engine.encode`); the media parts are then not loaded or encoded again (a chat's later turns,
            several questions about one image). The cache blend still applies.
        constraint: what the answer must match (constrained decoding, `imagebind_llm.llm.constrain`): a
            `Constraint` (``Constraint.json_schema(...)``, ``.regex(...)``, ``.json_object()``) or a JSON-schema
            dict. The answer then ends as soon as the grammar is complete; stop strings and
            ``min_new_tokens`` do not apply. Needs the ``structured`` extra.
    """

    messages: Sequence[Mapping[str, Any]] = ()
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    blend: BlendOptions = field(default_factory=BlendOptions)
    prompt_ids: Sequence[int] | None = None
    features: torch.Tensor | None = None
    constraint: Any = None  # Constraint | JSON-schema dict | None

    @classmethod
    def ask(cls, question: str, media: Mapping[str, Any] | None = None, weights: Mapping[str, float] | None = None,
            **options: Any) -> "Request":
        """A one-turn request: ``Request.ask("What is this?", {"image": "a.jpg"}, sampling=GREEDY)``."""
        parts = [{"type": name, name: source, "weight": (weights or {}).get(name, 1.0)}
                 for name, source in (media or {}).items()]
        return cls(messages=[{"role": "user", "content": [*parts, {"type": "text", "text": question}]}], **options)

    def text_messages(self) -> list[Message]:
        """The messages with only their text (media parts removed), for the prompt template."""
        out = []
        for message in self.messages:
            content = message.get("content")
            if not isinstance(content, str):
                content = "\n".join(p["text"] for p in _parts(content) if p.get("type") == "text")
            out.append({"role": message.get("role", "user"), "content": content})
        return out

    def media(self, dtype: torch.dtype = torch.float32) -> MediaInputs | None:
        """The request's media as ``{modality: (tensor [1, ...], weight)}``, loading sources; None without media.

        Raises:
            ValueError: an unknown part type, a modality given twice, a bad weight, or all weights 0.
        """
        inputs: dict[str, tuple[torch.Tensor, float]] = {}
        for message in self.messages:
            content = message.get("content")
            for part in [] if isinstance(content, str) else _parts(content):
                kind = part.get("type")
                if kind == "text":
                    continue
                entry = modality(str(kind))
                if entry.name in inputs:
                    raise ValueError(f"the request has two {entry.name} parts; ImageBind-LLM mixes one input per "
                                     "modality (give the others their own request)")
                source = part.get(entry.name, part.get("source"))
                if source is None:
                    raise ValueError(f"the {entry.name} part has no {entry.name!r} field with the source")
                tensor = source if torch.is_tensor(source) else entry.load([source])
                tensor = tensor.to(dtype) if tensor.is_floating_point() else tensor
                inputs[entry.name] = (tensor, check_weight(entry.name, part.get("weight", 1.0)))
        check_weights({name: w for name, (_, w) in inputs.items()})  # all at 0: refused here, before encoding
        return inputs or None


def _parts(content: Any) -> list[Mapping[str, Any]]:
    if not isinstance(content, Sequence) or not all(isinstance(p, Mapping) for p in content):
        raise ValueError(f"message content must be a string or a list of parts like {{'type': 'text', 'text': ...}}, "
                         f"got {type(content).__name__}")
    return list(content)
