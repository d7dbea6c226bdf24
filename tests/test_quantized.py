"""Quantised projections and the compiled q4_1/q8 kernels against float64 products of the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imagebind_llm.llm import kernels
from imagebind_llm.llm.quantized import (
    KERNEL_MAX_ROWS,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    dequantize_reference,
)

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")


def random_weight(fmt: str, n: int = 80, k: int = 96, seed: int = 0, group: int = 32,
                  offsets: bool | None = None) -> QuantizedWeight:
    """Random blocks; ``offsets`` defaults to the format's usual (q4_1: yes, q8: no)."""
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half().float()  # float16 values, as in GGUF
    mins = (-torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    if fmt == "q4_1":
        return QuantizedWeight(fmt, torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g), scales, mins)
    values = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return QuantizedWeight(fmt, values, scales, mins if offsets else None)


# (format, values per scale, offsets): Q4_0/Q4_1/Q4_K; Q8_0/Q5_0; Q6_K; Q5_1/Q5_K
FORMATS = [("q4_1", 32, True), ("q8", 32, False), ("q8", 16, False), ("q8", 32, True)]


def test_reference_dequantisation_follows_ggml_nibble_order():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0], blocks[0, 15] = 0x3A, 0xF1  # element 0 = 0xA, element 16 = 0x3; element 15 = 0x1, element 31 = 0xF
    w = dequantize_reference("q4_1", blocks, torch.tensor([[0.5]]), torch.tensor([[-1.0]]))
    expected = torch.full((1, 32), -1.0)
    expected[0, 0], expected[0, 16], expected[0, 15], expected[0, 31] = 4.0, 0.5, -0.5, 6.5
    assert torch.equal(w, expected)
    q8 = torch.arange(-16, 16, dtype=torch.int8)[None]
    assert torch.equal(dequantize_reference("q8", q8, torch.tensor([[0.25]]), None), q8.float() * 0.25)
    halves = dequantize_reference("q8", q8, torch.tensor([[0.25, 2.0]]), None)  # one scale per 16 values
    assert torch.equal(halves, torch.cat([q8[:, :16].float() * 0.25, q8[:, 16:].float() * 2.0], 1))
    shifted = dequantize_reference("q8", q8, torch.tensor([[0.25]]), torch.tensor([[3.0]]))
    assert torch.equal(shifted, q8.float() * 0.25 + 3.0)


@needs_kernels
@pytest.mark.parametrize("fmt,group,offsets", FORMATS)
def test_kernel_dequantisation_is_bitwise_the_reference(fmt, group, offsets):
    w = random_weight(fmt, n=64, k=128, group=group, offsets=offsets)
    assert torch.equal(w.dequantize(), dequantize_reference(fmt, w.blocks, w.scales, w.offsets))


