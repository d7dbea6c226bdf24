"""File in, embedding out: our preprocessing + our ImageBind reproduce the official small-model
embeddings of the bundled media (``media_embeddings_small.pt``)."""

import json
from pathlib import Path

import pytest
import torch

from imagebind_llm.encoders import ImageBind, ImageBindConfig
from imagebind_llm.hub import read_state_dict
from imagebind_llm.preprocess import load_audio, load_images, load_video, tokenize

FIXTURES = Path(__file__).parent / "fixtures"
MEDIA = FIXTURES / "media"


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "imagebind" / "media_embeddings_small.pt", weights_only=True)


@pytest.fixture(scope="module")
def model():
    kwargs = json.loads((FIXTURES / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    config = ImageBindConfig.from_dict({**kwargs, "with_point": False})
    return ImageBind(config).load_official(read_state_dict(FIXTURES / "imagebind" / "imagebind_small.pth")).eval()


def _inputs(case: str, files: dict, texts: list[str]) -> tuple[str, torch.Tensor]:
    if case == "vision":
        return "vision", load_images([MEDIA / f for f in files["vision"]])
    if case == "video":
        return "vision", load_video([MEDIA / f for f in files["video"]])
    if case == "audio":
        return "audio", load_audio([MEDIA / f for f in files["audio"]])
    return "text", tokenize(texts)


@pytest.mark.parametrize("case", ["vision", "video", "audio", "text_tokens"])
def test_files_to_embeddings_match_official(model, reference, case):
    modality, x = _inputs(case, reference["files"], reference["texts"])
    with torch.no_grad():
        out = model({modality: x})[modality]
    expected = reference["embeddings"][case]
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
