"""Our decoder against transformers' LlamaForCausalLM / Qwen2ForCausalLM, plus cache and injection invariants."""

from __future__ import annotations

import pytest
import torch

from imagebind_llm.llm.config import CONFIGS, LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.weights.hf import hf_config_dict, to_hf_state_dict

TEXTS = [
    "The capital of France is Paris, and the capital of Germany is",
    "def fibonacci(n):\n    return",
    "Ünïcödé 😀 中文 text",
]


def _hf_twin(model: Transformer):
    """transformers' model with the same config and weights (q/k converted to rotate-half layout)."""
    import transformers

    cfg = hf_config_dict(model.config)
    cls = transformers.Qwen2ForCausalLM if cfg["model_type"] == "qwen2" else transformers.LlamaForCausalLM
    config_cls = transformers.Qwen2Config if cfg["model_type"] == "qwen2" else transformers.LlamaConfig
    twin = cls(config_cls.from_dict(cfg)).eval()
    missing, unexpected = twin.load_state_dict(to_hf_state_dict(model.state_dict(), model.config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return twin


def _random_model(config: LLMConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():  # small weights keep logits O(1), so 1e-5 is a meaningful tolerance
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for layer in model.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.1)
    return model


TINY_CASES = {
    "tiny-mha-untied": LLMConfig.from_name("tiny"),
    "tiny-gqa-tied": LLMConfig.from_name("tiny-gqa"),
    "qwen2-bias": LLMConfig.from_name("tiny-gqa", attn_bias=True, rope_theta=1e6),
    "llama3-rope-scaling": LLMConfig.from_name(
        "tiny-gqa", rope_theta=500000.0,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
}


@pytest.mark.parametrize("name", TINY_CASES)
def test_tiny_configs_match_transformers(name):
    model = _random_model(TINY_CASES[name])
    twin = _hf_twin(model)
    tokens = torch.randint(0, model.config.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), twin(tokens).logits
    assert theirs.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_changes_the_result():
    """The scaling case above only proves something if the scaling actually matters at these lengths."""
    cfg = TINY_CASES["llama3-rope-scaling"]
    plain = LLMConfig.from_name("tiny-gqa", rope_theta=500000.0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 150), generator=torch.Generator().manual_seed(1))
    a, b = _random_model(cfg), _random_model(plain)
    with torch.no_grad():
        assert (a(tokens) - b(tokens)).abs().max() > 1e-3


def _tokens(tokenizer, texts):
    return [tokenizer.encode(t) for t in texts]


def test_smollm2_batch_of_different_lengths_matches_transformers(smollm2, hf_smollm2, smollm2_tokenizer):
    prompts = _tokens(smollm2_tokenizer, TEXTS)
    lengths = [len(p) for p in prompts]
    assert len(set(lengths)) == len(lengths)
    S = max(lengths)
    batch = torch.zeros(len(prompts), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = torch.tensor(p)
    smollm2.setup_caches(len(prompts), S + 4)
    with torch.inference_mode():
        cached = smollm2(batch, torch.arange(S))  # right padding, per-row valid prefix
        uncached = smollm2(batch)
        for i, p in enumerate(prompts):
            ref = hf_smollm2(torch.tensor([p])).logits[0]
            assert (cached[i, : len(p)] - ref).abs().max() <= 1e-4
            assert (uncached[i, : len(p)] - ref).abs().max() <= 1e-4
    smollm2.reset_caches()


@pytest.mark.parametrize("variant", ["smollm2", "smollm2_dense"])
def test_smollm2_incremental_decoding_matches_full_sequence(variant, hf_smollm2, smollm2_tokenizer, request):
    """One token at a time: the quantised variant runs every projection through the Q4_1/Q8_0 kernels."""
    smollm2 = request.getfixturevalue(variant)
    ids = smollm2_tokenizer.encode(TEXTS[0])
    full = torch.tensor([ids])
    n_prefill = len(ids) - 6
    with torch.inference_mode():
        ref = hf_smollm2(full).logits[0]
        smollm2.setup_caches(1, len(ids))
        steps = [smollm2(full[:, :n_prefill], torch.arange(n_prefill))[0]]
        for pos in range(n_prefill, len(ids)):
            steps.append(smollm2(full[:, pos: pos + 1], torch.tensor([pos]))[0])
        smollm2.reset_caches()
    incremental = torch.cat(steps)
    assert (incremental - ref).abs().max() <= 1e-4


def test_smollm2_batched_decode_step_matches_transformers(smollm2, hf_smollm2, smollm2_tokenizer):
    """A decode step for rows at different positions (several rows per kernel call) against transformers."""
    prompts = _tokens(smollm2_tokenizer, TEXTS)
    S = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), S, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, : len(p)] = torch.tensor(p)
    prefill = torch.tensor([len(p) - 1 for p in prompts])
    with torch.inference_mode():
        smollm2.setup_caches(len(prompts), S)
        smollm2(batch, torch.arange(S))
        step = smollm2(batch.gather(1, prefill[:, None]), prefill[:, None])[:, 0]
        smollm2.reset_caches()
        for i, p in enumerate(prompts):
            ref = hf_smollm2(torch.tensor([p])).logits[0, -1]
            assert (step[i] - ref).abs().max() <= 1e-4


def test_per_row_positions_equal_running_rows_alone():
    model = _random_model(LLMConfig.from_name("tiny-gqa"))
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 320, (1, 9), generator=gen)
    b = torch.randint(0, 320, (1, 5), generator=gen)
    with torch.inference_mode():
        ref_a, ref_b = model(a)[0], model(b)[0]
        model.setup_caches(2, 16)
        batch = torch.cat([a, torch.cat([b, torch.zeros(1, 4, dtype=torch.long)], 1)])
        model(batch, torch.arange(9))
        # Both rows continue from their own end: positions 9 and 5.
        nxt = torch.tensor([[3], [7]])
        step = model(nxt, torch.tensor([[9], [5]]))
        ref_step_a = model(torch.cat([a, nxt[:1]], 1))[0, -1]  # no input_pos: uncached
    torch.testing.assert_close(step[0, 0], ref_step_a, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        ref_step_b = model(torch.cat([b, nxt[1:]], 1))[0, -1]
    torch.testing.assert_close(step[1, 0], ref_step_b, atol=1e-5, rtol=1e-5)
    assert ref_a.shape == (9, 320) and ref_b.shape == (5, 320)


def test_logits_index_selects_positions():
    model = _random_model(LLMConfig.from_name("tiny"))
    tokens = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, logits_index=torch.tensor([6, 2]))
    assert picked.shape == (2, 1, 300)
    torch.testing.assert_close(picked[:, 0], full[[0, 1], [6, 2]])


