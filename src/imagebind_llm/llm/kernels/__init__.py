"""CPU kernels for block-quantised (GGUF Q4_*, Q5_*, Q6_K, Q8_0) weights, compiled on first use.

`quant_matmul.c` (AVX2 + FMA, OpenMP) is built with the system C compiler (``$CC``, else ``cc``) into
the cache folder (``$IMAGEBIND_LLM_CACHE/kernels``, else ``~/.cache/imagebind_llm/kernels``), once per
source version, and loaded with `ctypes`. Its OpenMP runtime is the ``libgomp.so.1`` PyTorch has
already loaded, so both share one thread pool and ``torch.set_num_threads`` governs both.

`available()` is False (and callers fall back to float32 weights) when the CPU lacks AVX2, no
compiler is found, the build fails, or ``IMAGEBIND_LLM_KERNELS=0``; `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from imagebind_llm.hub import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_matmul.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c11")
DISABLE_ENV = "IMAGEBIND_LLM_KERNELS"
BLOCK = 32

_P, _N = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "ibl_q4_1_matmul": (_P, _P, _P, _P, _P, _N, _N, _N),
    "ibl_q8_matmul": (_P, _P, _P, _P, _P, _N, _N, _N, _N),
    "ibl_q4_1_dequantize": (_P, _P, _P, _P, _N, _N),
    "ibl_q8_dequantize": (_P, _P, _P, _P, _N, _N, _N),
}


class KernelsUnavailable(RuntimeError):
    """The compiled kernels cannot be used on this machine (see the message for why)."""


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelsUnavailable(f"compiling {SOURCE.name} with {compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: concurrent builders each install a complete file


def _build_and_load() -> ctypes.CDLL:
    if os.environ.get(DISABLE_ENV, "1") == "0":
        raise KernelsUnavailable(f"disabled by {DISABLE_ENV}=0")
    if sys.platform != "linux" or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        raise KernelsUnavailable(f"needs an x86-64 Linux CPU with AVX2 (found {sys.platform}, "
                                 f"{torch.backends.cpu.get_cpu_capability()})")
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise KernelsUnavailable(f"no C compiler {compiler!r} on PATH (install gcc, or set CC)")
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = default_cache_dir() / "kernels" / f"quant_matmul-{digest}.so"
    if not target.exists():
        log.info("compiling %s -> %s", SOURCE.name, target)
        _build(compiler, target)
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)``, or ``(None, why not)``: decided once per process (a failed build is not retried)."""
    try:
        return _build_and_load(), None
    except (KernelsUnavailable, OSError) as e:
        if os.environ.get(DISABLE_ENV, "1") != "0":
            log.warning("quantised GGUF kernels unavailable (%s); quantised weights will be dequantised", e)
        return None, str(e)


def _library() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise KernelsUnavailable(reason)
    return lib


def unavailable_reason() -> str | None:
    """None when the kernels load; otherwise why they do not."""
    return _load()[1]


def available() -> bool:
    return _load()[0] is not None


def matmul_function(fmt: str, blocks: Tensor, scales: Tensor, offsets: Tensor | None = None
                    ) -> Callable[[Tensor], Tensor]:
    """A function ``x [..., K] float32 -> x @ W^T [..., N]`` for the weight in these blocks.

    ``fmt`` ``"q4_1"``: ``blocks`` uint8 ``[N, K/2]`` (byte ``j`` of a 32-block holds element ``j`` low
    and ``j + 16`` high), ``scales``/``offsets`` float32 ``[N, K/32]``; ``"q8"``: ``blocks`` int8
    ``[N, K]``, ``scales`` ``[N, K/32]`` (optional ``offsets`` likewise) or ``[N, K/16]`` (no offsets).
    The tensors must stay alive and in place while the function is used.
    """
    N, groups = scales.shape
    K = blocks.shape[1] * (2 if fmt == "q4_1" else 1)
    for t in (blocks, scales, offsets):
        if t is not None and not (t.is_cpu and t.is_contiguous()):
            raise ValueError("quantised weights must be contiguous CPU tensors")
    lib = _library()
    weights = (blocks.data_ptr(), scales.data_ptr(), None if offsets is None else offsets.data_ptr())
    if fmt == "q4_1":
        fn, extra = lib.ibl_q4_1_matmul, ()
    else:
        fn, extra = lib.ibl_q8_matmul, (K // groups,)

    def matmul(x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != K:
            raise ValueError(f"expected float32 CPU input [..., {K}], got {x.dtype} {list(x.shape)} on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], N)
        fn(x.data_ptr(), *weights, y.data_ptr(), x.numel() // K, N, K, *extra)
        return y

    return matmul


def dequantize(fmt: str, blocks: Tensor, scales: Tensor, offsets: Tensor | None = None) -> Tensor:
    """The float32 weight ``[N, K]`` (``d * q + m``, rounded as the `gguf` package does); formats as in
    `matmul_function`."""
    N, groups = scales.shape
    K = blocks.shape[1] * (2 if fmt == "q4_1" else 1)
    w = torch.empty(N, K)
    weights = (blocks.data_ptr(), scales.data_ptr(), None if offsets is None else offsets.data_ptr())
    if fmt == "q4_1":
        _library().ibl_q4_1_dequantize(*weights, w.data_ptr(), N, K)
    else:
        _library().ibl_q8_dequantize(*weights, w.data_ptr(), N, K, K // groups)
    return w
