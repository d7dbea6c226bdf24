"""The OpenAI-compatible server, driven by the official `openai` client against a live server on 127.0.0.1.

The truth for every answer is the engine alone: the same conversation and media submitted to an `Engine`
directly must give exactly the text the server returns (greedy), whether requests come one by one or
many at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from imagebind_llm.engine import Engine, Request
from imagebind_llm.llm.generate import GREEDY

openai = pytest.importorskip("openai")

MEDIA = Path(__file__).parent / "fixtures" / "media"
IMAGE = base64.b64encode((MEDIA / "girl.jpg").read_bytes()).decode()
AUDIO = base64.b64encode((MEDIA / "girl_bgm.wav").read_bytes()).decode()


def _client(live, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=live.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _media_message(question: str) -> dict:
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{IMAGE}"}, "weight": 0.7},
        {"type": "input_audio", "input_audio": {"data": AUDIO, "format": "wav"}, "weight": 0.3},
        {"type": "text", "text": question}]}


def _alone(model, messages: list[dict], max_tokens: int, media: dict | None = None) -> str:
    """The engine's own answer (a fresh engine, nothing else running)."""
    parts = [{"type": name, name: source, "weight": weight} for name, (source, weight) in (media or {}).items()]
    if parts:
        messages = [*messages[:-1], {"role": "user", "content": [*parts, {"type": "text", "text": messages[-1]["content"]}]}]
    engine = Engine(model, max_batch=1, max_context=512, background=False)
    return engine.generate(Request(messages=messages, sampling=GREEDY.replace(max_new_tokens=max_tokens))).text.strip()


def test_plain_streamed_and_multimodal_answers_are_the_engines(start_server, seeing_demo):
    live = start_server()
    client = _client(live)
    assert [m.id for m in client.models.list().data] == ["imagebind-llm"]

    question = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(model="imagebind-llm", messages=question, max_tokens=12, temperature=0)
    assert plain.object == "chat.completion" and plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == _alone(seeing_demo, question, 12)
    prompt_ids = live.service.engine.prompt_ids(Request(messages=question))
    assert plain.usage.prompt_tokens == len(prompt_ids)
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="imagebind-llm", messages=question, max_tokens=12,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in content][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    media = {"image": (MEDIA / "girl.jpg", 0.7), "audio": (MEDIA / "girl_bgm.wav", 0.3)}
    seen = client.chat.completions.create(model="imagebind-llm", messages=[_media_message("Describe this.")],
                                          max_tokens=12, temperature=0)
    expected = _alone(seeing_demo, [{"role": "user", "content": "Describe this."}], 12, media)
    assert seen.choices[0].message.content == expected
    assert expected != _alone(seeing_demo, [{"role": "user", "content": "Describe this."}], 12)  # media matter


def test_a_multi_turn_conversation_goes_through_the_chat_template(start_server, seeing_demo):
    live = start_server()
    conversation = [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "Apple."},
                    {"role": "user", "content": "And a vegetable?"}]
    answer = _client(live).chat.completions.create(model="m", messages=conversation, max_tokens=10, temperature=0)
    assert answer.model == "m"
    assert answer.choices[0].message.content == _alone(seeing_demo, conversation, 10)
    assert answer.usage.prompt_tokens == len(live.service.engine.prompt_ids(Request(messages=conversation)))


def test_an_api_key_protected_server_refuses_a_missing_or_wrong_key(start_server):
    live = start_server(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError) as error:
        _client(live, "wrong").models.list()
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    missing = httpx.get(live.url + "/v1/models")  # no Authorization header at all
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert httpx.get(live.url + "/metrics").status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200  # health stays public, as llama.cpp's
    assert _client(live, "s3cret").chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                          max_tokens=3).choices[0].message.content


def test_concurrent_greedy_requests_get_what_they_get_alone_and_fifty_clients_all_finish(start_server, seeing_demo):
    live = start_server()
    questions = [f"Say something about the number {i}." for i in range(50)]
    expected = {i: _alone(seeing_demo, [{"role": "user", "content": q}], 6) for i, q in enumerate(questions[:8])}

    async def ask(client: "openai.AsyncOpenAI", i: int) -> tuple[int, str]:
        messages = [_media_message(questions[i])] if i % 5 == 4 else [{"role": "user", "content": questions[i]}]
        answer = await client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
        return i, answer.choices[0].message.content

    async def run() -> dict[int, str]:
        async with openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
            return dict(await asyncio.gather(*(ask(client, i) for i in range(50))))

    answers = asyncio.run(run())
    assert len(answers) == 50 and all(isinstance(a, str) for a in answers.values())
    assert {i: answers[i] for i in expected if i % 5 != 4} == {i: t for i, t in expected.items() if i % 5 != 4}
    metrics = httpx.get(live.url + "/metrics").text
    assert 'imagebind_llm_requests_total{endpoint="/v1/chat/completions",status="200"} 50.0' in metrics
    assert "imagebind_llm_time_to_first_token_seconds_count 50.0" in metrics


def test_a_client_that_disconnects_frees_its_row(start_server):
    live = start_server()
    engine = live.service.engine
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.running == 1
    deadline = time.monotonic() + 20  # 400 tokens take far longer than this
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.waiting == 0

    body["stream"] = False  # a non-streaming client that gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=1.5)
    deadline = time.monotonic() + 20
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0


def test_the_server_answers_503_while_the_model_loads(seeing_demo):
    from fastapi.testclient import TestClient

    from imagebind_llm.serve.app import create_app
    from imagebind_llm.serve.config import ServeConfig
    from imagebind_llm.serve.service import Service

    release = threading.Event()

    def load() -> Engine:
        release.wait(30)
        return Engine(seeing_demo, max_batch=2, max_context=512)

    service = Service(ServeConfig(ui=False), load=load)
    service.start()
    client = TestClient(create_app(service))
    assert client.get("/health").status_code == 503
    refused = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]})
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "model_loading"
    release.set()
    deadline = time.monotonic() + 30
    while not service.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                       "max_tokens": 3})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert client.get("/health").json() == {"status": "ok", "model": "imagebind-llm"}
    service.close()


@pytest.mark.parametrize("option", ["--max-batch 0", "--max-media-mb -1", "--port banana", "--threads 0"])
def test_serve_refuses_bad_options_in_one_line(option, capsys):
    from imagebind_llm.cli import main

    try:
        code = main(["serve", "--no-ui", *option.split()])
    except SystemExit as e:  # argparse's own type errors
        code = e.code
    assert code != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err.strip().splitlines()[-1]


def test_an_error_mid_stream_arrives_as_an_error_event_and_the_server_goes_on(start_server, monkeypatch):
    live = start_server()
    engine = live.service.engine

    def broken_decode() -> None:
        raise RuntimeError("decoder exploded")

    monkeypatch.setattr(engine, "_decode", broken_decode)  # the prefill's first token streams, then decoding fails
    body = {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 20, "stream": True}
    with httpx.Client(timeout=60) as client:
        lines = [line for line in client.post(live.url + "/v1/chat/completions", json=body).text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "Traceback" not in error["message"]
    monkeypatch.undo()
    assert _client(live).chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=3).choices[0].message.content
