"""Multi-turn chat through the engine: the conversation is kept as text; the media are encoded once, on the
first turn, and their feature rides on every turn."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.engine.engine import Engine
from imagebind_llm.engine.request import Request
from imagebind_llm.llm.generate import SamplingOptions

log = logging.getLogger(__name__)


@dataclass
class ChatSession:
    """A conversation about ``media`` (``{modality: source}``, sources may be loaded tensors).

    When the conversation no longer fits the engine's context with the answer, the oldest exchanges are
    dropped (the system message stays).
    """

    engine: Engine
    media: Mapping[str, Any] | None = None
    weights: Mapping[str, float] | None = None
    system: str | None = None
    blend: BlendOptions = field(default_factory=BlendOptions)
    history: list[dict[str, str]] = field(default_factory=list)
    features: torch.Tensor | None = None  # the media's mixed ImageBind feature, once encoded

    def request(self, user: str, sampling: SamplingOptions) -> Request:
        """The engine request for the next turn."""
        if self.features is None and self.media:
            self.features = self.engine.encode(Request.ask("", self.media, self.weights))
        system = [{"role": "system", "content": self.system}] if self.system else []
        return Request(messages=[*system, *self.history, {"role": "user", "content": user}], sampling=sampling,
                       blend=self.blend, features=self.features)

    def respond(self, user: str, sampling: SamplingOptions | None = None) -> Iterator[str]:
        """Yield the answer to ``user`` in pieces; then record the exchange."""
        sampling = sampling or SamplingOptions()
        while True:
            request = self.request(user, sampling)
            length = len(self.engine.tokenizer.encode(self.engine.template.render(request.text_messages())))
            if length + sampling.max_new_tokens <= self.engine.max_context or not self.history:
                break
            log.info("conversation too long (%d tokens): dropping the oldest exchange", length)
            self.history = self.history[2:]
        pieces = []
        for piece in self.engine.submit(request).stream():
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def reset(self) -> None:
        """Forget the history (the system message and the media stay)."""
        self.history = []
