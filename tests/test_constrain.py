"""Constrained decoding (`imagebind_llm.llm.constrain`): masks from JSON schemas and regular expressions on both
tokenizer kinds (the embedded SmolLM2's byte-level BPE, and a SentencePiece model trained here with byte
fallback, as LLaMA's), the sampler's mask, and the engine generating valid JSON for every prompt."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from imagebind_llm.engine import Engine, Request  # noqa: E402
from imagebind_llm.llm.constrain import Constraint, ConstraintError, as_constraint, masks  # noqa: E402
from imagebind_llm.llm.generate import GREEDY, sample  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "constrain.py"

# Bounded everywhere (strings, arrays, numbers), so that a random walk under the mask ends.
SMALL_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "kind": {"enum": ["rain", "snow", "sun"]},
    "days": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
    "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
               "additionalProperties": False}},
    "required": ["city", "kind", "days", "nested"], "additionalProperties": False}


def _random_walk(constraint: Constraint, tokenizer, vocab_size: int, seed: int, limit: int = 400) -> tuple[list[int], bool]:
    """Tokens drawn uniformly among those the mask allows, until the grammar is done (or an end token)."""
    rng = random.Random(seed)
    state = constraint.start(tokenizer, vocab_size)
    tokens: list[int] = []
    for _ in range(limit):
        allowed = state.mask().nonzero().flatten().tolist()
        assert allowed, "the mask allows nothing"
        token = rng.choice(allowed)
        if token in tokenizer.stop_ids:
            return tokens, state.accepting
        state.advance(token)
        tokens.append(token)
        if state.done:
            return tokens, True
    return tokens, False


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory):
    """A tiny SentencePiece BPE model with byte fallback (LLaMA's kind), trained on a few sentences."""
    import sentencepiece

    from imagebind_llm.llm.tokenizer import SentencePieceTokenizer

    text = ['The quick brown fox jumps over the lazy dog near the river bank.', 'Objects like {"city": "Paris"} '
            'hold keys and values, arrays [1, 2, 3] and numbers 12.5 or -7.', 'Snow, rain and sun: the weather '
            'today in Oslo, Lima and Tokyo.', 'true false null'] * 40
    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(prefix), vocab_size=320,
                                             model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                             minloglevel=2)
    return SentencePieceTokenizer(f"{prefix}.model")


@pytest.mark.parametrize("seed", range(4))
def test_sentencepiece_vocabulary_random_walks_give_valid_json(sentencepiece_tokenizer, seed):
    tok = sentencepiece_tokenizer
    tokens, complete = _random_walk(Constraint.json_schema(SMALL_SCHEMA), tok, tok.vocab_size, seed)
    assert complete
    jsonschema.validate(json.loads(tok.decode(tokens)), SMALL_SCHEMA)


def test_sentencepiece_regex_and_padded_vocabulary(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    tokens, complete = _random_walk(Constraint.regex(r"(yes|no) [0-9]{2}"), tok, tok.vocab_size + 7, 0)
    assert complete
    text = tok.decode(tokens)
    assert text.split(" ")[0] in ("yes", "no") and len(text.split(" ")[1]) == 2
    state = Constraint.regex("a").start(tok, tok.vocab_size + 7)
    assert state.mask().shape == (tok.vocab_size + 7,) and not state.mask()[tok.vocab_size:].any()


@pytest.mark.parametrize("seed", range(3))
def test_byte_level_bpe_random_walks_give_valid_json(seeing_demo, seed):
    tok, vocab = seeing_demo.tokenizer, seeing_demo.llm.config.vocab_size
    tokens, complete = _random_walk(Constraint.json_schema(SMALL_SCHEMA), tok, vocab, seed)
    assert complete
    jsonschema.validate(json.loads(tok.decode(tokens)), SMALL_SCHEMA)


def test_mask_steers_the_sampler_and_batches_rows(seeing_demo):
    tok, vocab = seeing_demo.tokenizer, seeing_demo.llm.config.vocab_size
    digit = Constraint.regex("[0-9]").start(tok, vocab)
    batch = masks([digit, None], vocab)
    assert batch.shape == (2, vocab) and batch[1].all()
    allowed = set(batch[0].nonzero().flatten().tolist())
    assert {tok.decode([i]) for i in allowed} == set("0123456789")
    logits = torch.randn(2, vocab)
    greedy = sample(logits, mask=batch)
    assert int(greedy[0]) in allowed and int(greedy[1]) == int(logits[1].argmax())
    hot = sample(logits.repeat(32, 1), temperature=2.0, top_p=0.9, mask=batch.repeat(32, 1),
                 generator=torch.Generator().manual_seed(0))
    assert set(hot[0::2].tolist()) <= allowed
    assert masks([None, None], vocab) is None


def test_bad_constraints_are_refused():
    with pytest.raises(ConstraintError, match="not valid JSON"):
        Constraint.json_schema("{nope")
    with pytest.raises(ConstraintError):
        Constraint.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}).check()
    with pytest.raises(ConstraintError):
        Constraint.regex("(unclosed").check()
    with pytest.raises(ConstraintError, match="Constraint.regex"):
        as_constraint("[a-z]+")
    assert as_constraint({"type": "integer"}) == Constraint.json_schema({"type": "integer"})


