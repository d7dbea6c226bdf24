"""Building, saving and loading ImageBind-LLM models; the Open-Chinese-LLaMA delta merge."""

import json
from pathlib import Path

import pytest
import torch

from imagebind_llm.model.checkpoint import CheckpointMismatchError
from imagebind_llm.model.factory import BASE_MARKER, from_official, load_pretrained, merge_delta, save_pretrained
from test_model import ADAPTER, INPUTS, IO, small_encoder


@pytest.fixture(scope="module")
def released():
    return from_official(ADAPTER / "llama" / "base", ADAPTER / "adapter_finetune.pth", small_encoder())


def test_from_official_reproduces_the_official_greedy_answer(released):
    ref = IO["results"]["finetune"]
    out = released.generate([ref["prompt_ids"].tolist()], {"Image": (INPUTS["vision"], 1)}, temperature=0,
                            max_new_tokens=24)[0]
    assert out.tokens == ref["gen_greedy_ids"].tolist()
    assert released.llm.config.max_seq_len == 512


def test_save_and_load_pretrained_round_trip(released, tmp_path):
    save_pretrained(released, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["adapter"]["phase"] == "finetune" and saved["llm"]["dim"] == 64
    again = load_pretrained(tmp_path / "ckpt", ADAPTER / "llama" / "base", released.encoder)
    tokens = torch.tensor([IO["results"]["finetune"]["prompt_ids"].tolist()])
    with torch.no_grad():
        visual = released.encode_inputs({"image": (INPUTS["vision"], 1)})
        torch.testing.assert_close(again(tokens, visual), released(tokens, visual), atol=0, rtol=0)


def test_load_pretrained_refuses_another_base(released, tmp_path):
    save_pretrained(released, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["llm"]["dim"] = 128
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="dim=128"):
        load_pretrained(tmp_path / "ckpt", ADAPTER / "llama" / "base", released.encoder)


def test_merge_delta_adds_in_float_and_stores_half(tmp_path):
    base, delta = tmp_path / "7B", tmp_path / "delta"
    for folder in (base, delta):
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"dim": 4}))
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "layers.0.attention.inner_attention.rope.freqs": torch.ones(2)}
    b = {"w": torch.tensor([0.5, -2.0, 1e-4])}
    torch.save(a, base / "consolidated.00.pth")
    torch.save(b, delta / "consolidated.00.pth")
    out = merge_delta(base, delta, tmp_path / "7B_chinese")
    merged = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert set(merged) == {"w"}
    assert merged["w"].dtype == torch.float16
    assert merged["w"].tolist() == torch.tensor([1.5, 0.0, 3.0001]).half().tolist()
    assert (out / BASE_MARKER).is_file()
