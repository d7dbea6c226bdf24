"""Quantise on load: llama.cpp's Q8_0 / Q4_1 / Q4_K blocks, bit for bit, from Meta, Hugging Face and float GGUF
weights, read a chunk of rows at a time; ``quantize`` through `create_model`, `ModelSpec` and ``--quantize``."""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from imagebind_llm.cli import build_parser, main
from imagebind_llm.engine.cli import model_spec
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.quantized import QuantizedEmbedding
from imagebind_llm.llm.weights import QUANT_TYPES, load_llm
from imagebind_llm.llm.weights import quantize as quantize_module
from imagebind_llm.llm.weights.common import SourceTensor
from imagebind_llm.llm.weights.export import export_gguf
from imagebind_llm.llm.weights.hf import save_hf
from imagebind_llm.llm.weights.meta import save_meta
from imagebind_llm.llm.weights.quantize import block_type, quantize, weight_from_blocks
from imagebind_llm.model.config import ModelSpec
from imagebind_llm.model.factory import create_model

Q = gguf.GGMLQuantizationType
GGUF_NAMES = {"q8": "Q8_0", "q4_1": "Q4_1", "q4_k": "Q4_K"}
FIXTURES = Path(__file__).parent / "fixtures" / "adapter"
TOKENIZER = FIXTURES / "llama" / "tokenizer.model"  # SentencePiece, 300 pieces
# Every row a whole number of Q4_K super-blocks (256); w2's rows are 768 long.
CONFIG = LLMConfig(vocab_size=300, dim=256, n_layers=1, n_heads=4, n_kv_heads=2, multiple_of=256, norm_eps=1e-6,
                   max_seq_len=64)
TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 8, 200, 299]])


def hard_rows(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows whose first blocks are the cases quantisers get wrong: zeros, constants, exact ties, all one
    sign, huge, tiny and subnormal magnitudes (scales that overflow or underflow float16), one outlier."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, k)).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = 3.0
    x[2, :32] = -2.5
    x[3, :32] = np.linspace(-127, 127, 32).round() + 0.5 * np.sign(rng.normal(size=32))  # k + 1/2
    x[4, :64] = np.abs(x[4, :64]) + 1
    x[5, :32] *= 1e4
    x[6, :32] *= 1e-20
    x[7, :32] = np.round(x[7, :32] * 4) / 4
    x[8, 5] = 300.0
    x[9, :32] = rng.integers(-8, 8, 32)
    x[10] = rng.standard_t(2, k)
    x[11, ::2] = 0
    x[12] = -np.abs(x[12])
    x[13, :32] *= 1e-6  # a Q4_K sub-block whose 6-bit scale rounds to 0
    x[14, :32] *= 1e30
    x[15, 32:64] = 1e-40
    return x


def test_round_half_away_from_zero_as_roundf():
    """Q8_0 blocks whose amax is 127 have d = 1: the values are rounded themselves, ties away from zero."""
    below_half = np.nextafter(np.float32(0.5), np.float32(0))
    values = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, below_half, -below_half, 2.4999998, 0.0,
                       -0.0, 3.5000002, 100.5, -99.5], np.float32)
    x = np.concatenate([values, [127.0], np.zeros(15, np.float32)])[None].astype(np.float32)
    q = quantize(torch.from_numpy(x), "q8").numpy()[0, 2:].view(np.int8)
    assert q[:16].tolist() == [1, -1, 2, -2, 3, -3, 127, -127, 0, 0, 2, 0, 0, 4, 101, -100]
    assert np.array_equal(q, gguf.quants.quantize(x, Q.Q8_0)[0, 2:].view(np.int8))


@pytest.mark.parametrize("qtype", ["q8", "q4_1"])
def test_bytes_equal_the_gguf_package(qtype):
    x = hard_rows(16, 512)
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(x, Q[GGUF_NAMES[qtype]]).reshape(16, -1)
    assert np.array_equal(quantize(torch.from_numpy(x), qtype).numpy(), expected)


