"""Multi-turn chat about media: the conversation is kept as text, the media feature stays injected."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from imagebind_llm.llm.chat import ChatSession, choose_template
from imagebind_llm.model.imagebind_llm import ImageBindLLM, MediaInputs
from imagebind_llm.model.retrieval import FeatureRetriever


@dataclass
class MediaChatSession(ChatSession):
    """A `ChatSession` whose every turn carries the same per-layer injections (``None``: plain text chat)."""

    injections: list[torch.Tensor | None] | None = None

    def respond(self, user: str, *, max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        return super().respond(user, max_new_tokens=max_new_tokens, injections=self.injections, **sampling)


def start_chat(model: ImageBindLLM, media: MediaInputs | None = None, *, template: str | None = None,
               system: str | None = None, cache: FeatureRetriever | None = None, cache_top_k: int = 10,
               cache_temperature: float = 20.0, cache_weight: float = 0.5) -> MediaChatSession:
    """Open a conversation about ``media``; the media are encoded once, here.

    Args:
        template: prompt template name (see `imagebind_llm.llm.chat.choose_template`); None picks the
            model's own chat template, else Alpaca (ImageBind-LLM's format).
    """
    injections = model.media_injections(media, cache, top_k=cache_top_k, temperature=cache_temperature,
                                        weight=cache_weight)
    return MediaChatSession(model.llm, model.tokenizer, choose_template(template, model.tokenizer), system=system,
                            injections=injections)
