"""ImageBind-LLM against the official implementation's outputs (tests/fixtures/adapter, README there)."""

import json
from pathlib import Path

import pytest
import torch

from imagebind_llm.encoders import ImageBind, ImageBindConfig
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.tokenizer import load_tokenizer
from imagebind_llm.llm.weights.common import build_model
from imagebind_llm.llm.weights.meta import load_meta_state_dict
from functools import partial

from imagebind_llm.cache.blend import BlendOptions, ExactBank
from imagebind_llm.model.config import AdapterConfig
from imagebind_llm.model.convert import CheckpointMismatchError, official_adapter_state_dict, official_names, read_adapter_file
from imagebind_llm.model.factory import load_adapter_tensors
from imagebind_llm.model.imagebind_llm import ImageBindLLM
from imagebind_llm.model.media import UnknownModalityError
from imagebind_llm.model.peft import set_trainable
from imagebind_llm.train.loop import lm_loss

FIXTURES = Path(__file__).parent / "fixtures"
ADAPTER = FIXTURES / "adapter"
IO = torch.load(ADAPTER / "adapter_io.pt", weights_only=True)
INPUTS = IO["inputs"]
PHASES = ["pretrain", "finetune"]


def small_encoder() -> ImageBind:
    kwargs = json.loads((FIXTURES / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    encoder = ImageBind(ImageBindConfig.from_dict({**kwargs, "with_point": False}))
    return encoder.load_official(FIXTURES / "imagebind" / "imagebind_small.pth")


def official_model(phase: str, encoder: ImageBind) -> ImageBindLLM:
    config, state = load_meta_state_dict(ADAPTER / "llama" / "base", max_seq_len=512)
    model = ImageBindLLM(build_model(config, state, ADAPTER), encoder, AdapterConfig(feature_dim=32, phase=phase),
                         tokenizer=load_tokenizer(ADAPTER / "llama" / "tokenizer.model"))
    load_adapter_tensors(model, read_adapter_file(ADAPTER / f"adapter_{phase}.pth"))
    return model.eval()


@pytest.fixture(scope="module")
def encoder():
    return small_encoder()


@pytest.fixture(scope="module", params=PHASES)
def phase_model(request, encoder):
    return request.param, official_model(request.param, encoder)


def test_bind_outputs_match_official(phase_model):
    phase, model = phase_model
    ref = IO["results"][phase]
    bank = ExactBank(ref["knn_bank"])
    with torch.no_grad():
        vf_img = model.encode_inputs({"Image": (INPUTS["vision"], 1)})
        vf_mix = model.encode_inputs({"Image": (INPUTS["vision"], 0.3), "Audio": (INPUTS["audio"], 0.5),
                                      "Text": (INPUTS["text"], 0.2)})
        vf_knn = model.encode_inputs({"Image": (INPUTS["vision"], 1)}, partial(bank.blend, options=BlendOptions(10, 20, 0.5)))
        vf_knn_mix = model.encode_inputs({"Image": (INPUTS["vision"], 0.5), "Audio": (INPUTS["audio"], 0.5)},
                                         partial(bank.blend, options=BlendOptions(5, 50, 0.7)))
    torch.testing.assert_close(vf_img, ref["vf_img"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vf_mix, ref["vf_mix"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vf_knn, ref["vf_knn"].reshape(vf_knn.shape), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vf_knn_mix, ref["vf_knn_mix"].reshape(vf_knn_mix.shape), atol=1e-5, rtol=1e-5)


def test_incremental_logits_match_official(phase_model):
    phase, model = phase_model
    ref = IO["results"][phase]
    with torch.no_grad():
        visual = model.encode_inputs({"Image": (INPUTS["vision"], 1)})
        prompt = ref["prompt_ids"][None]
        prefill = model.forward_logits(prompt, visual, 0)[:, -1]
        pos, steps = prompt.shape[1], []
        for token in ref["forced"]:
            steps.append(model.forward_logits(token.view(1, 1), visual, pos)[:, -1])
            pos += 1
    torch.testing.assert_close(prefill, ref["logits_prefill"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps), ref["step_logits"], atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_official(phase_model):
    phase, model = phase_model
    ref = IO["results"][phase]
    out = model.generate([ref["prompt_ids"].tolist()], {"Image": (INPUTS["vision"], 1)}, temperature=0,
                         max_new_tokens=24)[0]
    assert out.tokens == ref["gen_greedy_ids"].tolist()
    assert out.text == ref["gen_greedy_text"]


def test_training_loss_gradients_and_trainable_set_match_official(phase_model, encoder):
    phase, _ = phase_model
    ref = IO["results"][phase]
    model = official_model(phase, encoder).train()
    trainable = set_trainable(model, model.adapter_params(phase))
    names = official_names(model)
    assert sorted(names[n] for n in trainable) == sorted(ref["trainable"])
    visual = model.encode_inputs({"image": (INPUTS["vision_batch"], 1.0)})
    loss = lm_loss(model(ref["train_tokens"], visual), ref["train_labels"])
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=0)
    loss.backward()
    grads = {names[n]: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref["grads"])
    for name, expected in ref["grads"].items():
        torch.testing.assert_close(grads[name].reshape(expected.shape), expected, atol=1e-4, rtol=1e-4, msg=name)


def test_7b_skeleton_has_the_released_adapter_keys():
    manifest = json.loads((ADAPTER / "imagebind_llm_7B_keys.json").read_text())["adapter_7B_pth"]
    with torch.device("meta"):
        model = ImageBindLLM(Transformer(LLMConfig.from_name("llama-7b")), None, AdapterConfig(phase="finetune"))
    exported = {k: list(v.shape) for k, v in official_adapter_state_dict(model).items()}
    assert exported == {k: list(v) for k, v in manifest.items()}


def test_exported_adapter_round_trips_to_the_official_file(encoder):
    model = official_model("finetune", encoder)
    exported = official_adapter_state_dict(model)
    original = torch.load(ADAPTER / "adapter_finetune.pth", weights_only=True)["model"]
    assert set(exported) == set(original)
    for name, tensor in original.items():
        torch.testing.assert_close(exported[name], tensor.to(exported[name].dtype), atol=0, rtol=0, msg=name)


def test_stage2_file_into_stage1_model_is_refused(encoder):
    config, state = load_meta_state_dict(ADAPTER / "llama" / "base")
    model = ImageBindLLM(build_model(config, state, ADAPTER), encoder, AdapterConfig(feature_dim=32, phase="pretrain"))
    with pytest.raises(CheckpointMismatchError, match="phase='finetune'"):
        load_adapter_tensors(model, read_adapter_file(ADAPTER / "adapter_finetune.pth"))


def test_unknown_modality_is_a_clear_error(phase_model):
    _, model = phase_model
    with pytest.raises(UnknownModalityError, match="smell"):
        model.encode_inputs({"smell": (INPUTS["vision"], 1)})


def test_zero_gates_give_the_base_llm_logits():
    torch.manual_seed(0)
    llm = Transformer(LLMConfig.from_name("tiny-gqa")).eval()
    tokens = torch.randint(0, llm.config.vocab_size, (2, 7))
    with torch.no_grad():
        base = llm(tokens)
        model = ImageBindLLM(llm, None, AdapterConfig(feature_dim=16, phase="finetune")).eval()
        visual = model.bind(torch.randn(2, 1, 16))
        torch.testing.assert_close(model(tokens, visual), base, atol=0, rtol=0)  # gates 0, LoRA B 0, biases 0
        for gate in model.gates:
            gate.fill_(0.5)
        assert not torch.allclose(model(tokens, visual), base)  # the injection reaches the GQA backbone


def test_batch_of_mixed_requests_equals_single_requests(encoder):
    model = official_model("finetune", encoder)
    prompts = ["Describe the image in detail.", "What do you hear?", "Hello", "Compare the picture and the sound."]
    vision, audio, text = INPUTS["vision_batch"], INPUTS["audio"], INPUTS["text"]
    media = [
        {"image": (vision[:1], 1.0)},
        {"audio": (audio, 0.5), "text": (text, 0.5)},
        None,
        {"image": (vision[1:], 0.3), "audio": (audio, 0.7)},
    ]
    batched = model.generate(prompts, media, temperature=0, max_new_tokens=12)
    single = [model.generate([p], m, temperature=0, max_new_tokens=12)[0] for p, m in zip(prompts, media)]
    assert [b.tokens for b in batched] == [s.tokens for s in single]
    plain = model.generate([prompts[2]], None, temperature=0, max_new_tokens=12)[0]
    assert batched[2].tokens == plain.tokens


def test_rows_with_point_clouds_of_different_sizes_share_a_batch():
    torch.manual_seed(0)
    kwargs = json.loads((FIXTURES / "imagebind" / "imagebind_small.json").read_text())["ImageBindModel_kwargs"]
    encoder = ImageBind(ImageBindConfig.from_dict({**kwargs, "point_depth": 1, "point_num_group": 16})).eval()
    model = ImageBindLLM(Transformer(LLMConfig.from_name("tiny")), encoder, AdapterConfig(feature_dim=32)).eval()
    small, large = torch.randn(1, 500, 3), torch.randn(1, 800, 3)
    with torch.no_grad():
        batched, has_media = model.encode_requests([{"point": (small, 1.0)}, None, {"Point": (large, 1.0)}])
        alone = [model.encode_inputs({"point": (cloud, 1.0)}) for cloud in (small, large)]
    assert has_media.tolist() == [True, False, True]
    torch.testing.assert_close(batched[[0, 2]], torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert not batched[1].any()


def test_injection_into_the_last_layers_only():
    torch.manual_seed(0)
    llm = Transformer(LLMConfig.from_name("tiny")).eval()
    model = ImageBindLLM(llm, None, AdapterConfig(feature_dim=16, inject_layers=1, phase="pretrain")).eval()
    exported = official_adapter_state_dict(model)
    assert [k for k in exported if k.endswith(".gate")] == ["llama.layers.1.attention.gate"]
    assert tuple(exported["prefix_query.weight"].shape) == (1, llm.config.dim)
    with torch.no_grad():
        model.gates[0].fill_(1.0)
        injections = model.injections(model.bind(torch.randn(2, 1, 16)))
    assert injections[0] is None and injections[1].shape == (2, 1, llm.config.n_heads, llm.config.head_dim)
    with pytest.raises(ValueError, match="inject_layers"):
        ImageBindLLM(llm, None, AdapterConfig(feature_dim=16, inject_layers=3, phase="pretrain"))