def test_logits_mask_selects_positions_and_the_loss_on_them_is_the_official_loss():
    from imagebind_llm.train.loop import lm_loss, predicting

    model = _random_model(LLMConfig.from_name("tiny"))
    tokens = torch.randint(0, 300, (2, 7))
    labels = torch.tensor([[0, 0, 0, 5, 9, 0, 0], [0, 0, 0, 0, 0, 7, 2]])
    with torch.no_grad():
        full = model(tokens)
        picked = model(tokens, logits_mask=predicting(labels))
    assert predicting(labels).nonzero().tolist() == [[0, 2], [0, 3], [1, 4], [1, 5]]
    torch.testing.assert_close(picked, full[[0, 0, 1, 1], [2, 3, 4, 5]])
    torch.testing.assert_close(lm_loss(picked, labels), lm_loss(full, labels))
    none = torch.zeros_like(labels)
    assert lm_loss(model(tokens, logits_mask=predicting(none)), none).item() == 0.0


def test_injection_is_added_to_attention_output_before_wo():
    model = _random_model(LLMConfig.from_name("tiny-gqa"))
    cfg = model.config
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    injection = torch.randn(2, 1, cfg.n_heads, cfg.head_dim)
    seen = {}
    wo = model.layers[1].attention.wo
    hook = wo.register_forward_pre_hook(lambda m, args: seen.setdefault(len(seen), args[0].clone()))
    with torch.no_grad():
        base = model(tokens)
        zero = model(tokens, injections=[None, torch.zeros_like(injection)])
        injected = model(tokens, injections=[None, injection])
    hook.remove()
    torch.testing.assert_close(zero, base, rtol=0, atol=0)
    expected = seen[0] + injection.reshape(2, 1, -1)  # broadcast over every position
    torch.testing.assert_close(seen[2], expected)
    assert (injected - base).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one per layer"):
        model(tokens, injections=[None])


def test_uncached_forward_is_differentiable():
    model = _random_model(LLMConfig.from_name("tiny-gqa", attn_bias=True))
    tokens = torch.randint(0, 320, (2, 8))
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0
    assert model.layers[0].attention.wk.bias.grad.abs().sum() > 0


def test_tied_embeddings_state_dict_and_meta_assign_load():
    model = _random_model(LLMConfig.from_name("tiny-gqa"))
    sd = model.state_dict()
    assert "output.weight" not in sd and "tok_embeddings.weight" in sd
    with torch.device("meta"):
        fresh = Transformer(model.config)
    result = fresh.load_state_dict(sd, assign=True, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert fresh.output.weight is fresh.tok_embeddings.weight
    tokens = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)
    untied = Transformer(LLMConfig.from_name("tiny"))
    assert "output.weight" in untied.state_dict()


def test_linear_modules_can_be_swapped():
    """Every projection is called through its module, so wrapping a Linear changes the forward."""
    model = _random_model(LLMConfig.from_name("tiny"))
    tokens = torch.randint(0, 300, (1, 4))
    with torch.no_grad():
        base = model(tokens)
        for layer in model.layers:
            for lin in (layer.attention.wq, layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2,
                        layer.feed_forward.w3):
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features))
        torch.testing.assert_close(model(tokens), base)
        model.layers[0].feed_forward.w2.bias.fill_(0.5)
        assert (model(tokens) - base).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_named_config_builds_on_meta(name):
    with torch.device("meta"):
        model = Transformer(LLMConfig.from_name(name))
    n = sum(p.numel() for p in model.parameters())
    assert n > 0


def test_cache_errors_and_reuse():
    model = _random_model(LLMConfig.from_name("tiny"))
    tokens = torch.randint(0, 300, (1, 4))
    with pytest.raises(ValueError, match="setup_caches"):
        model(tokens, torch.arange(4))
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_caches(1, model.config.max_seq_len + 1)
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="KV cache holds 1"):
        model(torch.randint(0, 300, (2, 4)), torch.arange(4))
    cache = model.layers[0].attention.kv_cache
    model.setup_caches(1, 8)
    assert model.layers[0].attention.kv_cache is cache
    model.reset_caches()
    assert not model.caches_enabled and model.layers[0].attention.kv_cache is None