@needs_kernels
@pytest.mark.parametrize("fmt,group,offsets", FORMATS)
@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 16])  # 4+ rows share pre-scaled blocks, fewer scale dot products
def test_kernel_matmul_matches_float64_product(fmt, group, offsets, rows):
    w = random_weight(fmt, seed=rows, group=group, offsets=offsets)
    x = torch.randn(rows, w.in_features, generator=torch.Generator().manual_seed(1))
    expected = x.double() @ w.dequantize().double().T
    got = w.matmul(x)
    assert got.dtype == torch.float32 and got.shape == (rows, w.out_features)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_kernel_takes_batched_and_strided_inputs():
    w = random_weight("q4_1")
    x = torch.randn(5, 2, w.in_features).transpose(0, 1)  # [2, 5, K], not contiguous
    torch.testing.assert_close(w.matmul(x), F.linear(x, w.dequantize()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expected float32 CPU input"):
        kernels.matmul_function("q4_1", w.blocks, w.scales, w.offsets)(torch.randn(1, w.in_features + 32))


def test_large_inputs_gradients_and_other_dtypes_use_the_dequantised_weight():
    w = random_weight("q4_1")
    dense = w.dequantize()
    x = torch.randn(KERNEL_MAX_ROWS + 1, w.in_features)
    torch.testing.assert_close(w.matmul(x), F.linear(x, dense), rtol=1e-5, atol=1e-5)  # prefill: tiles + BLAS
    xg = torch.randn(2, w.in_features, requires_grad=True)
    w.matmul(xg).sum().backward()
    torch.testing.assert_close(xg.grad, dense.sum(0).expand(2, -1))
    xb = torch.randn(2, w.in_features, dtype=torch.bfloat16)
    assert torch.equal(w.matmul(xb), F.linear(xb, dense.bfloat16()))


def test_casting_the_module_keeps_scales_exact():
    w = random_weight("q4_1")
    layer = QuantizedLinear(w, bias=torch.randn(w.out_features)).to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.quantized.scales, random_weight("q4_1").scales)
    assert torch.equal(layer.quantized.offsets, random_weight("q4_1").offsets)


def test_linear_bias_to_linear_and_embedding_lookup():
    w = random_weight("q8")
    bias = torch.randn(w.out_features)
    layer = QuantizedLinear(w, bias=bias)
    x = torch.randn(3, w.in_features)
    torch.testing.assert_close(layer(x), F.linear(x, w.dequantize(), bias), rtol=1e-5, atol=1e-5)
    dense = layer.to_linear()
    assert isinstance(dense, torch.nn.Linear) and torch.equal(dense.weight, w.dequantize())
    ids = torch.tensor([[3, 0], [79, 3]])
    assert torch.equal(QuantizedEmbedding(w)(ids), F.embedding(ids, w.dequantize()))


def test_without_kernels_everything_falls_back_to_the_reference(monkeypatch):
    w = random_weight("q4_1")
    monkeypatch.setattr(kernels, "available", lambda: False)
    x = torch.randn(2, w.in_features)
    assert torch.equal(w.matmul(x), F.linear(x, dequantize_reference("q4_1", w.blocks, w.scales, w.offsets)))


def test_kernels_build_into_the_cache_folder_and_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEBIND_LLM_CACHE", str(tmp_path))
    kernels._load.cache_clear()
    try:
        monkeypatch.setenv("IMAGEBIND_LLM_KERNELS", "0")
        assert not kernels.available() and "IMAGEBIND_LLM_KERNELS=0" in kernels.unavailable_reason()
        kernels._load.cache_clear()
        monkeypatch.delenv("IMAGEBIND_LLM_KERNELS")
        if kernels.available():
            assert len(list((tmp_path / "kernels").glob("quant_matmul-*.so"))) == 1
    finally:
        kernels._load.cache_clear()


def test_a_failed_build_is_reported_once_and_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGEBIND_LLM_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    calls = []
    real_run = kernels.subprocess.run
    monkeypatch.setattr(kernels.subprocess, "run", lambda *a, **k: calls.append(a) or real_run(*a, **k))
    kernels._load.cache_clear()
    try:
        assert not kernels.available() and not kernels.available()
        assert "compiling quant_matmul.c with false failed" in kernels.unavailable_reason()
        assert len(calls) == 1
        w = random_weight("q8")
        x = torch.randn(2, w.in_features)
        assert torch.equal(w.matmul(x), F.linear(x, dequantize_reference("q8", w.blocks, w.scales, None)))
    finally:
        kernels._load.cache_clear()


def test_bad_blocks_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        QuantizedWeight("q4_1", torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="16"):  # 48 values: not whole 32-blocks
        QuantizedWeight("q8", torch.zeros(4, 48, dtype=torch.int8), torch.ones(4, 3))
    with pytest.raises(ValueError, match="need"):
        QuantizedWeight("q4_1", torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1))
    with pytest.raises(ValueError, match="unknown quantised format"):
        QuantizedWeight("q5_k", torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 1))
