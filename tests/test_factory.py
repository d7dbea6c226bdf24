"""Building, saving and loading ImageBind-LLM models; the Open-Chinese-LLaMA delta merge."""

import json

import pytest
import torch

import imagebind_llm as ibl
from imagebind_llm.hub import MODELS
from imagebind_llm.model.config import ModelSpec
from imagebind_llm.model.convert import CheckpointMismatchError, official_adapter_state_dict
from imagebind_llm.model.factory import (
    BASE_MARKER, create_model, load_adapter_tensors, load_pretrained, merge_delta, save_pretrained,
)
from test_model import ADAPTER, FIXTURES, INPUTS, IO

SMALL = ModelSpec(llm=ADAPTER / "llama" / "base", adapter=ADAPTER / "adapter_finetune.pth",
                  imagebind=FIXTURES / "imagebind" / "imagebind_small.pth",
                  imagebind_config=FIXTURES / "imagebind" / "imagebind_small.json")


@pytest.fixture(scope="module")
def released():
    return create_model(SMALL)


def test_spec_fields_override_and_the_tokenizer_path_gives_the_same_model(released):
    model = ibl.create_model(SMALL, tokenizer=ADAPTER / "llama" / "tokenizer.model")
    tokens = torch.tensor([IO["results"]["finetune"]["prompt_ids"].tolist()])
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), released(tokens), atol=0, rtol=0)


def test_named_models_resolve_their_parts_and_explain_what_is_missing():
    assert MODELS["imagebind-llm-7b"].adapter == "7B.pth" and MODELS["imagebind-llm-7b"].imagebind == "imagebind_w3D.pth"
    with pytest.raises(ValueError, match="cannot be downloaded: pass its folder"):
        create_model("imagebind-llm-7b")
    with pytest.raises(ValueError, match="unknown model 'nope'.*imagebind-llm-7b"):
        create_model("nope")
    blind = create_model("tiny-random", max_seq_len=64)
    assert blind.encoder is not None and not any(g.any() for g in blind.gates)  # zero gates


def test_an_adapter_file_with_a_foreign_key_is_named_in_the_error(tmp_path):
    state = torch.load(SMALL.adapter, weights_only=True)
    state = state.get("model", state)
    torch.save({"model": {**state, "visual_proj.weight": torch.zeros(2, 2)}}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointMismatchError, match=r"odd\.pth: unknown ImageBind-LLM checkpoint key 'visual_proj"):
        create_model(SMALL, adapter=tmp_path / "odd.pth")


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
    again = create_model(SMALL.replace(adapter=tmp_path / "ckpt"))
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
        load_pretrained(tmp_path / "ckpt", ADAPTER / "llama" / "base")


def test_merge_delta_adds_in_float_and_stores_half(tmp_path):
    base, delta = tmp_path / "7B", tmp_path / "delta"
    for folder in (base, delta):
        folder.mkdir()
        (folder / "params.json").write_text(json.dumps({"dim": 4}))
    a = {"w": torch.tensor([1.0, 2.0, 3.0]), "layers.0.attention.inner_attention.rope.freqs": torch.ones(2)}
    b = {"w": torch.tensor([0.5, -2.0, 1e-4])}
    torch.save(a, base / "consolidated.00.pth")
    torch.save(b, delta / "consolidated.00.pth")
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")  # Meta's layout: beside the size folders
    out = merge_delta(base, delta, tmp_path / "7B_chinese")
    assert (out / "tokenizer.model").read_bytes() == b"sentencepiece"  # the merged base loads on its own
    merged = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert set(merged) == {"w"}
    assert merged["w"].dtype == torch.float16
    assert merged["w"].tolist() == torch.tensor([1.5, 0.0, 3.0001]).half().tolist()
    assert (out / BASE_MARKER).is_file()


def test_hf_base_gives_the_same_model_as_meta(released, tmp_path):
    from imagebind_llm.llm.weights.hf import save_hf
    from imagebind_llm.llm.weights.meta import load_meta_state_dict

    hf_dir = tmp_path / "hf"
    config, state = load_meta_state_dict(ADAPTER / "llama" / "base")
    save_hf(hf_dir, state, config)
    (hf_dir / "tokenizer.model").write_bytes((ADAPTER / "llama" / "tokenizer.model").read_bytes())
    base = create_model(SMALL.replace(adapter=None, phase="pretrain"))
    from_hf = create_model(SMALL.replace(llm=hf_dir, adapter=None, phase="pretrain"))
    tokens = torch.tensor([IO["results"]["finetune"]["prompt_ids"].tolist()])
    with torch.no_grad():
        torch.testing.assert_close(from_hf(tokens), base(tokens), atol=1e-5, rtol=1e-5)


def test_legacy_bind_network_adapter_round_trips(released, tmp_path):
    from imagebind_llm.model.imagebind_llm import AdapterConfig, ImageBindLLM
    from imagebind_llm.llm.model import Transformer

    torch.manual_seed(0)
    legacy = ImageBindLLM(Transformer(released.llm.config), None, AdapterConfig(feature_dim=32, legacy_bind=True))
    exported = official_adapter_state_dict(legacy)
    assert "image_bind_norm_1.bias" in exported and "image_bind_f1_1.bias" in exported
    torch.save({"model": exported}, tmp_path / "legacy.pth")
    again = create_model(ModelSpec(llm=ADAPTER / "llama" / "base", adapter=tmp_path / "legacy.pth"))
    assert again.config.legacy_bind
    features = torch.randn(2, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(again.bind(features), legacy.bind(features), atol=0, rtol=0)
    with pytest.raises(CheckpointMismatchError, match="legacy_bind=True"):
        load_adapter_tensors(released, exported)


def test_stream_pieces_concatenate_to_the_generated_text(released):
    media = {"image": (INPUTS["vision"], 1.0)}
    prompt = "Describe the image in detail."
    text = released.generate([prompt], media, temperature=0, max_new_tokens=16)[0].text
    assert "".join(released.stream(prompt, media, temperature=0, max_new_tokens=16)) == text


def test_stage2_from_a_stage1_folder_takes_lora_layers_and_its_folder_keeps_them(released, tmp_path):
    stage1 = create_model(SMALL, adapter=ADAPTER / "adapter_pretrain.pth", phase="pretrain")
    save_pretrained(stage1, tmp_path / "stage1")
    stage2 = create_model(SMALL, adapter=tmp_path / "stage1", phase="finetune", lora_layers=1)
    last = stage2.llm.config.n_layers - 1
    assert stage2.config.lora_layers == 1 and {k.split(".")[2] for k in stage2.adapter_params("finetune")
                                                if k.startswith("llm.layers.")} == {str(last)}
    with torch.no_grad():
        for name, p in stage2.adapter_params("finetune").items():
            p.add_(0.01 * torch.randn_like(p))
    save_pretrained(stage2, tmp_path / "stage2")
    again = create_model(SMALL, adapter=tmp_path / "stage2")
    assert again.config.lora_layers == 1
    tokens = torch.tensor([IO["results"]["finetune"]["prompt_ids"].tolist()])
    with torch.no_grad():
        visual = stage2.encode_inputs({"image": (INPUTS["vision"], 1)})
        torch.testing.assert_close(again(tokens, visual), stage2(tokens, visual), atol=0, rtol=0)


def test_a_file_tuning_more_layers_than_lora_layers_is_refused_by_name(tmp_path):
    with pytest.raises(CheckpointMismatchError, match=r"tunes more layers than lora_layers=1.*layers\.0\..*lora"):
        create_model(SMALL, lora_layers=1)
