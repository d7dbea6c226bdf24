"""Image preprocessing vs the official loader's outputs, input kinds, errors and the training crop."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.preprocess import ImageConfig, MediaError, load_images, train_transform
from imagebind_llm.preprocess.image import CLIP_MEAN, CLIP_STD

FIXTURES = Path(__file__).parent / "fixtures"
MEDIA = FIXTURES / "media"


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "imagebind" / "preprocess_public.pt", weights_only=True)


def test_images_match_official(reference):
    paths = [MEDIA / f for f in reference["files"]["vision"]]
    out = load_images(paths)
    assert out.shape == (4, 3, 224, 224) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference["vision"], atol=1e-4, rtol=0)


def test_input_kinds_agree(reference):
    path = MEDIA / reference["files"]["vision"][0]
    data = path.read_bytes()
    pil = Image.open(path)
    mixed = load_images([str(path), data, io.BytesIO(data), open(path, "rb"), pil, np.asarray(pil.convert("RGB"))])
    for row in mixed:
        torch.testing.assert_close(row, reference["vision"][0], atol=1e-4, rtol=0)


def test_single_source_gives_batch_of_one(reference):
    assert load_images(MEDIA / reference["files"]["vision"][1]).shape == (1, 3, 224, 224)


def _jpeg_bytes(size=(300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("missing.jpg", None, "not found"),
        ("empty.jpg", b"", "empty"),
        ("trunc.jpg", _jpeg_bytes()[:400], "truncated"),
        ("text.png", b"hello, not an image", "not a recognised image"),
    ],
)
def test_bad_files_raise_media_error(tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MediaError, match=expected) as info:
        load_images([MEDIA / "dog_image.jpg", path])
    assert str(path) in str(info.value)


def test_bad_bytes_named_by_position():
    with pytest.raises(MediaError, match=r"<bytes #1>"):
        load_images([_jpeg_bytes(), b"\x00\x01garbage"])
    with pytest.raises(MediaError, match="unsupported input type"):
        load_images([12])
    assert issubclass(MediaError, ValueError)


def test_train_transform_reproducible_and_shaped():
    image = Image.open(MEDIA / "dog_image.jpg")
    a = train_transform(image, torch.Generator().manual_seed(3))
    b = train_transform(image, torch.Generator().manual_seed(3))
    c = train_transform(image, torch.Generator().manual_seed(4))
    assert a.shape == (3, 224, 224)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c)


def test_train_transform_full_crop_is_plain_normalisation():
    """With scale 1 and the image's own aspect ratio the crop is the whole 224x224 image, unresized."""
    pixels = np.random.default_rng(1).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    config = ImageConfig(train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0))
    out = train_transform(Image.fromarray(pixels), torch.Generator().manual_seed(0), config)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) / 255.0 - mean) / std
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
