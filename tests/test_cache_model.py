"""The FAISS `FeatureCache` inside the ImageBind-LLM model reproduces the official cache outputs:
``vf_knn`` / ``vf_knn_mix`` of tests/fixtures/adapter/adapter_io.pt (official code, flat IP ``knn_bank``)."""

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from imagebind_llm.cache import BlendOptions, FeatureCache
from imagebind_llm.encoders import ImageBind, ImageBindConfig
from imagebind_llm.llm.tokenizer import load_tokenizer
from imagebind_llm.llm.weights.common import build_model
from imagebind_llm.llm.weights.meta import load_meta_state_dict
from imagebind_llm.model.config import AdapterConfig
from imagebind_llm.model.convert import read_adapter_file
from imagebind_llm.model.factory import load_adapter_tensors
from imagebind_llm.model.imagebind_llm import ImageBindLLM

FIXTURES = Path(__file__).parent / "fixtures"
ADAPTER = FIXTURES / "adapter"


@pytest.fixture(scope="module")
def encoder() -> ImageBind:
    kwargs = json.loads((FIXTURES / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    return ImageBind(ImageBindConfig.from_dict({**kwargs, "with_point": False})).load_official(
        FIXTURES / "imagebind" / "imagebind_small.pth")


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_model_with_feature_cache_matches_official_vf_knn(tmp_path, encoder, phase):
    io = torch.load(ADAPTER / "adapter_io.pt", weights_only=True)
    inputs, ref = io["inputs"], io["results"][phase]
    config, state = load_meta_state_dict(ADAPTER / "llama" / "base", max_seq_len=512)
    model = ImageBindLLM(build_model(config, state, ADAPTER), encoder, AdapterConfig(feature_dim=32, phase=phase),
                         tokenizer=load_tokenizer(ADAPTER / "llama" / "tokenizer.model"))
    load_adapter_tensors(model, read_adapter_file(ADAPTER / f"adapter_{phase}.pth"))
    model.eval()
    FeatureCache.from_vectors(ref["knn_bank"], factory="Flat").save(tmp_path / "cache")
    cache = FeatureCache.load(tmp_path / "cache")  # through disk: memory-mapped flat index
    with torch.no_grad():
        vf_knn = model.encode_inputs({"Image": (inputs["vision"], 1)}, partial(cache.blend, options=BlendOptions(10, 20, 0.5)))
        vf_knn_mix = model.encode_inputs({"Image": (inputs["vision"], 0.5), "Audio": (inputs["audio"], 0.5)},
                                         partial(cache.blend, options=BlendOptions(5, 50, 0.7)))
    torch.testing.assert_close(vf_knn, ref["vf_knn"].reshape(vf_knn.shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vf_knn_mix, ref["vf_knn_mix"].reshape(vf_knn_mix.shape), atol=1e-5, rtol=1e-5)
