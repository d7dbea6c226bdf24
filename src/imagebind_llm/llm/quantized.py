"""Frozen projections whose weights stay in GGUF's quantised blocks (the Q4, Q5, Q6_K and Q8_0 types).

A GGUF file's quantised tensors *are* the model's weights; expanding them to float32 only makes every
decode step read 7x (Q4) or 4x (Q8) more memory. `QuantizedLinear` keeps the blocks and computes
``x @ W^T`` with the compiled kernels of `imagebind_llm.llm.kernels` when the input is float32 on the
CPU: a small batch of rows (decoding) by the blockwise kernels; more rows (prompt prefill) by
dequantising a tile of weight rows at a time into one reused buffer and multiplying it with BLAS, so
no float32 copy of the whole weight is made. Other dtypes/devices and inputs that need gradients
multiply by the dequantised weight. Either way the weight is exactly ``d * q + m`` of each group of
values, the values llama.cpp and the `gguf` package define. `ProjectionGroup` computes projections
that share their input (a layer's q/k/v, or its gate/up) in one kernel call.

Two formats cover eight GGUF types (the loader converts them exactly): ``"q4_1"``, 4-bit values with
a scale and an offset per 32 (Q4_1; Q4_0 and Q4_K too), and ``"q8"``, int8 values with a scale per 32
(Q8_0; Q5_0, and with offsets Q5_1 and Q5_K) or per 16 (Q6_K, whose 6-bit values minus 32 fit int8).
Scales are stored as the raw bits of float32 (an int32 buffer), so casting the model to another dtype
never rounds them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

BLOCK = kernels.BLOCK
FORMATS = ("q4_1", "q8")
# Up to this many input rows the blockwise kernels beat dequantised tiles multiplied by BLAS (2-core
# AVX-512 machine, float32 activations: 1.6-2x faster at 16 rows, 1.4-1.6x slower at 64).
KERNEL_MAX_ROWS = 32
# Float32 weight rows dequantised at a time for BLAS: enough rows for its full speed (1024 of a
# 4096-wide weight), and under glibc's 32 MB mmap threshold, so the buffer's pages are reused by the
# next call instead of faulted in again.
TILE_BYTES = 16 << 20


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
        if x.is_cpu and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled()) \
                and kernels.available():
            if x.numel() <= KERNEL_MAX_ROWS * self.in_features:
                return self.kernel()(x)
            return self._tiled_matmul(x)
        return F.linear(x, self.dequantize().to(device=x.device, dtype=x.dtype))

    def kernel(self):
        """The compiled ``x [..., in_features] -> x @ W^T`` of `kernels.matmul_function` for these buffers."""
        # Decoding calls this ~100 times per token: the function is cached (keyed on the buffers'
        # identities, which change when the module is moved or reloaded) to keep the Python cost low.
        buffers = self._buffers  # (plain dict access: nn.Module attribute lookup costs microseconds)
        key = (buffers["blocks"], buffers["scale_bits"], buffers["offset_bits"])
        old = self._kernel_key
        if old is None or old[0] is not key[0] or old[1] is not key[1] or old[2] is not key[2]:
            self._kernel_call = kernels.matmul_function(*self.kernel_args())
            self._kernel_key = key
        return self._kernel_call

    def kernel_args(self) -> tuple[str, Tensor, Tensor, Tensor | None]:
        """``(fmt, blocks, scales, offsets)``, the weight as the `kernels` functions take it."""
        return self.fmt, self.blocks, self.scales, self.offsets

    def _tiled_matmul(self, x: Tensor) -> Tensor:
        """``x @ W^T`` for many rows ``x`` ``[..., K]``: ``W`` dequantised a tile of rows at a time into one
        buffer, each tile multiplied by BLAS straight into its columns of the output ``[..., N]``."""
        K, N = self.in_features, self.out_features
        rows = x.reshape(-1, K)
        y = torch.empty(rows.shape[0], N)
        step = max(16, TILE_BYTES // (4 * K))
        tile = torch.empty(min(step, N), K)
        args = self.kernel_args()
        for start in range(0, N, step):
            stop = min(start + step, N)
            # One thread: as fast here (BLAS dominates), and BLAS's OpenMP threads, spinning between its
            # calls, would otherwise take turns on the cores with the kernels' own.
            w = kernels.dequantize(*args, start=start, stop=stop, out=tile[:stop - start], num_threads=1)
            torch.mm(rows, w.T, out=y[:, start:stop])
        return y.view(*x.shape[:-1], N)

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


class ProjectionGroup:
    """Computes projections that share their input (a layer's ``wq``/``wk``/``wv``, or ``w1``/``w3``) in one
    kernel call: one parallel region instead of one per projection, with the input's norm inside it.

    ``group(modules, x, norm)`` returns ``[m(norm(x)) for m in modules]`` (``norm`` None: ``x`` itself); a
    group made with ``gated=True`` returns ``[silu(m0(...)) * m1(...)]``, a SwiGLU's gate and up. When
    every module is a plain `QuantizedLinear` (not wrapped, e.g. by LoRA), ``x`` a decode-sized float32 CPU
    input that needs no gradient and ``norm`` None or an RMS norm with ``kernel_args() -> (weight, eps)``,
    one fused call computes it all (the same values, up to the float rounding of the norm's mean and of
    silu's exp). The group holds no weights, only the fused function for the modules' current buffers
    (rebuilt when they change).
    """

    def __init__(self, gated: bool = False) -> None:
        self.gated = gated
        self._key: tuple = ()  # ids of the modules, their buffers and biases the function was made for
        self._held: list = []  # those objects, kept alive so that their ids stay theirs
        self._biases: list[Tensor | None] = []
        self._call = None

    def __call__(self, modules: Sequence[nn.Module], x: Tensor, norm: nn.Module | None = None) -> list[Tensor]:
        if x.is_cpu and x.dtype == torch.float32 and x.numel() <= KERNEL_MAX_ROWS * x.shape[-1] \
                and not (torch.is_grad_enabled() and (x.requires_grad or getattr(norm, "weight", x).requires_grad)):
            call = self._fused(modules)
            norm_args = norm.kernel_args() if hasattr(norm, "kernel_args") else None
            if call is not None and (norm is None or norm_args is not None):
                ys = call(x, norm_args)
                return ys if self.gated else [y if b is None else y + b for y, b in zip(ys, self._biases)]
        h = x if norm is None else norm(x)
        ys = [m(h) for m in modules]
        return [F.silu(ys[0]) * ys[1]] if self.gated else ys

    def _fused(self, modules: Sequence[nn.Module]):
        """The fused function for these modules, or None when they cannot be fused."""
        if not all(type(m) is QuantizedLinear for m in modules) or not kernels.available():
            return None
        held = []
        for m in modules:  # (plain dict access: see QuantizedWeight.kernel)
            buffers = m._modules["quantized"]._buffers
            held += (m, buffers["blocks"], buffers["scale_bits"], buffers["offset_bits"], m._parameters.get("bias"))
        key = tuple(map(id, held))
        if key != self._key:
            biases = held[4::5]
            if len(modules) > kernels.MAX_FUSED or (self.gated and (
                    len(modules) != 2 or modules[0].out_features != modules[1].out_features
                    or any(b is not None for b in biases))):  # (the gate applies before any bias)
                return None
            self._call = kernels.fused_matmul_function([m.quantized.kernel_args() for m in modules], gated=self.gated)
            self._key, self._held, self._biases = key, held, biases
        return self._call

    def __getstate__(self) -> dict:  # copies rebuild the function for their own modules
        return {"gated": self.gated, "_key": (), "_held": [], "_biases": [], "_call": None}


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
