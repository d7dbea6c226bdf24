"""llama.cpp's block quantisation, both ways: float rows into Q8_0 / Q4_1 / Q4_K blocks, and GGUF blocks into
`QuantizedWeight` modules.

Encoding (``quantize``) is bit-exact with llama.cpp's reference quantisers (``quantize_row_q8_0_ref``,
``quantize_row_q4_1_ref``, ``quantize_row_q4_K_ref`` in ggml-quants.c, and the `gguf` package's numpy ports
of the first two), vectorised in torch over many blocks at once:

* Q8_0: per 32 values ``d = amax / 127``, ``q = roundf(x * (1 / d))`` (half away from zero), ``d`` stored as
  float16 (``q`` is computed with the unrounded ``d``, as llama.cpp does);
* Q4_1: per 32 values ``d = (max - min) / 15``, ``q = min(15, (int)((x - min) * (1 / d) + 0.5))``, ``d`` and
  ``min`` stored as float16;
* Q4_K: super-blocks of 256 values, 8 sub-blocks of 32 whose scale and minimum come from llama.cpp's
  ``make_qkx2_quants`` search (21 candidate scales, a weighted least-squares fit each, the best kept),
  themselves quantised to 6 bits against a float16 ``d`` / ``dmin`` per super-block. llama.cpp's sums are
  sequential float32 loops; they are reproduced in the same order (`_sequential_sum`), which is what makes the
  result bit-exact and also what makes Q4_K ~20x slower to produce than Q4_1.

Decoding (``weight_from_blocks``) turns the bytes of eight GGUF types into the two layouts the kernels
multiply, keeping exactly the values the `gguf` package decodes (see `imagebind_llm.llm.quantized`).

The loaders use both to quantise Meta / Hugging Face / float GGUF weights while reading them
(`quantized_weight`): each tensor is read in row chunks, so peak memory stays near the quantised size.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import gguf
import numpy as np
import torch
from torch import Tensor

from ..quantized import QuantizedWeight
from .common import SourceTensor

log = logging.getLogger(__name__)

T = TypeVar("T")
Q = gguf.GGMLQuantizationType
QUANT_TYPES = ("q8", "q4_1", "q4_k")  # the values of load_llm's / ModelSpec's ``quantize``
GGUF_TYPES = {"q8": Q.Q8_0, "q4_1": Q.Q4_1, "q4_k": Q.Q4_K}
BLOCK_SIZES = {qtype: gguf.GGML_QUANT_SIZES[t] for qtype, t in GGUF_TYPES.items()}  # (values, bytes) per block
# Weights quantised per chunk of rows (one chunk per worker thread at a time): big enough to amortise torch's
# per-call cost, which holds the GIL (Q4_K makes ~1000 calls per chunk), small enough for the caches.
_CHUNK_WEIGHTS = {"q8": 1 << 18, "q4_1": 1 << 18, "q4_k": 1 << 19}


def check_quantize(quantize: str | None, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> None:
    """Raise ValueError unless `quantize` is None, or one of `QUANT_TYPES` for a float32 model on the CPU (what the
    quantised kernels compute with; other dtypes and devices would dequantise every weight at every call)."""
    if quantize is None:
        return
    if quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {QUANT_TYPES} (or None for float weights), got {quantize!r}")
    if dtype != torch.float32 or torch.device(device).type != "cpu":
        raise ValueError(f"quantize={quantize!r} needs float32 weights on the CPU (the quantised kernels' inputs), "
                         f"not {str(dtype).removeprefix('torch.')} on {device}: use dtype float32 and device cpu, "
                         "or no quantize")


def quantizable(key: str) -> bool:
    """Whether our state-dict key `key` is a weight the loaders keep in blocks: the token embedding, the LM head
    and the projections (never norms, biases or anything outside the decoder)."""
    return key == "tok_embeddings.weight" or (key.endswith(".weight") and "norm" not in key)


def block_type(key: str, shape: tuple[int, ...], qtype: str) -> str | None:
    """The `QUANT_TYPES` entry `key` (our name, ``shape`` in our layout) gets when a model is quantised with
    `qtype`; None: it stays float.

    Rows that are not whole blocks stay float; Q4_K falls back to Q4_1 (the same layout for the kernels) for rows
    that are not whole 256-value super-blocks, as llama.cpp's quantiser falls back to another type.
    """
    if not quantizable(key) or len(shape) != 2 or shape[1] % BLOCK_SIZES["q4_1"][0]:
        return None
    if qtype == "q4_k" and shape[1] % BLOCK_SIZES["q4_k"][0]:
        return "q4_1"
    return qtype


# ---------------------------------------------------------------------------------------------- encoding

_HALF_BELOW = torch.tensor(0.49999997)  # the float32 below 0.5: trunc(v + copysign(it, v)) is C's roundf(v)


def _f16_bytes(v: Tensor) -> Tensor:
    """``[..., G]`` float16 -> ``[..., G, 2]`` bytes."""
    return v.unsqueeze(-1).view(torch.uint8)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, 0.0, 1 / d)


def _q8_0(x: Tensor) -> tuple[Tensor, Tensor]:
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(-1) / 127
    v = blocks * _inverse(d)[..., None]
    q = (v + torch.copysign(_HALF_BELOW, v)).to(torch.int8)  # float -> int truncates
    d16 = d.to(torch.float16)
    return torch.cat([_f16_bytes(d16), q.view(torch.uint8)], -1), q * d16.float()[..., None]


def _q4_1(x: Tensor) -> tuple[Tensor, Tensor]:
    blocks = x.reshape(x.shape[0], -1, 32)
    low, high = torch.aminmax(blocks, dim=-1)
    d = (high - low) / 15
    q = ((blocks - low[..., None]) * _inverse(d)[..., None] + 0.5).to(torch.uint8).clamp_(max=15)
    d16, m16 = d.to(torch.float16), low.to(torch.float16)
    raw = torch.cat([_f16_bytes(d16), _f16_bytes(m16), q[..., :16] | (q[..., 16:] << 4)], -1)
    return raw, q * d16.float()[..., None] + m16.float()[..., None]


# make_qkx2_quants(32, 15, x, weights, L, &min, Laux, rmin=-1, rdelta=0.1, nstep=20, use_mad=false): the numerators
# `rmin + rdelta * is + nmax` of the candidate inverse scales, computed in float32 as C does.
_Q4_K_STEPS = (torch.tensor(-1.0) + torch.tensor(0.1) * torch.arange(21, dtype=torch.float32)) + 15.0


def _sequential_sum(v: Tensor) -> Tensor:
    """``((v[0] + v[1]) + v[2]) + ...`` over the first axis in float32, C's ``for (...) s += v[i]`` from ``s = 0``.

    `index_add_` adds the slices in index order, one vectorised add each (torch's `sum` and `cumsum` reorder or
    accumulate in double).
    """
    out = torch.zeros(1, *v.shape[1:], dtype=v.dtype)
    return out.index_add_(0, torch.zeros(v.shape[0], dtype=torch.long), v)[0]


def _nearest_int(v: Tensor) -> Tensor:
    """llama.cpp's ``nearest_int``, in place and as float32: round half to even; infinities and NaNs to 0, what its
    bit trick makes of them once clamped or stored in a uint8 (release builds). Beyond its asserted
    ``|v| <= 4194303`` it wraps where this rounds, which takes blocks unlike any weights (a sub-block's offset
    millions of times the super-block's largest spread)."""
    return v.nan_to_num_(0.0, 0.0, 0.0).round_()


def _sqrtf(x: Tensor) -> Tensor:
    """C's ``sqrtf``: the correctly rounded float32 square root (torch's may be an ulp off: MKL's VML computes it).

    A candidate within an ulp moves to its neighbour when ``x`` lies beyond the midpoint between them, whose square
    a float64 holds exactly (and never equals a float32: no ties).
    """
    root = x.double().sqrt().float()
    for toward in (torch.inf, 0.0):
        neighbour = torch.nextafter(root, torch.tensor(toward))
        square = ((root.double() + neighbour.double()) / 2) ** 2
        beyond = x.double() >= square if toward == torch.inf else x.double() < square
        root = torch.where(beyond, neighbour, root)
    return root


def _q4_k_search(xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """llama.cpp's sub-block fit for the columns of ``xs`` ``[32, S]``: ``(scale [S], -min [S], L [32, S])``.

    Each sub-block's weights are ``sqrt(mean(x^2)) + |x|``. The 21 steps run in order because an accepted step
    moves ``min``, from which the next ones start; instead of copying levels at every step, the ``(iscale,
    min)`` that gave the kept levels are remembered and the levels recomputed once.
    """
    w = _sqrtf(_sequential_sum(xs * xs) / 32) + xs.abs()
    low0, high = torch.aminmax(xs, dim=0)
    low0 = torch.where(low0 > 0, 0.0, low0)
    sum_w, sum_x = _sequential_sum(torch.stack([w, w * xs], 1))
    levels, diff = torch.empty_like(xs), torch.empty_like(xs)
    products = torch.empty(xs.shape[0], 3, xs.shape[1])

    def quantize_levels(iscale: Tensor, low: Tensor) -> Tensor:  # clamp(nearest_int(iscale * (x - min)), 0, 15)
        torch.sub(xs, low, out=levels)
        return _nearest_int(levels.mul_(iscale)).clamp_(0, 15)

    def weighted_error(scale: Tensor, low: Tensor) -> Tensor:  # sum of w * (scale * L + min - x)^2
        torch.mul(levels, scale, out=diff)
        diff.add_(low).sub_(xs)
        return _sequential_sum(diff.mul_(diff).mul_(w))

    iscale = 15 / (high - low0)
    scale = 1 / iscale
    quantize_levels(iscale, low0)
    best = weighted_error(scale, low0)
    low, kept_iscale, kept_low = low0, iscale, low0
    for step in _Q4_K_STEPS:
        iscale = step / (high - low)
        quantize_levels(iscale, low)
        torch.mul(w, levels, out=products[:, 0])
        torch.mul(products[:, 0], levels, out=products[:, 1])
        torch.mul(products[:, 0], xs, out=products[:, 2])
        sum_l, sum_l2, sum_xl = _sequential_sum(products)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_min = torch.where(positive, 0.0, this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        error = weighted_error(this_scale, this_min)
        take = (det > 0) & (error < best)
        best = torch.where(take, error, best)
        scale = torch.where(take, this_scale, scale)
        kept_iscale, kept_low = torch.where(take, iscale, kept_iscale), torch.where(take, low, kept_low)
        low = torch.where(take, this_min, low)
    flat = high == low0  # max == min: every level 0, scale 0, min unchanged
    levels = quantize_levels(kept_iscale, kept_low).masked_fill_(flat, 0)
    return torch.where(flat, 0.0, scale), -torch.where(flat, low0, low), levels


def _q4_k(x: Tensor) -> tuple[Tensor, Tensor]:
    n_super = x.numel() // 256
    xs = x.reshape(-1, 32).T.contiguous()  # [32, sub-blocks]: the sequential sums run over the first axis
    scales, mins, search_levels = _q4_k_search(xs)
    scales, mins = scales.view(n_super, 8), mins.view(n_super, 8)
    max_scale, max_min = scales.amax(1), mins.amax(1)
    max_scale, max_min = torch.where(max_scale > 0, max_scale, 0.0), torch.where(max_min > 0, max_min, 0.0)
    # 6-bit sub-block scales and mins; nearest_int's result is stored in a uint8, then capped at 63
    inv_scale, inv_min = (torch.where(m > 0, 63 / m, 0.0)[:, None] for m in (max_scale, max_min))
    ls = (_nearest_int(inv_scale * scales).to(torch.int32) & 0xFF).clamp_(max=63)
    lm = (_nearest_int(inv_min * mins).to(torch.int32) & 0xFF).clamp_(max=63)
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)  # round to nearest even
    d = d16.float()[:, None] * ls  # [n_super, 8], exactly as ggml (and the gguf package) decode them
    dm = dmin16.float()[:, None] * lm
    values = xs.view(32, n_super, 8)
    levels = _nearest_int((values + dm) / d).clamp_(0, 15)
    levels = torch.where(d == 0, search_levels.view(32, n_super, 8), levels)  # `if (!d) continue;`
    dequantized = (levels * d - dm).permute(1, 2, 0).reshape(x.shape)
    q = levels.to(torch.uint8).permute(1, 2, 0)  # [n_super, 8, 32]
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(n_super, 128)  # sub-block 2c low nibbles, 2c + 1 high
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    scale_bytes = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    raw = torch.cat([_f16_bytes(d16), _f16_bytes(dmin16), scale_bytes, packed], 1)
    return raw, dequantized


_ENCODERS = {"q8": _q8_0, "q4_1": _q4_1, "q4_k": _q4_k}


def _encode(x: Tensor, qtype: str) -> tuple[Tensor, Tensor]:
    """``(blocks uint8 [N, K / block * bytes], dequantised float32 [N, K])`` of float32 rows ``x`` ``[N, K]``."""
    raw, dequantized = _ENCODERS[qtype](x.to(torch.float32).contiguous())
    return raw.reshape(x.shape[0], -1), dequantized.reshape(x.shape)


def _in_parallel(fn: Callable[[int], T], items: range) -> list[T]:
    """``[fn(item) for item in items]`` on `torch.get_num_threads()` worker threads whose torch calls each run on
    one thread (torch releases the GIL inside them).

    The quantisers make many calls per chunk: splitting each call across threads would make every call wait for
    the slowest thread, which on a busy machine (another process on a core) costs a scheduler time slice each
    time, 10-80x slower here; whole chunks per thread never wait for one another.
    """
    threads = torch.get_num_threads()
    if threads == 1 or len(items) == 1:
        return [fn(item) for item in items]
    try:
        with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(threads)  # a worker's setting also becomes torch's default: restore it


# ---------------------------------------------------------------------------------------------- on load


@dataclass
class QuantizeReport:
    """Per-tensor relative RMS error (``||W - Q(W)|| / ||W||``) of a quantisation: each tensor logged at DEBUG
    level, a summary at INFO (`log_summary`)."""

    what: str
    errors: dict[str, float] = field(default_factory=dict)
    weights: int = 0
    seconds: float = 0.0

    def add(self, key: str, qtype: str, weights: int, error: float, seconds: float) -> None:
        self.errors[key] = error
        self.weights += weights
        self.seconds += seconds
        log.debug("%s: %s %s, relative RMS error %.3e", self.what, key, qtype, error)

    def log_summary(self) -> None:
        if not self.errors:
            return
        worst = max(self.errors, key=self.errors.__getitem__)
        log.info("%s: quantised %d tensors (%.3g G weights) in %.1f s (%.1f ns/weight); relative RMS error mean "
                 "%.3e, max %.3e (%s)", self.what, len(self.errors), self.weights / 1e9, self.seconds,
                 self.seconds / max(self.weights, 1) * 1e9, sum(self.errors.values()) / len(self.errors),
                 self.errors[worst], worst)


def quantize_tensor(tensor: SourceTensor, qtype: str, report: QuantizeReport | None = None) -> Tensor:
    """llama.cpp's blocks of a tensor ``[N, K]``, read and quantised a chunk of rows at a time (chunks in parallel).

    Returns:
        uint8 ``[N, K / block * block_bytes]``, as `quantize`; its error goes to `report`.

    Raises:
        ValueError: ``K`` is not a whole number of blocks.
    """
    start = time.perf_counter()
    n, k = tensor.shape
    values, size = BLOCK_SIZES[qtype]
    if k % values:
        raise ValueError(f"{tensor.key or 'the tensor'}: {qtype} needs rows of whole {values}-value blocks, "
                         f"got {list(tensor.shape)}")
    out = torch.empty(n, k // values * size, dtype=torch.uint8)
    step = -(-max(1, _CHUNK_WEIGHTS[qtype] // k) // tensor.row_multiple) * tensor.row_multiple

    def encode_rows(a: int) -> tuple[float, float]:
        x = tensor.read(a, min(a + step, n)).to(torch.float32)
        raw, dequantized = _encode(x, qtype)
        out[a:a + len(x)] = raw
        return (float(torch.linalg.vector_norm(dequantized.sub_(x), dtype=torch.float64)) ** 2,
                float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2)

    errors = _in_parallel(encode_rows, range(0, n, step))
    if report is not None:
        error, norm = (sum(e[i] for e in errors) for i in (0, 1))
        report.add(tensor.key, qtype, n * k, math.sqrt(error / norm) if norm else 0.0, time.perf_counter() - start)
    return out


def quantize(x: Tensor, qtype: str) -> Tensor:
    """llama.cpp's blocks of the rows ``x`` ``[N, K]`` (``K`` a multiple of 32, of 256 for ``"q4_k"``).

    Returns:
        uint8 ``[N, K / block * block_bytes]``: each row's GGUF ``Q8_0`` / ``Q4_1`` / ``Q4_K`` bytes.
    """
    check_quantize(qtype)
    if x.dim() != 2:
        raise ValueError(f"quantize needs rows [N, K], got {list(x.shape)}")
    x = x.detach()
    return quantize_tensor(SourceTensor("", tuple(x.shape), lambda a, b: x[a:b]), qtype)


def quantized_weight(tensor: SourceTensor, qtype: str, report: QuantizeReport | None = None) -> QuantizedWeight:
    """`quantize_tensor`'s blocks as the `QuantizedWeight` the kernels multiply (what loading them from GGUF gives)."""
    raw = quantize_tensor(tensor, qtype, report)
    return weight_from_blocks(GGUF_TYPES[qtype].name, raw.numpy(), tensor.shape[0])


# ---------------------------------------------------------------------------------------------- decoding
# Conversions from GGUF blocks to `QuantizedWeight`s. Each takes the raw bytes ``[N, blocks, bytes]``
# and keeps exactly the values the `gguf` package decodes: Q4_0 and Q5_0 store ``q - 8`` / ``q - 16``;
# K-quant sub-block scales and minimums multiply into float32 exactly; 5-bit values and Q6_K's
# ``q - 32`` fit int8. Layouts are llama.cpp's (ggml-common.h); float16 scales lead each block.


def _f16(raw: np.ndarray) -> torch.Tensor:
    """float32 from two little-endian float16 bytes in the last axis."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32))


def _shifted(raw: np.ndarray, shifts: list[int], mask: int) -> np.ndarray:
    """``(raw >> s) & mask`` for each shift, as a new axis before the last: ``[..., len(shifts), n]``."""
    return (raw[..., None, :] >> np.array(shifts, dtype=raw.dtype)[:, None]) & mask


def _rows(values: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values).reshape(n, -1))


def _pack_nibbles(values: np.ndarray, n: int) -> torch.Tensor:
    """4-bit values to our ``[N, K/2]`` bytes: byte j of a 32-block holds elements j (low) and j + 16 (high)."""
    v = values.reshape(n, -1, 2, 16)
    return _rows(v[:, :, 0] | (v[:, :, 1] << 4), n)


def _k_scales(raw: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per-32 scales ``d * sc`` and offsets ``-dmin * m`` from d, dmin and 12 bytes of 6-bit pairs."""
    sub_scales, sub_mins = (torch.from_numpy(a.astype(np.float32)).view(n, -1, 8)
                            for a in gguf.quants.Q4_K.get_scale_min(raw[..., 4:16].reshape(-1, 12)))
    return ((_f16(raw[..., 0:2])[..., None] * sub_scales).view(n, -1),
            (-(_f16(raw[..., 2:4])[..., None] * sub_mins)).view(n, -1))


def _k_nibbles(runs: np.ndarray) -> np.ndarray:
    """K-quant low nibbles: each 32-byte run holds sub-block 2c (low nibbles) then 2c + 1 (high)."""
    return _shifted(runs.reshape(*runs.shape[:-1], -1, 32), [0, 4], 0x0F)


def _from_q8_0(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, 32 int8
    return QuantizedWeight("q8", _rows(raw[..., 2:], n).view(torch.int8), _f16(raw[..., 0:2]))


def _from_q4_0(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, 16 bytes of nibbles (q - 8)
    scales = _f16(raw[..., 0:2])
    return QuantizedWeight("q4_1", _rows(raw[..., 2:], n), scales, -8 * scales)


def _from_q4_1(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, m, 16 bytes of nibbles
    return QuantizedWeight("q4_1", _rows(raw[..., 4:], n), _f16(raw[..., 0:2]), _f16(raw[..., 2:4]))


def _q5_values(raw: np.ndarray, n: int, start: int) -> np.ndarray:
    """Q5_0 / Q5_1 values 0..31: a little-endian uint32 of high bits at ``start``, then 16 nibble bytes."""
    high = _shifted(np.ascontiguousarray(raw[..., start:start + 4]).view("<u4"), list(range(32)), 1)[..., 0]
    low = _shifted(raw[..., start + 4:], [0, 4], 0x0F)  # elements 0-15 low nibbles, 16-31 high
    return (low.reshape(*high.shape) | (high.astype(np.uint8) << 4)).astype(np.int8).reshape(n, -1)


def _from_q5_0(raw: np.ndarray, n: int) -> QuantizedWeight:
    return QuantizedWeight("q8", torch.from_numpy(_q5_values(raw, n, 2) - np.int8(16)), _f16(raw[..., 0:2]))


def _from_q5_1(raw: np.ndarray, n: int) -> QuantizedWeight:
    return QuantizedWeight("q8", torch.from_numpy(_q5_values(raw, n, 4)), _f16(raw[..., 0:2]), _f16(raw[..., 2:4]))


def _from_q4_k(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, dmin, 12 scale bytes, 128 nibble bytes
    return QuantizedWeight("q4_1", _pack_nibbles(_k_nibbles(raw[..., 16:]), n), *_k_scales(raw, n))


def _from_q5_k(raw: np.ndarray, n: int) -> QuantizedWeight:  # d, dmin, 12 scale bytes, 32 high-bit bytes, 128 nibbles
    high = _shifted(raw[..., 16:48], list(range(8)), 1)  # bit j of every byte: sub-block j
    values = _k_nibbles(raw[..., 48:]).reshape(*high.shape) | (high << 4)
    return QuantizedWeight("q8", _rows(values.astype(np.int8), n), *_k_scales(raw, n))


def _from_q6_k(raw: np.ndarray, n: int) -> QuantizedWeight:  # 128 low-nibble, 64 high-2-bit bytes, 16 int8 scales, d
    low = _shifted(raw[..., :128].reshape(n, -1, 2, 64), [0, 4], 0x0F)  # [n, blocks, 2, 2, 64]
    high = _shifted(raw[..., 128:192].reshape(n, -1, 2, 32), [0, 2, 4, 6], 0x03)  # [n, blocks, 2, 4, 32]
    values = (low.reshape(n, -1, 256) | (high.reshape(n, -1, 256) << 4)).astype(np.int8) - np.int8(32)
    sub_scales = torch.from_numpy(np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32))
    return QuantizedWeight("q8", _rows(values, n), (_f16(raw[..., 208:210])[..., None] * sub_scales).view(n, -1))


# GGUF type name -> conversion of its blocks.
_DECODERS = {"Q4_0": _from_q4_0, "Q4_1": _from_q4_1, "Q5_0": _from_q5_0, "Q5_1": _from_q5_1, "Q8_0": _from_q8_0,
             "Q4_K": _from_q4_k, "Q5_K": _from_q5_k, "Q6_K": _from_q6_k}
KEPT_TYPES = tuple(_DECODERS)  # the GGUF types a `QuantizedWeight` holds exactly


def weight_from_blocks(gguf_type: str, raw: np.ndarray, n: int) -> QuantizedWeight:
    """The `QuantizedWeight` ``[N, K]`` of the GGUF blocks `raw` (uint8, ``N`` rows of whole blocks) of type
    `gguf_type` (a `KEPT_TYPES` name)."""
    _, size = gguf.GGML_QUANT_SIZES[Q[gguf_type]]
    return _DECODERS[gguf_type](np.asarray(raw).view(np.uint8).reshape(n, -1, size), n)
