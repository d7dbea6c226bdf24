"""CLIP BPE tokenisation vs the official tokenizer's ids (both truncation modes)."""

from pathlib import Path

import pytest
import torch

from imagebind_llm.preprocess import tokenize

FIXTURES = Path(__file__).parent / "fixtures"
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURES / "imagebind" / "preprocess_public.pt", weights_only=True)


def test_tokens_match_official(reference):
    out = tokenize(reference["texts"])
    assert out.dtype == torch.long and out.shape == (5, 77)
    assert torch.equal(out, reference["text_tokens"])


def test_legacy_tokens_match_official(reference):
    assert torch.equal(tokenize(reference["texts"], legacy_truncation=True), reference["text_tokens_legacy"])


def test_truncation_modes_on_long_text():
    long = "word " * 100
    current, legacy = tokenize(long)[0], tokenize(long, legacy_truncation=True)[0]
    assert current[0] == SOT and current[-1] == EOT
    assert legacy[0] == SOT and EOT not in legacy.tolist()
    assert torch.equal(current[:76], legacy[:76])


def test_short_text_layout():
    ids = tokenize("a dog")[0]
    n = int((ids != 0).sum())
    assert ids[0] == SOT and ids[n - 1] == EOT and (ids[n:] == 0).all()
    assert torch.equal(tokenize("  A   DOG &amp;amp; "), tokenize("a dog &"))  # CLIP cleaning


def test_non_string_rejected():
    with pytest.raises(TypeError, match="text #1"):
        tokenize(["ok", 3])
