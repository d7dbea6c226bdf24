"""Hardening of media loading and option validation: bad inputs fail with our own one-line errors
(`MediaError` / ``ValueError``) that name the input and say what to fix; nothing is silently wrong."""

import io
import time
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.cli import main
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.generate import SamplingOptions
from imagebind_llm.llm.model import Transformer
from imagebind_llm.model.config import AdapterConfig
from imagebind_llm.model.imagebind_llm import ImageBindLLM
from imagebind_llm.model.media import check_weight, load_media, parse_weights, per_prompt, weighted_sum
from imagebind_llm.preprocess import MediaError, load_audio, load_depth, load_images, load_imu, load_points, load_video
from imagebind_llm.preprocess.image import CLIP_STD
from imagebind_llm.preprocess.points import farthest_point_sample

MEDIA = Path(__file__).parent / "fixtures" / "media"
PIXEL = 1 / 255 / min(CLIP_STD) + 1e-6  # one 8-bit step, in normalised units


def one_line(error: BaseException, *parts: str) -> None:
    """The message is one line holding every part (the input's name, what to fix)."""
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, (part, message)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def wav_bytes(samples: int, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.sin(np.arange(samples) / 5) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


# ------------------------------------------------------------------ 1. options: finite and in range

@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", True),
    ("temperature", "0.1"), ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", True),
    ("top_k", 2.5), ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")),
    ("repetition_penalty", 0.0), ("max_new_tokens", 0), ("max_new_tokens", 8.0), ("max_new_tokens", True),
    ("min_new_tokens", -1), ("min_new_tokens", float("nan")), ("min_new_tokens", 1.5), ("seed", 2**64),
    ("seed", -2**63 - 1), ("seed", 1.5), ("seed", True),
])
def test_sampling_options_refuse_bad_values(field, value):
    with pytest.raises(ValueError) as info:
        SamplingOptions(**{field: value})
    one_line(info.value, f"{field}={value!r}", "must be")


def test_sampling_options_accept_the_edges():
    for options in (SamplingOptions(seed=2**64 - 1), SamplingOptions(seed=-2**63), SamplingOptions(top_p=1.0, top_k=1),
                    SamplingOptions(temperature=0, repetition_penalty=0.5, min_new_tokens=3, max_new_tokens=1)):
        options.generator()  # torch takes every seed we accept


@pytest.mark.parametrize("field, value", [
    ("top_k", 0), ("top_k", True), ("top_k", 2.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", -1.0), ("weight", float("nan")), ("weight", 1.5), ("weight", -0.1), ("weight", "0.5"),
])
def test_blend_options_refuse_bad_values(field, value):
    with pytest.raises(ValueError) as info:
        BlendOptions(**{field: value})
    one_line(info.value, f"cache {field}", repr(value))


@pytest.mark.parametrize("spec, parts", [
    ("image=nan", ["image", "finite number >= 0", "nan"]),
    ("image=inf", ["image", "finite number >= 0"]),
    ("image=-1", ["image", "finite number >= 0"]),
    ("vision=nan", ["image (given as 'vision')", "finite number"]),
    ("vision=", ["'vision='", "--weight needs MODALITY=NUMBER, e.g. image=0.4"]),
    ("image", ["'image'", "--weight needs MODALITY=NUMBER"]),
    ("=0.4", ["'=0.4'", "--weight needs MODALITY=NUMBER"]),
    ("image=abc", ["'abc' is not a number", "MODALITY=NUMBER"]),
    ("smell=1", ["unknown modality 'smell'", "image"]),
    ("image=0.4,vision=0.5", ["'vision=0.5'", "weighted twice"]),
])
def test_parse_weights_refuses_bad_items(spec, parts):
    with pytest.raises(ValueError) as info:
        parse_weights(spec)
    one_line(info.value, *parts)
    assert "--vision" not in str(info.value)


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -1.0, True, "1", None])
def test_check_weight_refuses(weight):
    with pytest.raises(ValueError) as info:
        check_weight("audio", weight)
    one_line(info.value, "weight of audio", "finite number >= 0")


