"""Structured outputs: how often the embedded model's JSON is valid with and without a grammar, and what the mask costs.

``--prompts`` prompts (default 50) for each of 5 JSON schemas (nested objects, enums, arrays, numbers, booleans)
run through one `Engine` (continuous batching, ``--max-batch`` rows, greedy) twice: unconstrained, the
prompt asking for "only a JSON object matching this schema", and constrained by the schema
(`Request(constraint=schema)`). Each answer is parsed with ``json.loads`` and validated with ``jsonschema``.

Printed per run: valid answers (strict: the whole answer is the JSON value; lenient, unconstrained only: the
first ``{...}`` in the answer), answers cut off by ``--max-new-tokens`` before the JSON closed (counted
apart: a constraint guarantees the form, not the length), wall ms per generated token, and for the
constrained run the time spent computing masks and advancing the grammar per token (µs), measured around
`ConstraintState.mask`/`advance` in the same run. The schemas bound their strings (``maxLength``) and arrays
(``maxItems``) so that every answer fits the token budget.

    python bench/constrain.py [--prompts 50] [--max-batch 8] [--max-new-tokens 200] [--schemas person,product]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import jsonschema
import torch

import imagebind_llm as ibl
from imagebind_llm.engine import Engine, Request
from imagebind_llm.llm import constrain
from imagebind_llm.llm.generate import GREEDY

_S = {"type": "string", "maxLength": 32}
SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {
        "name": _S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "favourite_color": {"enum": ["red", "green", "blue", "yellow", "black", "white"]},
        "hobbies": {"type": "array", "items": _S, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": _S, "country": _S},
                    "required": ["city", "country"], "additionalProperties": False}},
        "required": ["name", "age", "favourite_color", "hobbies", "address"], "additionalProperties": False},
    "product": {"type": "object", "properties": {
        "name": _S, "price": {"type": "number", "minimum": 0},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]}, "in_stock": {"type": "boolean"},
        "dimensions_cm": {"type": "object", "properties": {"width": {"type": "number"}, "height": {"type": "number"}},
                          "required": ["width", "height"], "additionalProperties": False}},
        "required": ["name", "price", "currency", "in_stock", "dimensions_cm"], "additionalProperties": False},
    "events": {"type": "object", "properties": {
        "events": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"title": _S, "year": {"type": "integer"},
                                             "kind": {"enum": ["war", "science", "art", "politics", "sport"]}},
            "required": ["title", "year", "kind"], "additionalProperties": False}}},
        "required": ["events"], "additionalProperties": False},
    "weather": {"type": "object", "properties": {
        "city": _S, "temperature_c": {"type": "number", "minimum": -90, "maximum": 60},
        "conditions": {"enum": ["sunny", "cloudy", "rain", "snow", "storm", "fog"]},
        "forecast_c": {"type": "array", "items": {"type": "number"}, "maxItems": 5}},
        "required": ["city", "temperature_c", "conditions", "forecast_c"], "additionalProperties": False},
    "recipe": {"type": "object", "properties": {
        "title": _S, "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
        "ingredients": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"item": _S, "grams": {"type": "number", "minimum": 0}},
            "required": ["item", "grams"], "additionalProperties": False}}},
        "required": ["title", "servings", "difficulty", "ingredients"], "additionalProperties": False},
}
SUBJECTS = {
    "person": ["a famous painter", "a chef from Lyon", "a retired astronaut", "a young football player", "a jazz pianist",
               "a school teacher in Kenya", "a marine biologist", "a medieval knight", "a software engineer",
               "a detective in a novel"],
    "product": ["a coffee mug", "a laptop", "a wooden chair", "a bicycle helmet", "a pair of headphones",
                "a desk lamp", "a backpack", "a kitchen knife", "a board game", "a smartphone case"],
    "events": ["the 20th century", "ancient Rome", "the history of France", "the space race", "the Renaissance",
               "the Olympic games", "computing", "medicine", "the 19th century", "Japan"],
    "weather": ["Paris in spring", "Oslo in winter", "Cairo in summer", "Tokyo today", "London in autumn",
                "Sydney in January", "Moscow in February", "Mumbai in the monsoon", "New York tomorrow", "Lima"],
    "recipe": ["pancakes", "a tomato soup", "guacamole", "a chocolate cake", "fried rice", "a Greek salad",
               "lemonade", "a mushroom risotto", "bread", "an omelette"],
}
PHRASINGS = ["Describe {}.", "Give me the details of {}.", "Tell me about {}.", "Write a short record for {}.",
             "Fill in the data for {}."]


def prompts(schema: str, n: int) -> list[str]:
    """``n`` prompts about the schema's subjects, each asking for only a JSON object matching the schema."""
    text = json.dumps(SCHEMAS[schema])
    out = [f"{p.format(s)} Answer with only a JSON object matching this JSON schema: {text}"
           for p in PHRASINGS for s in SUBJECTS[schema]]
    return [out[i % len(out)] for i in range(n)]