def _llama_cpp_quantizer(qtype: str):
    """llama.cpp's own ``quantize_row_*_ref`` from llama-cpp-python's libggml-base (an optional install)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None:
        pytest.skip("llama-cpp-python is not installed")
    lib = ctypes.CDLL(str(Path(spec.submodule_search_locations[0]) / "lib" / "libggml-base.so"))
    fn = getattr(lib, {"q8": "quantize_row_q8_0_ref", "q4_1": "quantize_row_q4_1_ref",
                       "q4_k": "quantize_row_q4_K_ref"}[qtype])
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def run(x: np.ndarray) -> np.ndarray:
        values, size = gguf.GGML_QUANT_SIZES[Q[GGUF_NAMES[qtype]]]
        out = np.zeros((x.shape[0], x.shape[1] // values * size), np.uint8)
        fn(np.ascontiguousarray(x).ctypes.data, out.ctypes.data, x.size)
        return out
    return run


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_bytes_equal_llama_cpp(qtype):
    reference = _llama_cpp_quantizer(qtype)
    rng = np.random.default_rng(2)
    x = np.concatenate([hard_rows(16, 4096, seed=1), rng.normal(0, 0.02, (48, 4096)),
                        rng.standard_t(3, (32, 4096)) * 0.05, rng.uniform(-1, 3, (32, 4096))]).astype(np.float32)
    x[-16:, ::5] = 0
    assert np.array_equal(quantize(torch.from_numpy(x), qtype).numpy(), reference(x))


def test_square_root_is_correctly_rounded():
    """Q4_K's weights use C's sqrtf; torch's float32 sqrt (MKL) is an ulp off for ~1 value in 150."""
    x = np.concatenate([np.random.default_rng(0).uniform(0, 1, 100_000),
                        10.0 ** np.random.default_rng(1).uniform(-44, 38, 100_000), [0, 1e-45, 3.4e38, 4]])
    x = x.astype(np.float32)
    assert np.array_equal(quantize_module._sqrtf(torch.from_numpy(x)).numpy(), np.sqrt(x))


def test_q4_k_blocks_decode_to_our_weight_and_beat_q4_1():
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    raw = quantize(x, "q4_k")
    ours = weight_from_blocks("Q4_K", raw.numpy(), 64).dequantize()
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw.numpy(), Q.Q4_K)))
    q4_1 = weight_from_blocks("Q4_1", quantize(x, "q4_1").numpy(), 64).dequantize()
    error_k, error_1 = ((ours - x).norm() / x.norm()).item(), ((q4_1 - x).norm() / x.norm()).item()
    assert error_k < 0.93 * error_1  # 4.5 bits per weight against 5 (measured: 0.0712 vs 0.0779)


