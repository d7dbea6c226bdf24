"""Stage-2 LoRA modules over dense and over quantised (GGUF-block) frozen projections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.quantized import QuantizedLinear, QuantizedWeight
from imagebind_llm.model.peft import (ATTENTION_PROJECTIONS, FFN_PROJECTIONS, LoRALinear, add_finetune_modules,
                                     merge_lora)

CONFIG = LLMConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64)


def quantized_linear(out_features: int, in_features: int, seed: int) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    nb = in_features // 32
    blocks = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, generator=g)
    scales = (torch.rand(out_features, nb, generator=g) * 0.02).half().float()
    offsets = (-torch.rand(out_features, nb, generator=g) * 0.1).half().float()
    return QuantizedLinear(QuantizedWeight("q4_1", blocks, scales, offsets))


def randomise_lora(model: nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA B and biases, so that the low-rank path and the biases count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def twin_models() -> tuple[Transformer, Transformer]:
    """A decoder whose projections are quantised, and its dense twin holding the dequantised weights."""
    torch.manual_seed(0)
    quantized = Transformer(CONFIG).eval()
    dense = Transformer(CONFIG).eval()
    dense.load_state_dict(quantized.state_dict())
    for i, (ql, dl) in enumerate(zip(quantized.layers, dense.layers)):
        for parent_q, parent_d, names in ((ql.attention, dl.attention, ATTENTION_PROJECTIONS),
                                          (ql.feed_forward, dl.feed_forward, FFN_PROJECTIONS)):
            for j, name in enumerate(names):
                old = getattr(parent_q, name)
                q = quantized_linear(old.out_features, old.in_features, seed=10 * i + j)
                setattr(parent_q, name, q)
                setattr(parent_d, name, q.to_linear())
    return quantized, dense


def test_lora_linear_and_merge_over_a_dense_base():
    linear = nn.Linear(64, 32)
    lora = LoRALinear.from_linear(linear, rank=4)
    assert lora.weight is linear.weight and lora.bias is linear.bias
    randomise_lora(lora)
    x = torch.randn(3, 64)
    expected = F.linear(x, linear.weight, linear.bias) + x @ lora.lora_a.weight.T @ lora.lora_b.weight.T
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.base_forward(x), linear(x))
    torch.testing.assert_close(F.linear(x, lora.merged_weight(), lora.bias), expected)


def test_merge_lora_puts_plain_linears_back_with_the_same_function():
    model = Transformer(CONFIG).eval()
    add_finetune_modules(model, rank=4)
    randomise_lora(model)
    tokens = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(tokens)
        merge_lora(model)
        after = model(tokens)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_lora_over_a_quantised_base_keeps_the_blocks():
    q = quantized_linear(32, 64, seed=0)
    lora = LoRALinear.from_linear(q, rank=4)
    assert lora.weight is None and lora.quantized is q.quantized
    assert not any("weight" == n for n, _ in lora.named_parameters())
    assert {n for n in lora.state_dict()} >= {"quantized.blocks", "lora_a.weight", "lora_b.weight"}
    dense = LoRALinear.from_linear(q.to_linear(), rank=4)
    randomise_lora(lora), randomise_lora(dense)  # the same A, B for both
    x = torch.randn(3, 64)
    torch.testing.assert_close(lora(x), dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.base_forward(x), q(x))
    torch.testing.assert_close(lora.merged_weight(), dense.merged_weight())


@pytest.mark.parametrize("tokens_per_step", [1, 40])  # decode (quantised kernels) and prefill (dequantised)
def test_finetune_structure_over_quantised_projections_equals_the_dense_twin(tokens_per_step):
    quantized, dense = twin_models()
    for model in (quantized, dense):
        add_finetune_modules(model, rank=4)
        randomise_lora(model)
    wq = quantized.layers[0].attention.wq
    assert isinstance(wq, LoRALinear) and wq.quantized is not None and wq.bias is not None
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(tokens)
        quantized.setup_caches(2, 40)
        steps = [quantized(tokens[:, p: p + tokens_per_step], torch.arange(p, p + tokens_per_step))
                 for p in range(0, 40, tokens_per_step)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=0, atol=1e-4)


def test_training_over_quantised_projections_gives_the_dense_gradients():
    quantized, dense = twin_models()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (quantized, dense):
        add_finetune_modules(model, rank=4)
        randomise_lora(model)
        model.requires_grad_(False)
        lora = [p for n, p in sorted(model.named_parameters()) if "lora_" in n or n.endswith(".bias")]
        for p in lora:
            p.requires_grad_(True)
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
        grads.append([p.grad for p in lora])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_lora_layers_tunes_only_the_last_layers_with_the_official_gradients():
    """``lora_layers=1``: stage 2's modules and trainable set only in the last layer (and the final norm);
    the function and the gradients of what trains equal the official all-layer structure's (whose LoRA B
    and biases start at zero, so the untuned layers add nothing)."""
    from imagebind_llm.model.config import AdapterConfig
    from imagebind_llm.model.imagebind_llm import ImageBindLLM

    torch.manual_seed(0)
    models = {}
    for lora_layers in (None, 1):
        torch.manual_seed(0)
        models[lora_layers] = ImageBindLLM(Transformer(CONFIG), None, AdapterConfig(feature_dim=16, lora_layers=lora_layers))
    full, last = models[None], models[1]
    last.load_state_dict(full.state_dict(), strict=False)
    assert not any(isinstance(m, LoRALinear) for m in last.llm.layers[0].modules())
    assert all(isinstance(getattr(last.llm.layers[1].attention, n), LoRALinear) for n in ATTENTION_PROJECTIONS)
    tuned = last.adapter_params("finetune")
    assert "llm.norm.weight" in tuned and "llm.layers.1.attention.wq.lora_a.weight" in tuned
    assert not [k for k in tuned if k.startswith("llm.layers.0.")]
    assert set(tuned) < set(full.adapter_params("finetune"))

    tokens, visual = torch.randint(0, 64, (2, 9)), torch.randn(2, 1, 64)
    losses = {}
    for key, model in models.items():
        with torch.no_grad():
            for g in model.gates:
                g.fill_(0.5)
        losses[key] = model(tokens, visual).logsumexp(-1).mean()
        losses[key].backward()
    torch.testing.assert_close(losses[1], losses[None])
    grads = dict(full.named_parameters())
    for name, p in tuned.items():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    with pytest.raises(ValueError, match="lora_layers=3 must be in 1..2"):
        ImageBindLLM(Transformer(CONFIG), None, AdapterConfig(feature_dim=16, lora_layers=3))
