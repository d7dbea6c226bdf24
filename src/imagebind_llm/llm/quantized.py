"""Frozen projections whose weights stay in GGUF's quantised blocks (the Q4, Q5, Q6_K and Q8_0 types).

A GGUF file's quantised tensors *are* the model's weights; expanding them to float32 only makes every
decode step read 7x (Q4) or 4x (Q8) more memory. `QuantizedLinear` keeps the blocks and computes
``x @ W^T`` with the compiled kernels of `imagebind_llm.llm.kernels` when the input is a small batch of
float32 rows on the CPU (decoding); larger inputs (prompt prefill), other dtypes/devices and inputs
that need gradients multiply by the dequantised weight instead. Either way the weight is exactly
``d * q + m`` of each group of values, the values llama.cpp and the `gguf` package define.

Two formats cover eight GGUF types (the loader converts them exactly): ``"q4_1"``, 4-bit values with
a scale and an offset per 32 (Q4_1; Q4_0 and Q4_K too), and ``"q8"``, int8 values with a scale per 32
(Q8_0; Q5_0, and with offsets Q5_1 and Q5_K) or per 16 (Q6_K, whose 6-bit values minus 32 fit int8).
Scales are stored as the raw bits of float32 (an int32 buffer), so casting the model to another dtype
never rounds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

BLOCK = kernels.BLOCK
FORMATS = ("q4_1", "q8")
# Above this many input rows, one dequantisation plus a BLAS matmul beats the blockwise kernel
# (on a 2-core AVX2 machine the kernel wins up to ~50 rows and loses 1.7x at 400).
KERNEL_MAX_ROWS = 64


def _bits(x: Tensor) -> Tensor:
    return x.to(torch.float32).contiguous().view(torch.int32)


def dequantize_reference(fmt: str, blocks: Tensor, scales: Tensor, offsets: Tensor | None) -> Tensor:
    """Portable (any device) float32 weight ``[N, K]``, rounding as the `gguf` package does."""
    n, groups = scales.shape
    if fmt == "q4_1":
        packed = blocks.view(n, groups, BLOCK // 2)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # elements 0-15 low, 16-31 high nibbles
        return (q * scales[..., None] + offsets[..., None]).view(n, -1)
    w = blocks.view(n, groups, -1).float() * scales[..., None]
    return (w if offsets is None else w + offsets[..., None]).view(n, -1)


class QuantizedWeight(nn.Module):
    """A ``[out_features, in_features]`` weight held as quantised groups, shared by the modules below.

    Args:
        fmt: ``"q4_1"`` (``blocks`` uint8 ``[N, K/2]``, two 4-bit values per byte: byte ``j`` of a
            32-block holds element ``j`` low and ``j + 16`` high) or ``"q8"`` (``blocks`` int8 ``[N, K]``).
        scales: group scales ``d``, ``[N, K/32]`` (``"q8"`` also ``[N, K/16]``).
        offsets: ``[N, K/32]`` block offsets ``m`` (``"q4_1"``: required; ``"q8"``: optional).
    """

    def __init__(self, fmt: str, blocks: Tensor, scales: Tensor, offsets: Tensor | None = None) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantised format {fmt!r}; expected one of {FORMATS}")
        if fmt == "q4_1" and offsets is None:
            raise ValueError("q4_1 weights need offsets")
        n, groups = scales.shape
        k = blocks.shape[-1] * (2 if fmt == "q4_1" else 1)
        dtype = torch.uint8 if fmt == "q4_1" else torch.int8
        group_sizes = (32,) if fmt == "q4_1" or offsets is not None else (32, 16)
        if (blocks.dim() != 2 or blocks.shape[0] != n or blocks.dtype != dtype or k % BLOCK
                or k not in [groups * g for g in group_sizes]):
            raise ValueError(f"{fmt} blocks must be {dtype} [{n}, K] with K / {' or '.join(map(str, group_sizes))} "
                             f"= {groups} scales per row; got {blocks.dtype} {list(blocks.shape)}")
        if offsets is not None and offsets.shape != scales.shape:
            raise ValueError(f"offsets {list(offsets.shape)} must match scales {list(scales.shape)}")
        self.fmt = fmt
        self.out_features, self.in_features = n, k
        self.register_buffer("blocks", blocks.contiguous())
        self.register_buffer("scale_bits", _bits(scales))
        self.register_buffer("offset_bits", None if offsets is None else _bits(offsets))
        self._kernel_key: tuple | None = None  # the buffers `_kernel_call` was made for
        self._kernel_call = None

    @property
    def scales(self) -> Tensor:
        return self.scale_bits.view(torch.float32)

    @property
    def offsets(self) -> Tensor | None:
        return None if self.offset_bits is None else self.offset_bits.view(torch.float32)

    def dequantize(self) -> Tensor:
        """The float32 weight ``[out_features, in_features]``."""
        if self.blocks.device.type == "cpu" and kernels.available():
            return kernels.dequantize(self.fmt, self.blocks, self.scales, self.offsets)
        return dequantize_reference(self.fmt, self.blocks, self.scales, self.offsets)

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ W^T`` for ``x`` ``[..., in_features]``; returns ``[..., out_features]`` in ``x.dtype``."""
        if (x.is_cpu and x.dtype == torch.float32 and x.numel() <= KERNEL_MAX_ROWS * self.in_features
                and not (x.requires_grad and torch.is_grad_enabled()) and kernels.available()):
            return self._kernel_matmul(x)
        return F.linear(x, self.dequantize().to(device=x.device, dtype=x.dtype))

    def _kernel_matmul(self, x: Tensor) -> Tensor:
        # Decoding calls this ~200 times per token: the argument tuple is cached (keyed on the buffers'
        # identities, which change when the module is moved or reloaded) to keep the Python cost low.
        buffers = self._buffers  # (plain dict access: nn.Module attribute lookup costs microseconds)
        key = (buffers["blocks"], buffers["scale_bits"], buffers["offset_bits"])
        old = self._kernel_key
        if old is None or old[0] is not key[0] or old[1] is not key[1] or old[2] is not key[2]:
            weights = [self.blocks, self.scales] + ([] if self.offsets is None else [self.offsets])
            self._kernel_call = kernels.matmul_function(self.fmt, *weights)
            self._kernel_key = key
        return self._kernel_call(x)

    def rows(self, index: Tensor) -> Tensor:
        """Float32 weight rows ``[..., in_features]`` for integer ``index`` ``[...]`` (an embedding lookup)."""
        offsets = None if self.offsets is None else self.offsets[index.flatten()]
        rows = dequantize_reference(self.fmt, self.blocks[index.flatten()], self.scales[index.flatten()], offsets)
        return rows.view(*index.shape, self.in_features)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` replacement over a `QuantizedWeight` (plus an optional float bias)."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.quantized = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.quantized.matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the dequantised float32 weight (for training or other devices)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.quantized.dequantize(), requires_grad=False)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.quantized.fmt}"


class QuantizedEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` replacement: looks up rows of a `QuantizedWeight` (float32 out).

    With tied embeddings it shares the `QuantizedWeight` of the LM head.
    """

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.quantized = weight
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    def forward(self, tokens: Tensor) -> Tensor:
        return self.quantized.rows(tokens)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.quantized.fmt}"
