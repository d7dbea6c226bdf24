"""Weight formats: one small random model round-trips through HF, Meta (1 and 2 shards) and GGUF to identical
logits; HF directories match transformers; bad inputs fail with messages naming the tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.weights import (
    CheckpointMismatchError,
    WeightsFormatError,
    detect_format,
    load_hf_state_dict,
    load_llm,
    load_meta_state_dict,
)
from imagebind_llm.llm.weights.common import build_model
from imagebind_llm.llm.weights.gguf import load_gguf
from imagebind_llm.llm.weights.hf import hf_to_meta_rotary, meta_to_hf_rotary, save_hf, to_hf_state_dict
from imagebind_llm.llm.weights.meta import save_meta

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_DIR = FIXTURES / "adapter" / "llama"

# Untied, no biases, GQA, Meta's SwiGLU rule for hidden_dim: expressible in all three formats.
CONFIG = LLMConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, norm_eps=1e-6,
                   rope_theta=500000.0, max_seq_len=128)
TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 8, 200, 299, 0, 5]])


def random_state(config: LLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.2) + (1.0 if "norm" in name else 0.0))
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_model(a: LLMConfig, b: LLMConfig) -> bool:
    """Equal in every field that defines the network (`multiple_of` etc. only derive hidden_dim)."""
    skip = ("multiple_of", "ffn_dim_multiplier", "name")
    return {k: v for k, v in a.to_dict().items() if k not in skip} == {k: v for k, v in b.to_dict().items() if k not in skip}


def logits_of(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS)


def save_gguf(path: Path, state: dict[str, torch.Tensor], config: LLMConfig) -> None:
    """F32 GGUF in llama.cpp's naming (q/k stay in Meta's rotary layout, as llama.cpp's converter writes them)."""
    names = {
        "tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
        "output.weight": "output.weight",
    }
    per_layer = {
        "attention_norm.weight": "attn_norm.weight", "attention.wq.weight": "attn_q.weight",
        "attention.wk.weight": "attn_k.weight", "attention.wv.weight": "attn_v.weight",
        "attention.wo.weight": "attn_output.weight", "ffn_norm.weight": "ffn_norm.weight",
        "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
        "feed_forward.w3.weight": "ffn_up.weight",
    }
    for i in range(config.n_layers):
        names.update({f"layers.{i}.{k}": f"blk.{i}.{v}" for k, v in per_layer.items()})
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for key, tensor in state.items():
        writer.add_tensor(names[key], tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def reference():
    state = random_state(CONFIG)
    return state, logits_of(build_model(CONFIG, dict(state), "reference"))


def test_rotary_permutation_is_an_inverse_pair():
    w = torch.arange(4 * 8 * 3, dtype=torch.float32).reshape(32, 3)
    assert torch.equal(meta_to_hf_rotary(hf_to_meta_rotary(w, 4), 4), w)
    b = torch.arange(32.0)
    # Head 0, HF rows (0, 4) form the first rotary pair; in our layout they become adjacent rows (0, 1).
    assert hf_to_meta_rotary(b, 4)[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_hf_round_trip(reference, tmp_path):
    state, expected = reference
    save_hf(tmp_path, state, CONFIG)
    assert detect_format(tmp_path) == "hf"
    config, loaded = load_hf_state_dict(tmp_path)
    assert same_model(config, CONFIG)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(logits_of(build_model(config, loaded, tmp_path)), expected)


def test_hf_sharded_and_dtype(reference, tmp_path):
    """A sharded directory (index json) loads to the same tensors, cast to the requested dtype."""
    state, _ = reference
    save_hf(tmp_path, state, CONFIG)
    full = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(full)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: full[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    config, loaded = load_hf_state_dict(tmp_path, dtype=torch.bfloat16)
    assert all(loaded[k].dtype == torch.bfloat16 and torch.equal(loaded[k], state[k].bfloat16()) for k in state)


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_round_trip(reference, tmp_path, n_shards):
    state, expected = reference
    save_meta(tmp_path, state, CONFIG, n_shards=n_shards)
    assert len(list(tmp_path.glob("consolidated.*.pth"))) == n_shards
    if n_shards == 2:  # really split: a column-parallel and a row-parallel tensor are halved
        shard = torch.load(tmp_path / "consolidated.01.pth", weights_only=True)
        assert shard["layers.0.attention.wk.weight"].shape == (16, 64)
        assert shard["tok_embeddings.weight"].shape == (300, 32)
    config, loaded = load_meta_state_dict(tmp_path, max_seq_len=CONFIG.max_seq_len)
    assert same_model(config, CONFIG)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert torch.equal(logits_of(build_model(config, loaded, tmp_path)), expected)


def test_gguf_round_trip(reference, tmp_path):
    state, expected = reference
    save_gguf(tmp_path / "tiny.gguf", state, CONFIG)
    assert detect_format(tmp_path / "tiny.gguf") == "gguf"
    model, _ = load_gguf(tmp_path / "tiny.gguf")
    assert torch.equal(logits_of(model), expected)


VARIANTS = {
    # Llama with GQA and Llama-3 RoPE scaling (parsed from rope_scaling)
    "llama3": dict(rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=64)),
    # Qwen2 style: q/k/v biases (permuted like the weights), tied embeddings
    "qwen2": dict(attn_bias=True, tie_embeddings=True, hidden_dim=96),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_matches_transformers(tmp_path, variant):
    config = LLMConfig(**{**CONFIG.to_dict(), **VARIANTS[variant]})
    state = random_state(config, seed=1)
    save_hf(tmp_path, state, config)
    ours = load_llm_model(tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == ("Qwen2ForCausalLM" if variant == "qwen2" else "LlamaForCausalLM")
    with torch.no_grad():
        expected = theirs(TOKENS).logits
    torch.testing.assert_close(logits_of(ours), expected, atol=1e-4, rtol=1e-4)
    # ... our inverse converter reproduces transformers' own state dict ...
    hf_state = to_hf_state_dict(dict(ours.state_dict()), config)
    for name, tensor in theirs.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue
        assert torch.equal(hf_state[name], tensor), name
    # ... and a directory written by transformers itself (its own config.json spelling) loads to the same model.
    theirs.save_pretrained(tmp_path / "saved")
    resaved = load_llm_model(tmp_path / "saved")
    assert same_model(resaved.config, config)
    assert torch.equal(logits_of(resaved), logits_of(ours))


def load_llm_model(path: Path) -> Transformer:
    config, state = load_hf_state_dict(path)
    return build_model(config, state, path)


def test_load_llm_meta_layout_with_tokenizer_one_level_up(tmp_path):
    """The ImageBind-LLM base fixture: llama_dir/base/{params.json, consolidated.00.pth} + llama_dir/tokenizer.model."""
    llm = load_llm(LLAMA_DIR / "base", dtype=torch.float32)
    assert llm.format == "meta"
    assert llm.config.vocab_size == 300  # params.json says -1: taken from the embedding
    assert (llm.tokenizer.bos_id, llm.tokenizer.vocab_size) == (1, 300)
    raw = torch.load(LLAMA_DIR / "base" / "consolidated.00.pth", weights_only=True)
    assert torch.equal(llm.model.layers[1].attention.wq.weight, raw["layers.1.attention.wq.weight"].float())
    with pytest.raises(WeightsFormatError, match=r"pass one of its model folders, e\.g\. .*base"):
        load_llm(LLAMA_DIR)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_mismatched_weights_name_the_tensor(reference, tmp_path):
    state, _ = reference
    save_hf(tmp_path / "hf", state, CONFIG)
    shutil.copy(LLAMA_DIR / "tokenizer.model", tmp_path / "hf" / "tokenizer.model")
    edit_json(tmp_path / "hf" / "config.json", intermediate_size=256)
    with pytest.raises(CheckpointMismatchError, match=r"\(model\.layers\.0\.mlp\.down_proj\.weight\): tensor "
                       r"'layers\.0\.feed_forward\.w2\.weight' has shape \[64, 192\] but the config expects \[64, 256\]"):
        load_llm(tmp_path / "hf")

    save_meta(tmp_path / "meta", state, CONFIG)
    edit_json(tmp_path / "meta" / "params.json", n_kv_heads=4)
    with pytest.raises(CheckpointMismatchError, match=r"'layers\.0\.attention\.wk\.weight' has shape \[32, 64\] "
                                                      r"but the config expects \[64, 64\]"):
        load_meta_state_dict(tmp_path / "meta")

    partial = {k: v for k, v in state.items() if k != "norm.weight"}
    save_file(to_hf_state_dict(partial, CONFIG), str(tmp_path / "hf" / "model.safetensors"))
    edit_json(tmp_path / "hf" / "config.json", intermediate_size=CONFIG.hidden_dim)
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \['norm\.weight'\]"):
        load_hf_state_dict(tmp_path / "hf")


def test_unknown_formats_and_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_llm(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsFormatError, match=r"found: config\.json, notes\.txt\); expected a \.gguf file"):
        load_llm(tmp_path)
    with pytest.raises(WeightsFormatError, match="not a GGUF file"):
        load_llm(tmp_path / "notes.txt")
    with pytest.raises(WeightsFormatError, match=r"pass its folder .*base$"):
        load_llm(LLAMA_DIR / "base" / "consolidated.00.pth")
    meta = tmp_path / "meta"
    meta.mkdir()
    shutil.copy(LLAMA_DIR / "base" / "params.json", meta / "params.json")
    (meta / "consolidated.00.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsFormatError, match=r"consolidated\.00\.pth is not a checkpoint"):
        load_meta_state_dict(meta)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"x": torch.zeros(1)}, str(hf / "model.safetensors"))
    shutil.copy(LLAMA_DIR / "tokenizer.model", hf / "tokenizer.model")
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(WeightsFormatError, match="model_type 'gpt2' is not supported"):
        load_llm(hf)


def test_missing_tokenizer(reference, tmp_path):
    state, _ = reference
    save_meta(tmp_path / "7B", state, CONFIG)
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_llm(tmp_path / "7B")
    save_hf(tmp_path / "hf", state, CONFIG)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model in .*hf; copy the model's"):
        load_llm(tmp_path / "hf")
    shutil.copy(LLAMA_DIR / "tokenizer.model", tmp_path / "tokenizer.model")
    assert load_llm(tmp_path / "7B").tokenizer.vocab_size == 300
