"""Structured outputs and tool calls through the server, driven by the official `openai` client: response_format
json_schema / json_object, and the two-request tool flow (request -> tool_calls -> the client appends the call and
the tool's result -> answer), whole and streamed as OpenAI streams tool calls."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 24}},
                   "required": ["zone"], "additionalProperties": False}}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def _client(live) -> "openai.OpenAI":
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _tool_schema(name: str) -> dict:
    return next(t for t in (WEATHER, TIME) if t["function"]["name"] == name)["function"]["parameters"]


def test_response_format_json_schema_and_json_object(start_server):
    client = _client(start_server())
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "number", "minimum": 0},
                                               "continent": {"enum": ["Europe", "Asia", "Africa", "America"]}},
              "required": ["capital", "population_millions", "continent"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model="imagebind-llm", messages=[{"role": "user", "content": "Tell me about France."}], max_tokens=64,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "country", "schema": schema,
                                                                               "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)

    loose = client.chat.completions.create(
        model="imagebind-llm", messages=[{"role": "user", "content": "Describe a cat as JSON."}], max_tokens=64,
        temperature=0.7, seed=1, response_format={"type": "json_object"})
    if loose.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(loose.choices[0].message.content), dict)
    else:  # cut off by max_tokens: the only way a constrained answer is not valid
        assert loose.choices[0].finish_reason == "length"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="imagebind-llm", messages=QUESTION, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}})
    assert e.value.body["param"].startswith("response_format")


def test_tool_call_flow_end_to_end(start_server):
    client = _client(start_server())
    first = client.chat.completions.create(model="imagebind-llm", messages=QUESTION, tools=[WEATHER, TIME],
                                           max_tokens=64, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "get_time")
    jsonschema.validate(json.loads(call.function.arguments), _tool_schema(call.function.name))

    # the client runs the tool and sends the call and its result back: the answer is text ("auto")
    messages = [*QUESTION, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    second = client.chat.completions.create(model="imagebind-llm", messages=messages, tools=[WEATHER, TIME],
                                            max_tokens=24, temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content

    # a named function is always the one called
    named = client.chat.completions.create(model="imagebind-llm", messages=QUESTION, tools=[WEATHER, TIME],
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           max_tokens=64, temperature=0)
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), _tool_schema("get_time"))

    none = client.chat.completions.create(model="imagebind-llm", messages=QUESTION, tools=[WEATHER],
                                          tool_choice="none", max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="imagebind-llm", messages=QUESTION, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_streamed_tool_calls_match_the_whole_answer(start_server):
    client = _client(start_server())
    whole = client.chat.completions.create(model="imagebind-llm", messages=QUESTION, tools=[WEATHER],
                                           tool_choice="required", max_tokens=64, temperature=0)
    chunks = list(client.chat.completions.create(model="imagebind-llm", messages=QUESTION, tools=[WEATHER],
                                                 tool_choice="required", max_tokens=64, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    deltas = [c.choices[0] for c in chunks if c.choices]
    head = deltas[0].delta
    assert head.role == "assistant" and head.tool_calls[0].index == 0
    assert head.tool_calls[0].id.startswith("call_") and head.tool_calls[0].type == "function"
    assert head.tool_calls[0].function.name == "get_weather"
    pieces = [d.delta.tool_calls[0].function.arguments for d in deltas[1:] if d.delta.tool_calls]
    assert len(pieces) > 1  # streamed in pieces, not at once
    assert all(d.delta.tool_calls[0].index == 0 and d.delta.tool_calls[0].id is None for d in deltas[1:]
               if d.delta.tool_calls)
    assert "".join(pieces) == whole.choices[0].message.tool_calls[0].function.arguments
    assert [d.finish_reason for d in deltas][-1] == "tool_calls" and all(d.finish_reason is None for d in deltas[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
