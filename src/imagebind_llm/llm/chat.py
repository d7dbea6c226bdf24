"""Multi-turn text chat on a loaded LLM: history + template + streaming generation."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .generate import stream
from .model import Transformer
from .templates import ChatTemplate, Message, get_template
from .tokenizer import BaseTokenizer

logger = logging.getLogger(__name__)


def choose_template(name: str | None, tokenizer: BaseTokenizer) -> ChatTemplate:
    """The template called `name`; None picks the model's own chat template, or Alpaca when it has none.

    Alpaca is the fallback because it is ImageBind-LLM's format (LLaMA checkpoints ship no template).
    """
    if name is None:
        name = "model" if tokenizer.chat_template else "alpaca"
    return get_template(name, chat_template=tokenizer.chat_template, bos_token=tokenizer.bos_token,
                        eos_token=tokenizer.eos_token)


@dataclass
class ChatSession:
    """A conversation with one model; each `respond` call adds a user turn and the model's answer.

    When the whole conversation no longer fits the model's context together with `max_new_tokens`,
    the oldest exchanges are dropped (the system message is kept).
    """

    model: Transformer
    tokenizer: BaseTokenizer
    template: ChatTemplate
    system: str | None = None
    history: list[Message] = field(default_factory=list)

    def messages(self, user: str | None = None) -> list[Message]:
        """System message (if any), the history, and `user` as the next turn."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, *([{"role": "user", "content": user}] if user is not None else [])]

    def prompt_ids(self, user: str, max_new_tokens: int) -> list[int]:
        """Token ids of the prompt for the next turn, dropping old exchanges if the context is too short.

        Raises:
            ValueError: even the last user turn alone does not fit.
        """
        bos = self.tokenizer.add_bos and not self.template.writes_bos
        limit = self.model.config.max_seq_len - max_new_tokens
        while True:
            ids = self.tokenizer.encode(self.template.render(self.messages(user)), bos=bos)
            if len(ids) <= limit:
                return ids
            if not self.history:
                raise ValueError(f"the prompt has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                                 f"the model's context of {self.model.config.max_seq_len}; shorten it")
            logger.info("conversation too long (%d tokens): dropping the oldest exchange", len(ids))
            self.history = self.history[2:]

    def respond(self, user: str, *, max_new_tokens: int = 256, **sampling: Any) -> Iterator[str]:
        """Yield the model's answer to `user` in text pieces as they are generated; then record the exchange.

        Args:
            user: the user's message.
            max_new_tokens: answer length limit.
            sampling: ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty`` (see `generate`).
        """
        ids = self.prompt_ids(user, max_new_tokens)
        stop_strings = getattr(self.template, "stop_strings", ())
        pieces = []
        for piece in stream(self.model, self.tokenizer, ids, max_new_tokens=max_new_tokens,
                            stop_token_ids=self.tokenizer.stop_ids, stop_strings=stop_strings, **sampling):
            pieces.append(piece)
            yield piece
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(pieces).strip()}]

    def reset(self) -> None:
        """Forget the history (the system message stays)."""
        self.history = []
