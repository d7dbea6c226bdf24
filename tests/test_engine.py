"""The engine: continuous batching gives each request exactly what it gets alone; cancellation, the bounded
queue, streaming, per-request errors, and log-likelihood scoring against the model's own logits."""

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import imagebind_llm as ibl
from imagebind_llm.engine import Engine, QueueFullError, Request, loglikelihood
from imagebind_llm.llm.generate import GREEDY

MEDIA = Path(__file__).parent / "fixtures" / "media"


@pytest.fixture
def model(seeing_demo):
    """The embedded demo with non-zero gates, so that media change the answers."""
    return seeing_demo


def _requests() -> list[Request]:
    questions = ["Name a colour.", "What is 2+2?", "Say hello in French.", "List three fruits.", "Describe a cat.",
                 "What is the capital of Italy?", "Write a haiku about rain.", "Why is the sky blue?"]
    media = [None, {"image": MEDIA / "girl.jpg"}, {"audio": MEDIA / "dog_audio.wav"},
             {"image": MEDIA / "car_image.jpg", "text": "a red car"}]
    out = []
    for i in range(16):
        sampling = GREEDY.replace(max_new_tokens=6 + 3 * (i % 5))
        if i % 4 == 0:
            sampling = sampling.replace(stop_strings=(".", "e"))
        if i % 5 == 2:
            sampling = sampling.replace(repetition_penalty=1.3)
        if i % 7 == 3:  # sampled rows draw from their own seeded generator
            sampling = sampling.replace(temperature=0.8, top_p=0.9, seed=i)
        out.append(Request.ask(questions[i % 8] + " " * (i // 8), media[i % 4], {"image": 0.7} if i % 4 == 3 else None,
                               sampling=sampling))
    return out


def test_staggered_requests_get_exactly_what_they_get_alone(model):
    requests = _requests()
    alone = [Engine(model, background=False).generate(r) for r in requests]
    engine = Engine(model, background=False, max_batch=4)
    handles = []
    for i, request in enumerate(requests):  # arrivals between decode steps, while other rows are mid-answer
        handles.append(engine.submit(request))
        for _ in range(i % 3):
            engine.step()
    assert engine.waiting > 0
    busiest = 0
    while engine.step():  # new requests join while others are mid-answer
        busiest = max(busiest, engine.running)
    assert busiest == 4
    for i, (h, a) in enumerate(zip(handles, alone)):
        got = h.result()
        assert (got.tokens, got.text, got.finish_reason) == (a.tokens, a.text, a.finish_reason), i
    assert {h.result().finish_reason for h in handles} >= {"length", "stop"}


def test_engine_matches_the_model_generate_path(model):
    requests = _requests()[:4]  # text, image, audio, image + text
    engine = Engine(model, background=False, max_batch=4)
    got = [h.result().tokens for h in [engine.submit(r) for r in requests]]  # the engine owns the KV cache meanwhile
    prompts = [engine.template.render(r.text_messages()) for r in requests]
    for tokens, r, p in zip(got, requests, prompts):
        want = model.generate([p], r.media(), sampling=r.sampling, stop_token_ids=sorted(model.tokenizer.stop_ids))[0]
        assert tokens == want.tokens


def test_cancelled_request_frees_its_row_at_once(model):
    engine = Engine(model, background=False, max_batch=2)
    long = GREEDY.replace(max_new_tokens=40, stop_token_ids=())
    first, second, third = (engine.submit(Request.ask(q, sampling=long)) for q in ("One", "Two", "Three"))
    engine.step()
    assert (engine.running, engine.waiting) == (2, 1)
    first.cancel()
    engine.step()
    assert (engine.running, engine.waiting) == (2, 0)  # the waiting request took the freed row
    assert first.result().finish_reason == "cancelled" and len(first.result().tokens) <= 2
    engine.run_until_idle()
    assert second.result().tokens == Engine(model, background=False).generate(second.request).tokens
    assert len(third.result().tokens) == 40


def test_a_full_queue_refuses_with_a_clear_error(model):
    engine = Engine(model, background=False, max_batch=1, max_queue=2)
    for question in "abc":  # one for the free row, two to wait
        engine.submit(Request.ask(question))
    with pytest.raises(QueueFullError, match=r"queue is full \(3 waiting requests\).*max_queue"):
        engine.submit(Request.ask("d"))
    engine.step()  # "a" runs: "b" and "c" wait
    with pytest.raises(QueueFullError):
        engine.submit(Request.ask("d"))
    assert Engine(model, background=False, max_batch=1, max_queue=0).submit(Request.ask("a"))  # a free row


def test_a_bad_request_fails_alone(model):
    engine = Engine(model, background=False, max_batch=4)
    good = engine.submit(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=4)))
    bad = engine.submit(Request(messages=[{"role": "user", "content": [{"type": "smell", "smell": "x"}]}]))
    missing = engine.submit(Request.ask("Hi", {"image": MEDIA / "nope.jpg"}))
    engine.run_until_idle()
    assert len(good.result().tokens) == 4
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        bad.result()
    with pytest.raises(Exception, match="nope.jpg"):
        missing.result()
    make_row = engine._new_row

    def fail_for_boom(handle, ids, has_media):
        if handle.request.text_messages()[-1]["content"] == "boom":
            raise RuntimeError("cannot make this row")
        return make_row(handle, ids, has_media)

    engine._new_row = fail_for_boom
    unmakeable = engine.submit(Request.ask("boom"))  # fails while its row is made
    fine = engine.submit(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=3)))
    engine.run_until_idle()
    with pytest.raises(RuntimeError, match="cannot make this row"):
        unmakeable.result()
    assert len(fine.result().tokens) == 3