def test_engine_rows_each_follow_their_own_constraint(seeing_demo):
    engine = Engine(seeing_demo, max_batch=4, max_context=512, background=False)
    greedy = GREEDY.replace(max_new_tokens=48)
    handles = [engine.submit(Request.ask("Give a zip code.", sampling=greedy, constraint=Constraint.regex("[0-9]{5}"))),
               engine.submit(Request.ask("Is the sky blue?", sampling=greedy,
                                         constraint={"enum": ["yes", "no"]})),
               engine.submit(Request.ask("Name a colour.", sampling=GREEDY.replace(max_new_tokens=6)))]
    zip_code, answer, free = (h.result() for h in handles)
    assert len(zip_code.text) == 5 and zip_code.text.isdigit() and zip_code.finish_reason == "stop"
    assert len(zip_code.tokens) <= 5  # the row ends with the grammar: no extra step for an end token
    assert json.loads(answer.text) in ("yes", "no")
    assert free.finish_reason == "length" and len(free.tokens) == 6  # the unconstrained row is untouched
    alone = Engine(seeing_demo, max_batch=1, max_context=512, background=False)
    assert alone.generate(Request.ask("Name a colour.", sampling=GREEDY.replace(max_new_tokens=6))).text == free.text


def test_a_bad_constraint_fails_only_its_request(seeing_demo):
    engine = Engine(seeing_demo, max_batch=2, max_context=512, background=False)
    bad = engine.submit(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=4),
                                    constraint=Constraint.regex("(unclosed")))
    good = engine.submit(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=4)))
    with pytest.raises(ConstraintError):
        bad.result()
    assert len(good.result().tokens) == 4


@pytest.mark.slow
def test_every_constrained_answer_of_the_reduced_bench_is_valid(seeing_demo):
    """5 prompts x 5 schemas through one engine (batched, greedy): all parse and validate, none cut off."""
    spec = importlib.util.spec_from_file_location("bench_constrain", BENCH)
    bench = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # its dataclass needs the module
    spec.loader.exec_module(bench)
    cases = [(s, p) for s in bench.SCHEMAS for p in bench.prompts(s, 5)]
    engine = Engine(seeing_demo, max_batch=8, max_context=512, background=False)
    outcomes, _ = bench.run(engine, cases, constrained=True, max_new_tokens=160)
    assert [o for o in outcomes if o.cut] == []
    assert [o.text for o in outcomes if not o.valid()] == []


def test_ask_json_schema_option(tmp_path, capsys):
    from imagebind_llm.cli import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
                                  "required": ["answer"], "additionalProperties": False}))
    assert main(["ask", "--json-schema", str(schema), "--temperature", "0", "--max-new-tokens", "16",
                 "Is Paris in France?"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] in ("yes", "no")
    schema.write_text("{not json")
    assert main(["ask", "--json-schema", str(schema), "Is Paris in France?"]) != 0
    assert "not valid JSON" in capsys.readouterr().err
