"""Shared fixtures: the embedded SmolLM2 GGUF, our model and transformers' model loaded from it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never try the network in tests


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from imagebind_llm.llm.weights.gguf import find_default_gguf

    return find_default_gguf()


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """``(model, metadata)``: our fp32 SmolLM2 from the GGUF."""
    from imagebind_llm.llm.weights.gguf import load_gguf

    return load_gguf(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2(smollm2_loaded):
    """Our SmolLM2 as loaded by default: Q4_1/Q8_0 projections kept quantised when the kernels build."""
    return smollm2_loaded[0]


@pytest.fixture(scope="session")
def smollm2_dense(smollm2_gguf):
    """Our SmolLM2 with every tensor dequantised to float32 parameters."""
    from imagebind_llm.llm.weights.gguf import load_gguf

    return load_gguf(smollm2_gguf, dtype=torch.float32, quantized=False)[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_loaded):
    """The GGUF's byte-level BPE tokenizer."""
    from imagebind_llm.llm.tokenizer import HFTokenizer

    return HFTokenizer.from_gguf_metadata(smollm2_loaded[1])


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own LlamaForCausalLM loaded from the same GGUF (its own dequantisation and layout)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
