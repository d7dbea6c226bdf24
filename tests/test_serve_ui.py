"""The web UI at ``/ui``: in a real headless Chromium (Debian's; playwright never downloads a browser), upload
an image, move its weight slider, ask, and see the streamed answer, the engine receiving the image with that
weight; the 3-D preview of point clouds; the API key as password; the error messages."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gradio", reason="the web UI needs the ui extra: pip install 'imagebind-llm[ui]'")
from imagebind_llm.serve.ui import render_points  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MEDIA = Path(__file__).parent / "fixtures" / "media"


@pytest.fixture
def page():
    """A page of a headless Chromium (skips, saying why, without playwright or Debian's chromium)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    if not shutil.which(CHROMIUM):
        pytest.skip("Debian's chromium is not installed: apt-get install chromium (.ci/run installs it)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 1000})
        finally:
            browser.close()


def _set_slider(page, elem_id: str, default: float, value: float) -> None:
    """Move a slider from its ``default`` (shown once the component is mounted) to ``value``."""
    from playwright.sync_api import expect

    slider = page.locator(f"#{elem_id} input[type=range]")
    expect(slider).to_have_value(str(default))
    slider.fill(str(value))
    expect(page.locator(f"#{elem_id} input[type=number]")).to_have_value(str(value))


def test_ui_chat_with_an_image_streams_the_answer(page, start_server, monkeypatch, tmp_path):
    live = start_server(ui=True)
    engine = live.service.engine
    submitted, submit = [], engine.submit
    monkeypatch.setattr(engine, "submit", lambda request: submitted.append(request) or submit(request))

    page.goto(f"{live.url}/ui/")
    page.locator("#send").click()  # no question yet: the page says so
    page.get_by_text("Type a question first.").first.wait_for(timeout=10_000)
    page.locator("#image-input input[type=file]").set_input_files(MEDIA / "girl.jpg")
    page.locator("#image-input img").first.wait_for()  # uploaded and shown
    _set_slider(page, "image-weight", 1, 0.6)
    _set_slider(page, "max-length", 128, 16)
    page.locator("#question textarea").fill("What is in the picture?")
    page.locator("#send").click()

    page.wait_for_function("() => { const bots = document.querySelectorAll('#chatbot [data-testid=bot]');"
                           " return bots.length && bots[bots.length - 1].innerText.trim().length > 0; }",
                           timeout=60_000)  # the answer streams in
    assert page.locator("#chatbot [data-testid=user]").last.inner_text().strip() == "What is in the picture?"
    shot = tmp_path / "ui.png"
    page.screenshot(path=shot, full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert len(submitted) == 1
    request = submitted[0]
    assert request.sampling.max_new_tokens == 16
    *media, text = request.messages[-1]["content"]
    assert text == {"type": "text", "text": "What is in the picture?"}
    assert [(part["type"], part["weight"]) for part in media] == [("image", pytest.approx(0.6))]
    assert media[0]["image"].shape == (1, 3, 224, 224)


def test_render_points_draws_the_cloud():
    points = torch.load(MEDIA / "airplane.pt", weights_only=True).numpy()
    image = render_points(points, size=200)
    assert image.size == (200, 200)
    drawn = (np.asarray(image) != 255).any(axis=2)
    assert 0.02 < drawn.mean() < 0.8  # a cloud of points on a white page


def test_ui_with_an_api_key_asks_for_it_as_password(start_server):
    import httpx

    live = start_server(ui=True, api_key="sesame")
    with httpx.Client(base_url=live.url) as client:
        assert client.get("/ui/config").status_code == 401
        assert client.post("/ui/login", data={"username": "anyone", "password": "wrong"}).status_code == 400
        assert client.post("/ui/login", data={"username": "anyone", "password": "sesame"}).status_code == 200
        assert client.get("/ui/config").status_code == 200


def test_ui_errors_say_what_to_fix(tmp_path):
    """Before any generation: a missing question, all weights 0, an undecodable file, a model still loading."""
    import gradio as gr

    from imagebind_llm.serve.config import ServeConfig
    from imagebind_llm.serve.service import Service
    from imagebind_llm.serve.ui import _WIDGETS, chat

    service = Service(ServeConfig(), load=lambda: None)  # never started: the model is "loading"
    names, broken = list(_WIDGETS), tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    options = (10, 20, 0.5, 16, 0.1, 0.75)

    def ask(question: str, image: str | None = None, weight: float = 1.0) -> str:
        sources = [image if name == "image" else None for name in names]
        with pytest.raises(gr.Error) as error:
            next(chat(service, names, [], question, (*sources, *[weight] * len(names), *options)))
        return error.value.message

    try:
        assert "Type a question" in ask("  ")
        assert "weight 0" in ask("What is this?", str(MEDIA / "girl.jpg"), weight=0.0)
        assert "broken.jpg: cannot read the image" in ask("What is this?", str(broken))
        assert "loading" in ask("What is this?", str(MEDIA / "girl.jpg"))
    finally:
        service.close()


def test_ui_image_output_draws_the_media_mix_with_unclip(seeing_demo):
    """The official demo's "output: Image": the same picture as `image_embedding` + the pipeline, seed 0."""
    pytest.importorskip("diffusers", reason="image output needs the images extra: pip install 'imagebind-llm[images]'")
    import gradio as gr

    from imagebind_llm.apps.unclip import UnCLIP, image_embedding, tiny_pipeline
    from imagebind_llm.engine import Engine, Request
    from imagebind_llm.serve.config import ServeConfig
    from imagebind_llm.serve.service import Service
    from imagebind_llm.serve.ui import _WIDGETS, imagine

    engine = Engine(seeing_demo, max_batch=1, max_context=512)
    service = Service(ServeConfig(), engine=engine)
    names = list(_WIDGETS)
    sources = [str(MEDIA / "girl.jpg") if name == "image" else None for name in names]
    options = (10, 20, 0.5, 16, 0.1, 0.75)
    try:
        with pytest.raises(gr.Error, match="--unclip"):
            imagine(service, names, "a painting", (*sources, *[1.0] * len(names), *options))
        service.unclip = UnCLIP(tiny_pipeline(seeing_demo.config.feature_dim, seed=0))
        service.unclip.generate = lambda embeds, prompt, **kw: UnCLIP.generate(
            service.unclip, embeds, prompt, **kw, num_inference_steps=2, height=32, width=32)
        picture = imagine(service, names, "a painting", (*sources, *[1.0] * len(names), *options))
        request = Request.ask("", {"image": MEDIA / "girl.jpg"})
        want = UnCLIP.generate(service.unclip, image_embedding(engine, request), "a painting", seed=0,
                               num_inference_steps=2, height=32, width=32)[0]
        assert np.array_equal(np.asarray(picture), np.asarray(want))
        with pytest.raises(gr.Error, match="weight above 0"):
            imagine(service, names, "a painting", (*sources, *[0.0] * len(names), *options))
    finally:
        service.close()
