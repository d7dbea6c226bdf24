"""Generation: batching, sampling filters, stopping and UTF-8-safe streaming."""

from __future__ import annotations


import pytest
import torch

from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.generate import (
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    generate,
    sample,
    stream,
)
from imagebind_llm.llm.model import Transformer


def _chat(tokenizer, question: str) -> list[int]:
    return tokenizer.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")


QUESTIONS = ["What is the capital of France?", "Name a colour.", "Write a haiku about autumn leaves falling."]
JAPANESE = "Translate 'thank you' to Japanese."


def test_batched_greedy_equals_per_prompt_greedy(smollm2, smollm2_tokenizer):
    prompts = [_chat(smollm2_tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)
    kwargs = dict(max_new_tokens=12, stop_token_ids=smollm2_tokenizer.stop_ids)
    batched = generate(smollm2, prompts, **kwargs)
    alone = [generate(smollm2, [p], **kwargs)[0] for p in prompts]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]
    assert [c.finish_reason for c in batched] == [c.finish_reason for c in alone]
    assert any(len(c.tokens) >= 5 for c in batched)


def test_greedy_matches_transformers_generate(smollm2, hf_smollm2, smollm2_tokenizer):
    prompt = _chat(smollm2_tokenizer, QUESTIONS[0])
    ours = generate(smollm2, [prompt], tokenizer=smollm2_tokenizer, max_new_tokens=10,
                    stop_token_ids=smollm2_tokenizer.stop_ids)[0]
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = hf_smollm2.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                  eos_token_id=sorted(smollm2_tokenizer.stop_ids), pad_token_id=0)
    theirs = out[0, len(prompt):].tolist()
    assert ours.tokens == [t for t in theirs if t not in smollm2_tokenizer.stop_ids]
    assert "Paris" in ours.text


def test_stream_pieces_concatenate_and_never_split_utf8(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = _chat(tok, JAPANESE)
    kwargs = dict(max_new_tokens=16, stop_token_ids=tok.stop_ids)
    full = generate(smollm2, [prompt], tokenizer=tok, **kwargs)[0]
    # The test is only meaningful if some character really spans several tokens.
    assert any("\ufffd" in tok.decode(full.tokens[: i + 1]) for i in range(len(full.tokens)))
    pieces = list(stream(smollm2, tok, prompt, **kwargs))
    assert "".join(pieces) == full.text
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)


def test_stop_strings_cut_text_in_generate_and_stream(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = _chat(tok, QUESTIONS[0])
    plain = generate(smollm2, [prompt], tokenizer=tok, max_new_tokens=12, stop_token_ids=tok.stop_ids)[0]
    assert "Paris" in plain.text
    cut = generate(smollm2, [prompt], tokenizer=tok, max_new_tokens=12, stop_token_ids=tok.stop_ids,
                   stop_strings=["Paris"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == plain.text[: plain.text.index("Paris")]
    assert cut.tokens == plain.tokens[: len(cut.tokens)] and len(cut.tokens) < len(plain.tokens)
    pieces = list(stream(smollm2, tok, prompt, max_new_tokens=12, stop_token_ids=tok.stop_ids,
                         stop_strings=["Paris"]))
    assert "".join(pieces) == cut.text


def test_stop_token_ids_and_min_new_tokens(smollm2, smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = _chat(tok, QUESTIONS[0])
    done = generate(smollm2, [prompt], tokenizer=tok, max_new_tokens=30, stop_token_ids=tok.stop_ids)[0]
    assert done.finish_reason == "eos" and len(done.tokens) < 30
    forced = generate(smollm2, [prompt], max_new_tokens=len(done.tokens) + 3, min_new_tokens=len(done.tokens) + 3,
                      stop_token_ids=tok.stop_ids)[0]
    assert forced.finish_reason == "length" and len(forced.tokens) == len(done.tokens) + 3
    assert forced.tokens[: len(done.tokens)] == done.tokens


def test_top_k_one_sampling_equals_greedy(smollm2, smollm2_tokenizer):
    prompt = _chat(smollm2_tokenizer, QUESTIONS[2])
    greedy = generate(smollm2, [prompt], max_new_tokens=8, stop_token_ids=[])[0]
    sampled = generate(smollm2, [prompt], max_new_tokens=8, stop_token_ids=[], temperature=1.3, top_k=1,
                       generator=torch.Generator().manual_seed(0))[0]
    assert sampled.tokens == greedy.tokens


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    # Sorted: 0.5 (idx 1), 0.3 (idx 3), 0.15 (idx 0), 0.05 (idx 2); mass before each: 0, .5, .8, .95.
    kept = torch.isfinite(apply_top_p(logits, 0.7))
    assert kept.tolist() == [[False, True, False, True]]
    kept = torch.isfinite(apply_top_p(logits, 0.85))
    assert kept.tolist() == [[True, True, False, True]]
    kept = torch.isfinite(apply_top_p(logits, 0.1))
    assert kept.tolist() == [[False, True, False, False]]
    assert torch.equal(apply_top_p(logits, 0.7)[torch.isfinite(apply_top_p(logits, 0.7))], logits[0, [1, 3]])


def test_top_k_filter():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert torch.isfinite(apply_top_k(logits, 2)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(apply_top_k(logits, 10)).all()


def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().expand(20000, 3)
    draws = sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    # temperature 0.5 squares the probabilities (renormalised)
    sharp = probs**2 / (probs**2).sum()
    draws = sample(logits, temperature=0.5, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, sharp, atol=0.015, rtol=0)
    assert sample(logits[:2], temperature=0.0).tolist() == [0, 0]


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(LLMConfig.from_name("tiny-gqa")).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model


def test_repetition_penalty_in_generation_avoids_repeats():
    model = _tiny_model()
    prompt = [5, 6, 7]
    plain = generate(model, [prompt], max_new_tokens=20, stop_token_ids=[])[0].tokens
    assert len(set(plain)) < len(plain)  # a random tiny model loops
    penalised = generate(model, [prompt], max_new_tokens=20, stop_token_ids=[], repetition_penalty=1e6)[0].tokens
    assert len(set(penalised + prompt)) == len(penalised) + len(prompt)


def test_injections_reach_every_generation_step():
    model = _tiny_model()
    cfg = model.config
    prompts = [[5, 6, 7, 8], [9, 10]]
    base = generate(model, prompts, max_new_tokens=6, stop_token_ids=[])
    zeros = [torch.zeros(2, 1, cfg.n_heads, cfg.head_dim)] * cfg.n_layers
    same = generate(model, prompts, max_new_tokens=6, stop_token_ids=[], injections=zeros)
    assert [c.tokens for c in same] == [c.tokens for c in base]
    calls = []
    hook = model.layers[0].attention.wo.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape))
    big = [torch.randn(2, 1, cfg.n_heads, cfg.head_dim, generator=torch.Generator().manual_seed(3)) * 5] * cfg.n_layers
    changed = generate(model, prompts, max_new_tokens=6, stop_token_ids=[], injections=big)
    hook.remove()
    assert len(calls) == 6  # prefill + 5 decode steps
    assert [c.tokens for c in changed] != [c.tokens for c in base]


def test_bad_arguments_raise():
    model = _tiny_model()
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], top_p=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[10**6]])
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1]], stop_strings=["x"])
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1]], max_new_tokens=model.config.max_seq_len + 1)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = _tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    eager = generate(model, prompts, max_new_tokens=6, stop_token_ids=[])
    compiled = generate(model, prompts, max_new_tokens=6, stop_token_ids=[], compile=True)
    assert [c.tokens for c in compiled] == [c.tokens for c in eager]