def test_background_thread_streams_pieces_that_make_the_result(model):
    engine = Engine(model, max_batch=4)
    try:
        handles = [engine.submit(r) for r in _requests()[:6]]
        streamed = ["".join(h.stream()) for h in handles]
        assert streamed == [h.result().text for h in handles]
    finally:
        engine.stop()


def test_astream_gives_asyncio_code_the_same_pieces(model):
    engine = Engine(model, max_batch=4)
    try:
        handles = [engine.submit(r) for r in _requests()[:4]]

        async def collect() -> list[str]:
            async def text(handle) -> str:
                return "".join([piece async for piece in handle.astream()])
            return await asyncio.gather(*(text(h) for h in handles))

        assert asyncio.run(collect()) == [h.result().text for h in handles]
    finally:
        engine.stop()
    with pytest.raises(RuntimeError, match="background"):
        asyncio.run(Engine(model, background=False).submit(Request.ask("Hi")).astream().__anext__())


def test_run_forever_serves_from_the_calling_thread_until_stopped(model):
    engine = Engine(model, max_batch=2)
    thread = threading.Thread(target=engine.run_forever)
    thread.start()
    try:
        request = Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=5))
        assert engine.submit(request).result(timeout=60).tokens == Engine(model, background=False).generate(request).tokens
        assert engine._thread is thread  # no second scheduler thread was started
    finally:
        engine.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_loglikelihood_is_the_sum_of_the_per_token_logprobs(model):
    tok = model.tokenizer
    media = {"image": (ibl.load_media({"image": MEDIA / "girl.jpg"})["image"][0], 1.0)}
    pairs = [(tok.encode("Q: what is shown? A:", bos=True), tok.encode(" a girl")),
             (tok.encode("The sky is", bos=True), tok.encode(" blue today"))]
    scores = loglikelihood(model, pairs, [media, None])
    for (context, continuation), row_media, score in zip(pairs, [media, None], scores):
        tokens = torch.tensor([context + continuation])
        with torch.no_grad():
            visual = model.encode_inputs(row_media) if row_media else None
            logits = model.forward_logits(tokens, visual, 0)
        logprobs = F.log_softmax(logits.float(), dim=-1)[0]
        want = sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation))
        assert abs(score.logprob - want) < 1e-5
        greedy = all(int(logprobs[len(context) - 1 + j].argmax()) == t for j, t in enumerate(continuation))
        assert score.greedy == greedy and score.tokens == len(continuation)


