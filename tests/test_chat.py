"""ChatSession (the engine's conversation) and the template choice: prompts built from the history, old
exchanges dropped when the context is full, the system message kept."""

from __future__ import annotations

import pytest

from imagebind_llm.engine import ChatSession, Engine
from imagebind_llm.llm.generate import GREEDY
from imagebind_llm.llm.templates import AlpacaTemplate, JinjaTemplate, alpaca_prompt
from imagebind_llm.llm.tokenizer import SentencePieceTokenizer
from imagebind_llm.model.factory import create_model
from test_factory import SMALL
from test_model import ADAPTER

SP_MODEL = ADAPTER / "llama" / "tokenizer.model"
FOUR = GREEDY.replace(max_new_tokens=4)


@pytest.fixture(scope="module")
def model():
    return create_model(SMALL)


def test_first_turn_is_the_official_prompt_with_bos(model):
    engine = Engine(model, background=False)
    assert isinstance(engine.template, AlpacaTemplate)  # no chat template in a tokenizer.model: Alpaca
    ids = engine.prompt_ids(ChatSession(engine).request("Describe the image in detail.", FOUR))
    assert ids == [1, *model.tokenizer.sp.encode(alpaca_prompt("Describe the image in detail."))]


def test_respond_records_history_and_streams_the_answer(model):
    session = ChatSession(Engine(model, background=False))
    pieces = list(session.respond("hi", FOUR))
    assert pieces and session.history == [{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": "".join(pieces).strip()}]
    session.reset()
    assert session.history == []


def test_old_exchanges_are_dropped_when_the_context_is_full(model):
    first = [{"role": "user", "content": "first question " * 10}, {"role": "assistant", "content": "first answer"}]
    second = [{"role": "user", "content": "second"}, {"role": "assistant", "content": "two"}]
    probe = ChatSession(Engine(model, background=False), history=second)
    fits = len(probe.engine.prompt_ids(probe.request("third", FOUR))) + FOUR.max_new_tokens
    session = ChatSession(Engine(model, background=False, max_context=fits), history=first + second)
    answer = "".join(session.respond("third", FOUR)).strip()
    assert session.history == [*second, {"role": "user", "content": "third"}, {"role": "assistant", "content": answer}]
    lone = ChatSession(Engine(model, background=False, max_context=fits))
    with pytest.raises(ValueError, match="shorten the conversation"):
        list(lone.respond("word " * fits, FOUR))


def test_model_template_and_system_message(model, monkeypatch):
    tokenizer = SentencePieceTokenizer(SP_MODEL, chat_template="{{ bos_token }}{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    monkeypatch.setattr(model, "tokenizer", tokenizer)
    engine = Engine(model, background=False)
    assert isinstance(engine.template, JinjaTemplate) and engine.template.writes_bos
    # The template writes BOS itself: exactly one BOS.
    request = ChatSession(engine, system="sys").request("q", FOUR)
    assert engine.prompt_ids(request) == [1, *tokenizer.encode("sys|q|", bos=False)]