def test_block_types():
    assert block_type("layers.0.attention.wq.weight", (256, 256), "q4_k") == "q4_k"
    assert block_type("layers.0.attention.wq.weight", (64, 64), "q4_k") == "q4_1"  # not whole super-blocks
    assert block_type("tok_embeddings.weight", (300, 64), "q8") == "q8"
    assert block_type("output.weight", (300, 48), "q8") is None  # not whole blocks
    assert block_type("layers.0.attention_norm.weight", (256,), "q8") is None
    assert block_type("layers.0.attention.wq.bias", (256,), "q8") is None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random float16 model as Meta (1 and 2 shards), Hugging Face and F16 GGUF, with the fixture's tokenizer."""
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p) * 0.05)
    state = {k: v.half() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("quantize")
    dirs = {"meta": root / "meta", "meta2": root / "meta2", "hf": root / "hf"}
    save_meta(dirs["meta"], state, CONFIG)
    save_meta(dirs["meta2"], state, CONFIG, n_shards=2)
    save_hf(dirs["hf"], state, CONFIG)
    for folder in dirs.values():
        (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    dirs["gguf"] = export_gguf(dirs["meta"], root / "model-f16.gguf", gguf_type="f16")
    return dirs


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_every_format_gives_the_same_blocks_as_quantising_the_float_weights(checkpoints, qtype, monkeypatch,
                                                                            quantised_weights, same_weights):
    monkeypatch.setitem(quantize_module._CHUNK_WEIGHTS, qtype, 30_000)  # several chunks per tensor, HF q/k by heads
    models = {fmt: load_llm(path, quantize=qtype).model for fmt, path in checkpoints.items()}
    reference = quantised_weights(models["meta"])
    assert len(reference) == 7 * CONFIG.n_layers + 2 and isinstance(models["meta"].tok_embeddings, QuantizedEmbedding)
    dense = load_llm(checkpoints["meta"]).model
    for name, weight in reference.items():
        blocks = quantize(dense.get_submodule(name).weight, qtype).numpy()
        assert same_weights(weight, weight_from_blocks(GGUF_NAMES[qtype], blocks, len(blocks))), name
    assert models["meta"].norm.weight.dtype == torch.float32
    for fmt, model in models.items():
        modules = quantised_weights(model)
        assert modules.keys() == reference.keys(), fmt
        assert all(same_weights(weight, reference[name]) for name, weight in modules.items()), fmt
    with torch.no_grad():
        logits = {fmt: model(TOKENS) for fmt, model in models.items()}
        for name, weight in reference.items():  # the float model with the quantised values computes the same
            dense.get_submodule(name).weight.copy_(weight.dequantize())
        expected = dense(TOKENS)
    for fmt in logits:
        torch.testing.assert_close(logits[fmt], expected, rtol=1e-4, atol=1e-4, msg=fmt)


def test_quantised_tensors_are_read_in_chunks_never_whole(checkpoints, monkeypatch):
    """Only the small tensors are ever loaded whole; the others go through the quantiser a few rows at a time."""
    loaded, chunks = [], []
    load = SourceTensor.load
    encode = quantize_module._encode
    monkeypatch.setattr(SourceTensor, "load", lambda self, *a, **k: loaded.append(self.key) or load(self, *a, **k))
    monkeypatch.setattr(quantize_module, "_encode", lambda x, q: chunks.append(x.numel()) or encode(x, q))
    monkeypatch.setitem(quantize_module._CHUNK_WEIGHTS, "q8", 4096)
    threads = torch.get_num_threads()
    load_llm(checkpoints["meta2"], quantize="q8")
    assert loaded and all("norm" in key for key in loaded)
    assert max(chunks) <= 4096 and len(chunks) > 9
    assert torch.get_num_threads() == threads  # the workers' single-threaded torch is not left behind


def test_fallback_for_rows_that_are_not_super_blocks(quantised_weights, same_weights):
    """The fixture base (dim 64): Q4_K falls back to Q4_1 blocks, the same as asking for Q4_1."""
    base = FIXTURES / "llama" / "base"
    q4_k, q4_1 = (quantised_weights(load_llm(base, quantize=q).model) for q in ("q4_k", "q4_1"))
    assert q4_k.keys() == q4_1.keys() and len(q4_k) == 16
    assert all(same_weights(q4_k[n], q4_1[n]) and q4_k[n].fmt == "q4_1" for n in q4_k)


def test_a_quantised_gguf_keeps_its_own_types(checkpoints, tmp_path, quantised_weights, same_weights):
    path = export_gguf(checkpoints["meta"], tmp_path / "q4_1.gguf", gguf_type="q4_1")
    kept = quantised_weights(load_llm(path, quantize="q8").model)
    assert {w.fmt for w in kept.values()} == {"q4_1"}
    plain = quantised_weights(load_llm(path, quantized=True).model)
    assert kept.keys() == plain.keys() and all(same_weights(kept[n], plain[n]) for n in kept)
    with pytest.raises(ValueError, match="cannot be combined with quantized=False"):
        load_llm(path, quantize="q8", quantized=False)


def test_bad_quantize_requests(checkpoints):
    with pytest.raises(ValueError, match=r"quantize must be one of \('q8', 'q4_1', 'q4_k'\)"):
        load_llm(checkpoints["meta"], quantize="q3")
    with pytest.raises(ValueError, match="needs float32 weights on the CPU.*not bfloat16 on cpu"):
        load_llm(checkpoints["meta"], quantize="q8", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not float32 on cuda"):
        load_llm(checkpoints["meta"], quantize="q8", device="cuda")
    with pytest.raises(ValueError, match="needs float32 weights on the CPU"):
        ModelSpec(llm=checkpoints["meta"], quantize="q4_1", dtype="float16")


def test_the_log_reports_each_tensors_error(checkpoints, caplog):
    with caplog.at_level(logging.DEBUG, logger="imagebind_llm.llm.weights.quantize"):
        load_llm(checkpoints["hf"], quantize="q4_1")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("relative RMS error" in line and "q4_1" in line for line in lines) == 9
    summary = next(line for line in lines if "quantised 9 tensors" in line)
    assert "ns/weight" in summary and "relative RMS error mean" in summary


def test_create_model_and_the_command_line_pass_quantize_through():
    """The released adapter on the fixture base: quantised base, float adapter (LoRA included)."""
    spec = ModelSpec(llm=FIXTURES / "llama" / "base", adapter=FIXTURES / "adapter_finetune.pth", with_encoder=False)
    float_model, q8_model = create_model(spec), create_model(spec, quantize="q8")
    assert isinstance(q8_model.llm.tok_embeddings, QuantizedEmbedding)
    assert q8_model.llm.layers[0].attention.wq.quantized is not None  # LoRA over the quantised blocks
    assert all(p.dtype == torch.float32 for p in q8_model.adapter_params("all").values())
    tokens = torch.tensor([[1, 17, 250, 3, 99, 42]])
    with torch.no_grad():
        expected, got = float_model(tokens), q8_model(tokens)
    assert ((got - expected).norm() / expected.norm()).item() < 0.1
    args = build_parser().parse_args(["chat", "hi", "--model", "m", "--quantize", "q4_k"])
    assert model_spec(args).quantize == "q4_k"


def test_command_line_errors(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chat", "hi", "--quantize", "q3"])
    assert "invalid choice: 'q3'" in capsys.readouterr().err
    assert main(["chat", "hi", "--model", str(FIXTURES / "llama" / "base"), "--quantize", "q8",
                 "--dtype", "bfloat16"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("imagebind-llm chat: error: quantize='q8' needs float32") and "\n" not in err