def test_engine_scores_yes_no_through_the_prompt_template(model):
    engine = Engine(model, background=False)
    request = Request.ask("Is there a girl in the image? Answer yes or no.", {"image": MEDIA / "girl.jpg"})
    yes, no = engine.loglikelihood([request, request], ["Yes", "No"])
    prompt = engine.template.render(request.text_messages())
    ids = model.tokenizer.encode(prompt + "Yes", bos=model.tokenizer.add_bos)
    direct = loglikelihood(model, [(ids[:-1], ids[-1:])], [request.media()])[0]
    assert abs(yes.logprob - direct.logprob) < 1e-5 and yes.logprob != no.logprob


def test_precomputed_features_give_the_same_answer_as_the_media(model):
    engine = Engine(model, background=False)
    request = Request.ask("Describe it.", {"image": MEDIA / "girl.jpg", "audio": MEDIA / "girl_bgm.wav"},
                          {"image": 0.3, "audio": 0.7}, sampling=GREEDY.replace(max_new_tokens=8))
    features = engine.encode(request)
    assert features.shape == (1, model.config.feature_dim)
    again = Request(messages=[{"role": "user", "content": "Describe it."}], sampling=request.sampling, features=features)
    assert engine.generate(again).tokens == engine.generate(request).tokens
    with pytest.raises(ValueError, match=r"features must be \[1, 1024\]"):
        engine.generate(Request.ask("x", features=torch.zeros(2, 1024)))


def test_a_failing_step_fails_the_running_requests_and_the_engine_goes_on(model, monkeypatch):
    engine = Engine(model, background=False, max_batch=2)
    running = engine.submit(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=4)))
    original = model.llm.forward
    monkeypatch.setattr(model.llm, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.step()
    monkeypatch.setattr(model.llm, "forward", original)
    with pytest.raises(RuntimeError, match="boom"):
        running.result()
    assert engine.running == 0
    assert len(engine.generate(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=4))).tokens) == 4


def test_media_for_a_model_without_encoder_fail_alone():
    model = ibl.create_model(ibl.ModelSpec(max_seq_len=128))  # plain SmolLM2, no ImageBind
    engine = Engine(model, background=False)
    bad = engine.submit(Request.ask("Hi", {"image": MEDIA / "girl.jpg"}))
    good = engine.submit(Request.ask("Hi", sampling=GREEDY.replace(max_new_tokens=3)))
    engine.run_until_idle()
    assert len(good.result().tokens) == 3
    with pytest.raises(ValueError, match="no ImageBind encoder"):
        bad.result()


def test_admissions_are_grouped_but_never_held_longer_than_admit_wait(model):
    engine = Engine(model, background=False, max_batch=3, admit_group=2, admit_wait=3)
    long = GREEDY.replace(max_new_tokens=40, stop_token_ids=())
    short = engine.submit(Request.ask("A", sampling=GREEDY.replace(max_new_tokens=3, stop_token_ids=())))
    for q in ("B", "C"):
        engine.submit(Request.ask(q, sampling=long))
    engine.step()  # nothing runs: all three start together
    assert engine.running == 3
    engine.step()
    assert short.done and engine.running == 2  # one row free
    for q in ("D", "E"):
        engine.submit(Request.ask(q, sampling=long))
    for _ in range(3):  # two waiting, one free row: held so that they could share a prefill
        engine.step()
        assert (engine.running, engine.waiting) == (2, 2)
    engine.step()  # admit_wait reached
    assert (engine.running, engine.waiting) == (3, 1)
