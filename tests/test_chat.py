"""ChatSession: prompts built from the history, old exchanges dropped when the context is full."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imagebind_llm.llm.chat import ChatSession, choose_template
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.templates import AlpacaTemplate, JinjaTemplate, alpaca_prompt
from imagebind_llm.llm.tokenizer import SentencePieceTokenizer

SP_MODEL = Path(__file__).parent / "fixtures" / "adapter" / "llama" / "tokenizer.model"


@pytest.fixture()
def session():
    torch.manual_seed(0)
    model = Transformer(LLMConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=200))
    tokenizer = SentencePieceTokenizer(SP_MODEL)
    return ChatSession(model.eval(), tokenizer, choose_template(None, tokenizer))


def test_first_turn_is_the_official_prompt_with_bos(session):
    assert isinstance(session.template, AlpacaTemplate)  # no chat template in a tokenizer.model
    ids = session.prompt_ids("Describe the image in detail.", max_new_tokens=8)
    assert ids == [1, *session.tokenizer.sp.encode(alpaca_prompt("Describe the image in detail."))]


def test_respond_records_history_and_streams_the_answer(session):
    pieces = list(session.respond("hi", max_new_tokens=4))
    assert session.history == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "".join(pieces).strip()}]
    session.reset()
    assert session.history == []


def test_old_exchanges_are_dropped_when_the_context_is_full(session):
    session.history = [
        {"role": "user", "content": "first question " * 3}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"},
    ]
    ids = session.prompt_ids("third", max_new_tokens=8)
    assert len(ids) <= 200 - 8
    assert session.history == [{"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}]
    assert ids == session.tokenizer.encode(session.template.render(session.messages("third")))
    with pytest.raises(ValueError, match="exceeds the model.s context of 200; shorten it"):
        session.prompt_ids("word " * 200, max_new_tokens=8)


def test_model_template_and_system_message():
    tokenizer = SentencePieceTokenizer(SP_MODEL, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    template = choose_template(None, tokenizer)
    assert isinstance(template, JinjaTemplate) and template.writes_bos
    model = Transformer(LLMConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=64))
    session = ChatSession(model, tokenizer, template, system="sys")
    # The template writes BOS itself: exactly one BOS.
    assert session.prompt_ids("q", max_new_tokens=4) == [1, *tokenizer.encode("sys|q|", bos=False)]
