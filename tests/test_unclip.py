"""Images out of the joint space (`imagebind_llm.apps.unclip`), offline: a tiny randomly initialised Stable unCLIP
pipeline built from configs; the official pre-normalisation mix (points / 5), the cache blend with the norm
restored, the pipeline call (noise level 0, zeros as the negative image embedding), the command and the endpoint."""

import argparse
import base64
import io
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("diffusers")

from imagebind_llm.apps import unclip as U  # noqa: E402
from imagebind_llm.apps.cli import add_imagine_command  # noqa: E402
from imagebind_llm.cache.blend import BlendOptions, ExactBank  # noqa: E402
from imagebind_llm.engine import Request  # noqa: E402

D = 1024  # ImageBind-huge / OpenCLIP ViT-H, and the demo encoder's width
STEPS = dict(num_inference_steps=2, height=32, width=32)


@pytest.fixture(scope="module")
def tiny():
    return U.tiny_pipeline(D, seed=0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("unclip")
    tiny.save_pretrained(path)
    return path


class FakeEncoder:
    """Gives fixed pre-normalisation embeddings per tower (and, as ImageBind, their normalised form)."""

    def __init__(self, prenorm):
        self.prenorm, self.calls = prenorm, []

    def __call__(self, inputs, return_prenorm=False):
        (tower, x), = inputs.items()
        self.calls.append(tower)
        pre = {tower: self.prenorm[tower].clone()}
        out = {tower: F.normalize(pre[tower], dim=-1)}
        return (out, pre) if return_prenorm else out


def fake_engine(prenorm, cache=None):
    return SimpleNamespace(model=SimpleNamespace(encoder=FakeEncoder(prenorm)), lock=threading.RLock(), cache=cache)


def media_request(weights, **options):
    shapes = {"image": (1, 3, 8, 8), "audio": (1, 3, 1, 8, 8), "point": (1, 16, 6)}
    return Request.ask("", {n: torch.zeros(shapes[n]) for n in weights}, weights, **options)


# ---------------------------------------------------------------- the official embedding
def test_prenorm_mix_is_the_official_weighted_sum_with_points_scaled():
    g = torch.Generator().manual_seed(0)
    pre = {"vision": 7 * torch.randn(1, D, generator=g), "point": 30 * torch.randn(1, D, generator=g)}
    engine = fake_engine(pre)
    got = U.prenorm_mix(engine, media_request({"image": 1.0, "point": 3.0}))
    total = 4.0 + 1e-6
    torch.testing.assert_close(got, (1 / total) * pre["vision"] + (3 / total) * pre["point"] / 5.0)
    assert engine.model.encoder.calls == ["vision", "point"]
    assert got.norm() > 2  # not normalised: the norm of the inputs survives
    half = U.prenorm_mix(engine, media_request({"image": 1.0, "point": 3.0}), point_scale=10.0)
    torch.testing.assert_close(half, (1 / total) * pre["vision"] + (3 / total) * pre["point"] / 10.0)


def test_single_input_is_its_prenorm_embedding_and_zero_weights_fail():
    pre = {"audio": 3 * torch.randn(1, D)}
    engine = fake_engine(pre)
    torch.testing.assert_close(U.prenorm_mix(engine, media_request({"audio": 2.0})), pre["audio"] * 2 / (2 + 1e-6))
    with pytest.raises(ValueError, match="all media weights are 0"):
        U.prenorm_mix(engine, media_request({"audio": 0.0}))
    with pytest.raises(ValueError, match="no media"):
        U.prenorm_mix(engine, Request.ask("a dog"))
    with pytest.raises(ValueError, match="precomputed features"):
        U.prenorm_mix(engine, Request(messages=[{"role": "user", "content": "x"}], features=torch.zeros(1, D)))
    with pytest.raises(ValueError, match="no ImageBind encoder"):
        U.prenorm_mix(SimpleNamespace(model=SimpleNamespace(encoder=None), lock=threading.RLock()),
                      media_request({"audio": 1.0}))


def test_cache_blend_restores_the_norm():
    g = torch.Generator().manual_seed(1)
    bank = F.normalize(torch.randn(20, D, generator=g), dim=-1)
    pre = {"vision": 6 * torch.randn(1, D, generator=g)}
    options = BlendOptions(top_k=3, temperature=20.0, weight=0.5)
    engine = fake_engine(pre, cache=ExactBank(bank))
    got = U.image_embedding(engine, media_request({"image": 1.0}, blend=options))

    q = pre["vision"] / (1 + 1e-6)
    s = q.norm()
    e = q / s
    sims, idx = (e @ bank.T).topk(3)
    proto = F.normalize(torch.softmax(20.0 * sims, -1) @ bank[idx[0]], dim=-1)
    expected = s * F.normalize(0.5 * e + 0.5 * proto, dim=-1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(), s)
    # weight 0 leaves the embedding as it was; use_cache=False skips the cache
    same = U.image_embedding(engine, media_request({"image": 1.0}, blend=options.replace(weight=0.0)))
    torch.testing.assert_close(same, q)
    torch.testing.assert_close(U.image_embedding(engine, media_request({"image": 1.0}, blend=options),
                                                 use_cache=False), q)


def test_real_encoder_gives_the_unnormalised_direction_of_the_engine_mix(seeing_demo):
    from imagebind_llm.engine import Engine

    engine = Engine(seeing_demo, background=False)
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    request = Request.ask("", {"image": image})
    pre = U.prenorm_mix(engine, request)
    assert pre.shape == (1, D)
    assert not torch.allclose(pre.norm(), torch.tensor(1.0), atol=1e-3)  # the head output, not the unit vector
    torch.testing.assert_close(F.normalize(pre, dim=-1), F.normalize(engine.encode(request), dim=-1),
                               atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- the pipeline
def test_tiny_pipeline_shapes_and_seed_determinism(tiny):
    gen = U.UnCLIP(tiny)
    assert gen.embedding_dim == D
    emb = torch.randn(1, D, generator=torch.Generator().manual_seed(0))
    a = gen.generate(emb, "a painting", seed=0, **STEPS)
    b = gen.generate(emb, "a painting", seed=0, **STEPS)
    c = gen.generate(emb, "a painting", seed=1, **STEPS)
    assert len(a) == 1 and a[0].size == (32, 32) and a[0].mode == "RGB"
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    two = gen.generate(emb, "a painting", seed=0, num_images=2, num_inference_steps=2, height=32, width=48)
    assert [im.size for im in two] == [(48, 32), (48, 32)]


def test_pipeline_call_noise_level_zero_and_zero_negative_embedding(tiny, monkeypatch):
    seen = {}
    noise = tiny.noise_image_embeddings
    forward = tiny.unet.forward

    def spy_noise(image_embeds, noise_level, **kw):
        seen["noise_level"], seen["input"] = noise_level, image_embeds.clone()
        return noise(image_embeds=image_embeds, noise_level=noise_level, **kw)

    def spy_unet(*args, class_labels=None, **kw):
        seen.setdefault("class_labels", class_labels.clone())
        return forward(*args, class_labels=class_labels, **kw)

    monkeypatch.setattr(tiny, "noise_image_embeddings", spy_noise)
    monkeypatch.setattr(tiny.unet, "forward", spy_unet)
    emb = 3 * torch.randn(1, D)
    U.UnCLIP(tiny).generate(emb, "a dog", seed=0, **STEPS)  # guidance 10 (the default): CFG on
    assert seen["noise_level"] == 0
    torch.testing.assert_close(seen["input"], emb)  # given as is: no normalisation on the way
    labels = seen["class_labels"]
    assert labels.shape == (2, 2 * D)  # [negative, positive] x (embedding + noise-level embedding)
    assert torch.count_nonzero(labels[0]) == 0 and torch.count_nonzero(labels[1]) > 0
    seen.clear()
    U.UnCLIP(tiny).generate(emb, "a dog", seed=0, guidance_scale=1.0, noise_level=100, **STEPS)
    assert seen["noise_level"] == 100 and seen["class_labels"].shape == (1, 2 * D)


def test_errors(tiny, tmp_path, monkeypatch):
    gen = U.UnCLIP(tiny)
    with pytest.raises(ValueError, match="768-d but the unCLIP pipeline .* takes 1024-d"):
        gen.generate(torch.zeros(1, 768))
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        gen.generate(torch.zeros(D))
    with pytest.raises(ValueError, match="NaN"):
        gen.generate(torch.full((1, D), float("nan")))
    for bad in (dict(noise_level=1000), dict(noise_level=-1), dict(num_inference_steps=0), dict(guidance_scale=-1.0),
                dict(height=30), dict(num_images=0)):
        with pytest.raises(ValueError):
            gen.generate(torch.zeros(1, D), **bad)
    # the weights missing: a folder that is no pipeline, a repo not downloaded (offline)
    with pytest.raises(U.PipelineMissingError, match="no model_index.json"):
        U.resolve_pipeline(tmp_path)
    with pytest.raises(U.PipelineMissingError, match="hf download stabilityai/stable-diffusion-2-1-unclip"):
        U.resolve_pipeline(U.DEFAULT_PIPELINE, cache_dir=tmp_path, download=False)
    with pytest.raises(U.PipelineMissingError, match="not a Hugging Face repo id"):
        U.resolve_pipeline(tmp_path / "nothing")
    # the extra missing
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(U.PipelineMissingError, match=r"imagebind-llm\[images\]"):
        U.UnCLIP(tmp_path).pipeline


def test_loading_a_saved_pipeline_skips_its_image_encoder(tiny, tiny_dir, tmp_path):
    emb = torch.randn(1, D, generator=torch.Generator().manual_seed(2))
    loaded = U.UnCLIP(tiny_dir)
    assert isinstance(loaded.pipeline.image_encoder, U._NoImageEncoder)
    same = np.asarray(loaded.generate(emb, "x", seed=3, **STEPS)[0])
    assert np.array_equal(same, np.asarray(U.UnCLIP(tiny).generate(emb, "x", seed=3, **STEPS)[0]))
    full = U.tiny_pipeline(64, image_encoder=True)  # as the released folder: with a CLIP image encoder
    full.save_pretrained(tmp_path / "full")
    assert isinstance(U.UnCLIP(tmp_path / "full").pipeline.image_encoder, U._NoImageEncoder)
    assert U.resolve_pipeline(tmp_path / "full") == tmp_path / "full"


# ---------------------------------------------------------------- the command and the endpoint
def _run(argv):
    parser = argparse.ArgumentParser()
    add_imagine_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_imagine_command(tiny_dir, tmp_path, capsys):
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    argv = ["imagine", "a painting", "--image", str(tmp_path / "in.png"), "--text", "rain", "--weight",
            "image=0.4,text=0.6", "--unclip", str(tiny_dir), "--steps", "2", "--height", "32", "--width", "32",
            "--seed", "0", "--out", str(out)]
    assert _run(argv) == 0
    first = np.asarray(Image.open(out))
    assert first.shape == (32, 32, 3)
    assert "no --imagebind" in capsys.readouterr().err
    _run(argv)
    assert np.array_equal(first, np.asarray(Image.open(out)))
    with pytest.raises(ValueError, match="no media"):
        _run(["imagine", "x", "--unclip", str(tiny_dir), "--out", str(out)])
    with pytest.raises(U.PipelineMissingError, match="hf download"):
        _run(["imagine", "x", "--text", "rain", "--unclip", "someone/nothing-here", "--no-download",
              "--out", str(out)])


def test_images_endpoint(seeing_demo, tiny):
    from fastapi.testclient import TestClient

    from imagebind_llm.engine import Engine
    from imagebind_llm.serve.app import create_app
    from imagebind_llm.serve.config import ServeConfig
    from imagebind_llm.serve.images import add_image_routes
    from imagebind_llm.serve.service import Service

    def app_of(unclip):
        service = Service(ServeConfig(ui=False), engine=Engine(seeing_demo, max_batch=1, background=False))
        service.unclip = unclip
        app = create_app(service)
        if not any(getattr(r, "path", None) == "/v1/images/generations" for r in app.routes):
            add_image_routes(app, service)
        return TestClient(app)

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(buffer, format="PNG")
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(buffer.getvalue()).decode()}, "weight": 0.5}
    text = {"type": "input_media", "modality": "text", "text": "rain on a street", "weight": 0.5}
    body = {"prompt": "a painting", "media": [image, text], "size": "32x32", "n": 2, "seed": 0,
            "num_inference_steps": 2, "cache": {"weight": 0.3}}
    client = app_of(U.UnCLIP(tiny))
    reply = client.post("/v1/images/generations", json=body)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["size"] == "32x32" and data["output_format"] == "png" and len(data["data"]) == 2
    pictures = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data["data"]]
    assert [p.size for p in pictures] == [(32, 32), (32, 32)]
    again = client.post("/v1/images/generations", json=body).json()
    assert again["data"][0]["b64_json"] == data["data"][0]["b64_json"]  # same seed, same picture

    for bad, param in (({**body, "media": []}, "media"), ({**body, "response_format": "url"}, "response_format"),
                       ({**body, "size": "33x32"}, "size"), ({**body, "n": 9}, "n"),
                       ({**body, "media": [image, image]}, "media[1]"), ({**body, "noise_level": 1000}, "noise_level"),
                       ({**body, "cache": {"weight": 2}}, "cache"), ({**body, "prompt": 3}, "prompt")):
        reply = client.post("/v1/images/generations", json=bad)
        assert reply.status_code == 400, (bad, reply.text)
        assert reply.json()["error"]["param"] == param
    reply = app_of(None).post("/v1/images/generations", json=body)
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "images_disabled"