def test_all_zero_weights_are_refused_before_loading():
    with pytest.raises(ValueError) as info:  # the file does not exist: the weights are checked first
        load_media({"image": "missing.jpg", "audio": "missing.wav"}, {"image": 0, "audio": 0.0})
    one_line(info.value, "all media weights are 0", "give at least one weight > 0 or drop the media")
    with pytest.raises(ValueError, match="all media weights are 0"):
        weighted_sum({"image": torch.ones(1, 4)}, {"image": 0.0})
    mixed = weighted_sum({"image": torch.ones(1, 4), "audio": torch.ones(1, 4)}, {"image": 0.0, "audio": 2.0})
    torch.testing.assert_close(mixed, torch.ones(1, 4), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ 2. every image mode to RGB

def _gradient(high: int = 65535) -> np.ndarray:
    return np.round(np.tile(np.linspace(0, high, 300), (200, 1))).astype(np.uint16)


@pytest.mark.parametrize("high", [65535, 4000])  # full range, and a dark image that must stay dark
def test_16bit_png_equals_its_8bit_version(high):
    wide = _gradient(high)
    data = encoded(Image.fromarray(wide), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    eight = np.round(wide / 257).astype(np.uint8)
    got, want = load_images([data, wide.astype(">u2")]), load_images(np.stack([eight] * 3, axis=-1))
    assert Image.fromarray(wide.astype(">u2")).mode == "I;16B"
    torch.testing.assert_close(got, want.expand_as(got), atol=PIXEL, rtol=0)


def _rgb(array: np.ndarray) -> np.ndarray:
    return np.stack([array] * 3, axis=-1)


def test_32bit_and_float_images_scale_to_8bit():
    unit = np.linspace(0, 1, 300 * 200, dtype=np.float32).reshape(200, 300)
    eight = np.round(unit * 255).astype(np.uint8)
    cases = {  # source -> the 8-bit grayscale it must equal
        encoded(Image.fromarray(unit), "TIFF"): eight,  # float in [0, 1]: * 255
        encoded(Image.fromarray(unit * 40 - 7), "TIFF"): eight,  # other floats: min-max
        encoded(Image.fromarray(np.round(unit * 1e6).astype(np.int32)), "TIFF"): eight,  # 32-bit: min-max
    }
    for source, want in cases.items():
        assert Image.open(io.BytesIO(source)).mode in ("F", "I")
        torch.testing.assert_close(load_images(source), load_images(_rgb(want)), atol=PIXEL, rtol=0)


def test_8bit_modes_convert_as_upstream():
    gray = np.tile(np.linspace(0, 255, 64), (48, 1)).round().astype(np.uint8)
    palette = Image.fromarray(_rgb(gray)).convert("P")
    palette.info["transparency"] = 0
    images = [Image.fromarray(np.stack([gray, gray], -1), "LA"), palette, Image.fromarray(_rgb(gray)).convert("CMYK"),
              Image.fromarray(gray > 100), Image.fromarray(np.stack([gray, gray, gray, gray // 2], -1), "RGBA")]
    for image in images:
        data = encoded(image, "PNG" if image.mode != "CMYK" else "JPEG")
        with Image.open(io.BytesIO(data)) as decoded:
            upstream = np.asarray(decoded.convert("RGB"))  # ImageBind: Image.open(f).convert("RGB")
        torch.testing.assert_close(load_images(data), load_images(upstream), atol=0, rtol=0)


# ------------------------------------------------------------------ 3. EXIF orientation: kept as upstream

def test_exif_orientation_is_not_applied():
    pixels = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encoded(Image.fromarray(pixels), "PNG", exif=exif)
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6
    torch.testing.assert_close(load_images(data), load_images(pixels), atol=0, rtol=0)


# ------------------------------------------------------------------ 4. channels-first point arrays

def test_channels_first_points_are_transposed():
    cloud = np.random.default_rng(1).normal(size=(1000, 6))
    rows = load_points(cloud, n_points=256)
    for source in (cloud.T, torch.from_numpy(cloud.T.copy()), cloud[:, :3].T):
        torch.testing.assert_close(load_points(source, n_points=256), rows, atol=0, rtol=0)
    tiny = cloud[:10, :3]
    torch.testing.assert_close(load_points(tiny.T, n_points=10), load_points(tiny, n_points=10), atol=0, rtol=0)


@pytest.mark.parametrize("shape, parts", [
    ((6, 9), ["cannot tell points from channels", "[6, 9]", "pass [N, 3]"]),
    ((1000, 50), ["cannot tell points from channels", "[1000, 50]"]),
    ((1000, 2), ["expected points of shape [N, 3]", "[1000, 2]"]),
    ((2, 1000), ["expected points of shape [N, 3]", "[2, 1000]"]),
    ((5, 5, 3), ["expected points of shape [N, 3]"]),
])
def test_ambiguous_point_shapes_are_refused(shape, parts):
    with pytest.raises(MediaError) as info:
        load_points(np.random.default_rng(0).normal(size=shape))
    one_line(info.value, "<array #0>", *parts)


# ------------------------------------------------------------------ 5. farthest point sampling

def _official_fps(xyz: np.ndarray, n: int, start: int) -> np.ndarray:
    """Point-Bind's ``farthest_point_sample`` loop with a given start (and inf as the first distance)."""
    chosen, distance, farthest = np.zeros(n, dtype=np.int64), np.full(len(xyz), np.inf), start
    for i in range(n):
        chosen[i] = farthest
        dist = np.sum((xyz - xyz[farthest]) ** 2, -1)
        mask = dist < distance
        distance[mask] = dist[mask]
        farthest = np.argmax(distance, -1)
    return chosen


def test_fps_is_exactly_the_official_loop():
    rng = np.random.default_rng(2)
    sphere = rng.normal(size=(3000, 3))
    clouds = [sphere / np.linalg.norm(sphere, axis=1, keepdims=True), rng.normal(size=(2000, 3)) * [100, 1, 0.01],
              np.round(rng.normal(size=(2500, 3)), 1),  # a grid: many equal distances, ties to the lowest index
              np.repeat(rng.normal(size=(40, 3)), 30, axis=0), np.ones((300, 3))]
    for cloud in clouds:
        for n, start in ((1, 0), (200, 0), (200, 17), (len(cloud), 5)):
            assert farthest_point_sample(cloud, n, start).tolist() == _official_fps(cloud, n, start).tolist()


def test_fps_of_a_million_points_is_fast():
    rng = np.random.default_rng(3)
    cloud = rng.normal(size=(1_000_000, 3))
    cloud /= np.linalg.norm(cloud, axis=1, keepdims=True)  # a surface, like scanned clouds
    started = time.perf_counter()
    chosen = farthest_point_sample(cloud, 8192)
    assert time.perf_counter() - started < 30  # the per-step full scan took ~60-100 s
    assert len(np.unique(chosen)) == 8192 and chosen[0] == 0


# ------------------------------------------------------------------ 6. messages that say what the file is

class Opaque:
    """A class torch's weights-only loader refuses to unpickle."""


def _bad_files(tmp_path: Path):
    jpeg = (MEDIA / "dog_image.jpg").read_bytes()
    png = encoded(Image.fromarray(np.zeros((40, 50, 3), np.uint8)), "PNG")

    def file(name: str, data: bytes) -> Path:
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    objects = io.BytesIO()
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    pickled = io.BytesIO()
    torch.save({"points": Opaque()}, pickled)
    return [  # (loader, source, name in the message, what the message must say)
        (load_video, MEDIA / "dog_image.jpg", "dog_image.jpg", "this looks like a JPEG image, not a video"),
        (load_video, png, "<bytes #0>", "this looks like a PNG image, not a video; load it as an image"),
        (load_imu, MEDIA / "dog_image.jpg", "dog_image.jpg", "not a CSV/NPY file (binary data, this looks like a JPEG"),
        (load_imu, wav_bytes(100), "<bytes #0>", "not a CSV/NPY file (binary data, this looks like a WAV"),
        (load_imu, file("a.csv", b"1,2,3\n4,5\n"), "a.csv", "cannot read the table"),
        (load_imu, file("jpeg.npy", jpeg), "jpeg.npy", "not an .npy array file (this looks like a JPEG image)"),
        (load_depth, file("objects.npy", objects.getvalue()), "objects.npy", "object array"),
        (load_points, file("text.npy", b"1 2 3\n4 5 6\n"), "text.npy", "not an .npy array file"),
        (load_points, file("jpeg.pt", jpeg), "jpeg.pt", "not a PyTorch .pt file (this looks like a JPEG image)"),
        (load_points, file("opaque.pt", pickled.getvalue()), "opaque.pt", "Python objects besides tensors"),
        (load_points, jpeg, "<bytes #0>", "not a point-cloud file (binary data, this looks like a JPEG image)"),
        (load_images, wav_bytes(100), "<bytes #0>", "not a recognised image format (this looks like a WAV"),
        (load_audio, wav_bytes(399), "<bytes #0>", "audio is too short (24.9 ms); the minimum is 25 ms"),
        (load_audio, wav_bytes(10, rate=8000), "<bytes #0>", "too short (1.2 ms)"),
    ]


def test_wrong_kinds_of_file_are_named(tmp_path):
    for loader, source, name, message in _bad_files(tmp_path):
        with pytest.raises(MediaError) as info:
            loader(source)
        one_line(info.value, name, message)
        for advice in ("allow_pickle", "weights_only", "truncated", "codec can't decode"):
            assert advice not in str(info.value)
    assert load_audio(wav_bytes(400)).shape == (1, 3, 1, 128, 204)  # 25 ms: one filterbank frame


@pytest.mark.parametrize("side", [40, 50])  # over the limit (Pillow warns) and over twice the limit (Pillow raises)
def test_oversized_images_are_refused(monkeypatch, side):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encoded(Image.fromarray(np.zeros((side, side), np.uint16)), "PNG")
    for loader in (load_images, load_depth):
        with pytest.raises(MediaError) as info:
            loader([data])
        one_line(info.value, "<bytes #0>", f"image has {side * side:,} pixels, over the limit of", "downscale it")


# ------------------------------------------------------------------ 8. media batch vs prompts

def test_media_batch_must_match_the_prompts():
    image = torch.zeros(2, 3, 224, 224)
    split = per_prompt({"image": (image, 0.5), "text": (torch.ones(1, 77, dtype=torch.long), 1.0)}, 2)
    assert [tuple(row["image"][0].shape) for row in split] == [(1, 3, 224, 224)] * 2
    assert all(row["text"][0].shape == (1, 77) and row["image"][1] == 0.5 for row in split)
    shared = {"image": (image[:1], 1.0)}
    assert per_prompt(shared, 3) is shared
    with pytest.raises(ValueError) as info:
        per_prompt({"image": (image, 1.0)}, 3)
    one_line(info.value, "3 prompts but media batch sizes image 2", "1 item (shared by every prompt) or 3")
    with pytest.raises(ValueError, match=r"shape \[1, 2, 3, 224, 224\]"):
        per_prompt({"image": (image[None], 1.0)}, 2)
    model = ImageBindLLM(Transformer(LLMConfig.from_name("tiny")), None, AdapterConfig(feature_dim=32),
                         tokenizer=SimpleNamespace()).eval()  # prompts as token ids: the tokenizer is never used
    with pytest.raises(ValueError, match="2 prompts but media batch sizes image 3"):
        model.generate([[1, 2], [1, 3]], {"image": (torch.zeros(3, 3, 224, 224), 1.0)}, max_new_tokens=2)


# ------------------------------------------------------------------ the command line: exit 1, one line

@pytest.mark.parametrize("argv, message", [
    (["--temperature", "nan"], "temperature=nan must be a finite number >= 0"),
    (["--image", str(MEDIA / "girl.jpg"), "--weight", "image=nan"], "the weight of image must be a finite number"),
    (["--image", str(MEDIA / "girl.jpg"), "--weight", "image=0"], "all media weights are 0"),
    (["--image", str(MEDIA / "girl.jpg"), "--weight", "vision="], "--weight needs MODALITY=NUMBER, e.g. image=0.4"),
    (["--video", str(MEDIA / "dog_image.jpg")], "this looks like a JPEG image, not a video"),
    (["--imu", str(MEDIA / "dog_image.jpg")], "not a CSV/NPY file (binary data"),
])
def test_cli_refuses_before_loading_the_model(capsys, argv, message):
    assert main(["ask", *argv, "What is this?"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("imagebind-llm ask: error:"), err
    assert "Traceback" not in captured.err and not captured.out


def test_numbers_too_large_for_a_float_are_refused_as_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=10 ** 400)