@dataclass
class Outcome:
    schema: str
    text: str
    tokens: int
    finish_reason: str

    def valid(self, lenient: bool = False) -> bool:
        text = self.text.strip()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            if not lenient or "{" not in text:
                return False
            try:
                value, _ = json.JSONDecoder().raw_decode(text[text.index("{"):])
            except json.JSONDecodeError:
                return False
        try:
            jsonschema.validate(value, SCHEMAS[self.schema])
        except jsonschema.ValidationError:
            return False
        return True

    @property
    def cut(self) -> bool:
        return self.finish_reason == "length"


class _MaskTimer:
    """Time spent in `ConstraintState.mask` and `advance` (patched for the run)."""

    def __init__(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def __enter__(self) -> "_MaskTimer":
        self._mask, self._advance = constrain.ConstraintState.mask, constrain.ConstraintState.advance
        timer = self

        def timed(fn):
            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    timer.seconds += time.perf_counter() - start
            return wrapper

        def mask(*args, **kwargs):
            timer.calls += 1
            return timed(self._mask)(*args, **kwargs)

        constrain.ConstraintState.mask, constrain.ConstraintState.advance = mask, timed(self._advance)
        return self

    def __exit__(self, *exc) -> None:
        constrain.ConstraintState.mask, constrain.ConstraintState.advance = self._mask, self._advance


def run(engine: Engine, cases: list[tuple[str, str]], *, constrained: bool, max_new_tokens: int) -> tuple[list[Outcome], float]:
    """All ``cases`` (schema, prompt) submitted at once; the outcomes and the wall time."""
    sampling = GREEDY.replace(max_new_tokens=max_new_tokens)
    start = time.perf_counter()
    handles = [engine.submit(Request.ask(prompt, sampling=sampling, constraint=SCHEMAS[schema] if constrained else None))
               for schema, prompt in cases]
    engine.run_until_idle()
    results = [h.result() for h in handles]
    wall = time.perf_counter() - start
    return [Outcome(schema, c.text, len(c.tokens), c.finish_reason) for (schema, _), c in zip(cases, results)], wall


def report(label: str, outcomes: list[Outcome], wall: float, lenient: bool) -> dict:
    n = len(outcomes)
    tokens = sum(o.tokens for o in outcomes)
    valid = sum(o.valid() for o in outcomes)
    cut = sum(o.cut for o in outcomes)
    line = f"{label:13s} valid {valid}/{n} ({100 * valid / n:.1f}%)"
    if lenient:
        loose = sum(o.valid(lenient=True) for o in outcomes)
        line += f", lenient {loose}/{n} ({100 * loose / n:.1f}%)"
    uncut = [o for o in outcomes if not o.cut]
    line += (f"; cut off {cut}; valid among not cut {sum(o.valid() for o in uncut)}/{len(uncut)}; "
             f"{tokens} tokens, {1e3 * wall / max(tokens, 1):.2f} ms/token wall")
    print(line, flush=True)
    per_schema = {s: f"{sum(o.valid() for o in outcomes if o.schema == s)}/{sum(o.schema == s for o in outcomes)}"
                  for s in dict.fromkeys(o.schema for o in outcomes)}
    print(f"{'':13s} per schema: {per_schema}", flush=True)
    return {"valid": valid, "n": n, "cut": cut, "tokens": tokens, "wall": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="prompts per schema")
    parser.add_argument("--schemas", default=",".join(SCHEMAS), help="comma-separated schema names")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = ibl.create_model("tiny-random", max_seq_len=1024)
    engine = Engine(model, max_batch=args.max_batch, max_queue=10_000, max_context=1024, background=False)
    cases = [(s, p) for s in args.schemas.split(",") for p in prompts(s, args.prompts)]
    print(f"{len(cases)} cases ({args.prompts} prompts x {len(args.schemas.split(','))} schemas), "
          f"max_batch {args.max_batch}, max_new_tokens {args.max_new_tokens}, greedy", flush=True)
    start = time.perf_counter()
    constrain.engine_tokenizer(engine.tokenizer, model.llm.config.vocab_size)
    print(f"llguidance tokenizer built once in {1e3 * (time.perf_counter() - start):.0f} ms", flush=True)
    start = time.perf_counter()
    for schema in SCHEMAS.values():
        constrain.Constraint.json_schema(schema).start(engine.tokenizer, model.llm.config.vocab_size)
    print(f"grammar compile (per request): {1e3 * (time.perf_counter() - start) / len(SCHEMAS):.2f} ms", flush=True)
    run(engine, cases[:2], constrained=True, max_new_tokens=8)  # warm-up
    free, free_wall = run(engine, cases, constrained=False, max_new_tokens=args.max_new_tokens)
    plain = report("unconstrained", free, free_wall, lenient=True)
    with _MaskTimer() as timer:
        bound, bound_wall = run(engine, cases, constrained=True, max_new_tokens=args.max_new_tokens)
    strict = report("constrained", bound, bound_wall, lenient=False)
    print(f"mask + advance: {1e6 * timer.seconds / max(timer.calls, 1):.0f} us per token ({timer.calls} tokens), "
          f"{100 * timer.seconds / bound_wall:.1f}% of the constrained run's wall time; wall ms/token "
          f"{1e3 * plain['wall'] / plain['tokens']:.2f} unconstrained vs "
          f"{1e3 * strict['wall'] / strict['tokens']:.2f} constrained", flush=True)


if __name__ == "__main__":
    main()
