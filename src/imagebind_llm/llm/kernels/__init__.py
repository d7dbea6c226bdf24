"""CPU kernels for block-quantised (GGUF Q4_*, Q5_*, Q6_K, Q8_0) weights, compiled on first use.

`quant_matmul.c` (AVX2 + FMA, and AVX-512 where the CPU has AVX512-VNNI, chosen at run time) is built
with the system C compiler (``$CC``, else ``cc``) into the cache folder (``$IMAGEBIND_LLM_CACHE/kernels``,
else ``~/.cache/imagebind_llm/kernels``), once per source version, and loaded with `ctypes`. Its work
runs on a small thread pool of its own (see the C file): as many threads as ``torch.get_num_threads()``
in the calling thread, so ``torch.set_num_threads`` governs it as it governs torch's own ops.
`decoding` marks a decode step whose heavy work runs here: torch's own ops then stay in the calling
thread, so that torch's OpenMP threads do not spin on the cores the pool needs.

Int8 activations: a product can round each 32-block of its input to int8 first, as llama.cpp does, for
integer dot products: faster, and each output then differs from the exact product by at most
``sum |w| * max|x block| / 254`` over the blocks. By default ("auto") only weights at least
`INT8_AUTO_MIN_K` wide in their input do: on LLaMA-7B's layers that decides the speed (0.71x of llama.cpp
at batch 1 with float32 activations, 1.15x with int8), while on small models the gain is a few percent and
the products stay the file's exact weights times the input, in float32. ``set_int8_activations(True /
False / None)`` (or ``IMAGEBIND_LLM_INT8_ACTIVATIONS=1`` / ``0`` / ``auto`` at import) forces them on,
off, or back to auto.

`available()` is False (and callers fall back to float32 weights) when the CPU lacks AVX2, no
compiler is found, the build fails, or ``IMAGEBIND_LLM_KERNELS=0``; `unavailable_reason()` says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

from imagebind_llm.hub import default_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("quant_matmul.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-pthread", "-shared", "-fPIC", "-std=c11")
DISABLE_ENV = "IMAGEBIND_LLM_KERNELS"
INT8_ENV = "IMAGEBIND_LLM_INT8_ACTIVATIONS"
BLOCK = 32
INT8_AUTO_MIN_K = 2048  # "auto" int8 activations: weights with at least this many inputs (see the docstring)
MAX_FUSED = 3  # weights one call can multiply (quant_matmul.c's MAX_WEIGHTS)
ISAS = {"auto": 0, "avx2": 1, "avx512-vnni": 2}

_P, _N = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "ibl_matmul": ((_P, _N, _N, _P, ctypes.c_float, _P, _N, _P, _P, _P, _N, _N, _N), _N),
    "ibl_dequantize": ((_P, _N, _N, _N, _P, _N), None),
    "ibl_attention": ((_P, _P, _P, _P, _N, _P, _P, _P, _N, _N, _N, _N, _N, _N, _N, _P, _N), _N),
    "ibl_isa": ((), _N),
    "ibl_set_isa": ((_N,), _N),
    "ibl_pool_workers": ((), _N),
}
_FORMATS = {"q4_1": 0, "q8": 1}
_ENV_INT8 = {"1": True, "0": False, "auto": None, "": None}
_local = threading.local()  # .threads: the kernels' thread count inside `decoding`


class _Weight(ctypes.Structure):
    """quant_matmul.c's ``ibl_weight``."""

    _fields_ = [("fmt", _N), ("group", _N), ("q", _P), ("d", _P), ("m", _P), ("n", _N)]


class KernelsUnavailable(RuntimeError):
    """The compiled kernels cannot be used on this machine (see the message for why)."""


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
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
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
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


def _env_int8() -> bool | None:
    value = os.environ.get(INT8_ENV, "auto").strip().lower()
    if value not in _ENV_INT8:
        log.warning("ignoring %s=%r (expected 1, 0 or auto): using auto", INT8_ENV, value)
    return _ENV_INT8.get(value)


_int8 = [_env_int8()]  # read on every product (a list: one shared cell)


def int8_activations() -> bool | None:
    """Whether the products round their input to int8 per 32-block: True, False, or None for "auto" (only
    weights with at least `INT8_AUTO_MIN_K` inputs; see the module docstring)."""
    return _int8[0]


def set_int8_activations(enabled: bool | None) -> None:
    """Round the input of every following product to int8 per 32-block (True), keep it float32 (False),
    or decide by the weight's input size (None, the default: "auto")."""
    _int8[0] = None if enabled is None else bool(enabled)


def _int8_for(k: int) -> bool:
    """Whether a product with ``k`` inputs runs on int8 activations now."""
    setting = _int8[0]
    return k >= INT8_AUTO_MIN_K if setting is None else setting


def _descriptors(weights: Sequence[tuple[str, Tensor, Tensor, Tensor | None]]) -> tuple[ctypes.Array, int]:
    """The C descriptions of ``(fmt, blocks, scales, offsets)`` weights that share their input size K."""
    described, sizes = [], set()
    for fmt, blocks, scales, offsets in weights:
        for t in (blocks, scales, offsets):
            if t is not None and not (t.is_cpu and t.is_contiguous()):
                raise ValueError("quantised weights must be contiguous CPU tensors")
        n, groups = scales.shape
        k = blocks.shape[1] * (2 if fmt == "q4_1" else 1)
        sizes.add(k)
        described.append(_Weight(_FORMATS[fmt], k // groups, blocks.data_ptr(), scales.data_ptr(),
                                 None if offsets is None else offsets.data_ptr(), n))
    if len(sizes) != 1:
        raise ValueError(f"fused weights must share their input size; got {sorted(sizes)}")
    return (_Weight * len(described))(*described), sizes.pop()


def fused_matmul_function(weights: Sequence[tuple[str, Tensor, Tensor, Tensor | None]], *, gated: bool = False
                          ) -> Callable[..., list[Tensor]]:
    """A function ``f(x, norm=None) -> [x @ W_i^T for each weight]``, one parallel call for all the weights
    (up to `MAX_FUSED`, e.g. the projections of one layer that share their input).

    ``weights`` are ``(fmt, blocks, scales, offsets)`` as in `matmul_function`, all with the same ``K``;
    ``x`` is float32 ``[..., K]`` and each output ``[..., N_i]``. ``norm`` ``(weight [K], eps)``: the rows of
    ``x`` are RMS-normalised first (``weight * (x * rsqrt(mean(x ** 2) + eps))``, as `RMSNorm` rounds it).
    ``gated`` (two weights of the same ``N``): one output, ``silu(x @ W_0^T) * (x @ W_1^T)``, a SwiGLU's
    gate and up projections. The tensors must stay alive and in place while the function is used.
    """
    if not 1 <= len(weights) <= MAX_FUSED:
        raise ValueError(f"expected 1 to {MAX_FUSED} weights, got {len(weights)}")
    described, K = _descriptors(weights)
    sizes = [w.n for w in described]
    if gated and (len(sizes) != 2 or sizes[0] != sizes[1]):
        raise ValueError(f"a gated product needs two weights of the same size; got {sizes}")
    address, count = ctypes.addressof(described), len(sizes)
    outputs = sizes[:1] if gated else sizes
    unused = [None] * (MAX_FUSED - len(outputs))
    fn = _library().ibl_matmul

    def matmul(x: Tensor, norm: tuple[Tensor, float] | None = None) -> list[Tensor]:
        if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != K:
            raise ValueError(f"expected float32 CPU input [..., {K}], got {x.dtype} {list(x.shape)} on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        norm_weight, eps = (None, 0.0) if norm is None else norm
        if norm_weight is not None and (norm_weight.dtype != torch.float32 or not norm_weight.is_cpu
                                        or norm_weight.shape != (K,) or not norm_weight.is_contiguous()):
            raise ValueError(f"the norm weight must be a contiguous float32 CPU tensor [{K}]")
        lead = x.shape[:-1]
        ys = [torch.empty(*lead, n) for n in outputs]
        pointers = [y.data_ptr() for y in ys] + unused
        if not fn(x.data_ptr(), x.numel() // K, K, None if norm_weight is None else norm_weight.data_ptr(), eps,
                  address, count, *pointers, gated, threads(), _int8_for(K)):
            raise MemoryError("quantised matmul: out of memory")
        return ys

    matmul.weights = described  # keeps the descriptions alive with the function
    return matmul


def matmul_function(fmt: str, blocks: Tensor, scales: Tensor, offsets: Tensor | None = None
                    ) -> Callable[[Tensor], Tensor]:
    """A function ``x [..., K] float32 -> x @ W^T [..., N]`` for the weight in these blocks.

    ``fmt`` ``"q4_1"``: ``blocks`` uint8 ``[N, K/2]`` (byte ``j`` of a 32-block holds element ``j`` low
    and ``j + 16`` high), ``scales``/``offsets`` float32 ``[N, K/32]``; ``"q8"``: ``blocks`` int8
    ``[N, K]``, ``scales`` ``[N, K/32]`` (optional ``offsets`` likewise) or ``[N, K/16]`` (no offsets).
    The tensors must stay alive and in place while the function is used.
    """
    described, K = _descriptors([(fmt, blocks, scales, offsets)])
    N, address = described[0].n, ctypes.addressof(described)
    fn = _library().ibl_matmul

    def matmul(x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != K:
            raise ValueError(f"expected float32 CPU input [..., {K}], got {x.dtype} {list(x.shape)} on {x.device}")
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(*x.shape[:-1], N)
        if not fn(x.data_ptr(), x.numel() // K, K, None, 0.0, address, 1, y.data_ptr(), None, None, False, threads(),
                  _int8_for(K)):
            raise MemoryError("quantised matmul: out of memory")
        return y

    matmul.weights = described
    return matmul


def dequantize(fmt: str, blocks: Tensor, scales: Tensor, offsets: Tensor | None = None, *,
               start: int = 0, stop: int | None = None, out: Tensor | None = None,
               num_threads: int | None = None) -> Tensor:
    """The float32 weight ``[N, K]`` (``d * q + m``, rounded as the `gguf` package does); formats as in
    `matmul_function`. With ``start``/``stop``: only rows ``start:stop``, ``[stop - start, K]``, written
    into ``out`` (a contiguous float32 tensor of that shape) when given; on ``num_threads`` threads
    (default `threads()`)."""
    described, K = _descriptors([(fmt, blocks, scales, offsets)])
    N = described[0].n
    stop = N if stop is None else min(stop, N)
    if not 0 <= start <= stop:
        raise ValueError(f"rows {start}:{stop} out of range for {N} rows")
    if out is None:
        out = torch.empty(stop - start, K)
    elif out.shape != (stop - start, K) or out.dtype != torch.float32 or not (out.is_cpu and out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float32 CPU tensor [{stop - start}, {K}]")
    _library().ibl_dequantize(ctypes.addressof(described), K, start, stop, out.data_ptr(), num_threads or threads())
    return out


def threads() -> int:
    """Threads a product started from this thread uses: ``torch.get_num_threads()``, or inside
    `decoding` the number from outside it."""
    return _local.__dict__.get("threads") or torch.get_num_threads()


def _loaded(names: Sequence[str]) -> ctypes.CDLL | None:
    """The first of these shared libraries that this process has already loaded (without loading any)."""
    for name in names:
        try:
            return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
    return None


@functools.cache
def _thread_setters() -> tuple[Callable[[int], None], Callable[[int], int] | None] | None:
    """``(omp_set_num_threads, MKL_Set_Num_Threads_Local or None)`` of the runtimes torch's ops use, when
    they govern torch's ops in the calling thread; None when they cannot be found (no serial mode then)."""
    openmp = _loaded(["libgomp.so.1", "libiomp5.so", "libomp.so"])
    set_omp = getattr(openmp, "omp_set_num_threads", None)
    if set_omp is None:
        return None
    set_omp.argtypes, set_omp.restype = (ctypes.c_int,), None
    before = torch.get_num_threads()
    probe = 2 if before == 1 else 1
    set_omp(probe)
    governs = torch.get_num_threads() == probe
    set_omp(before)
    if not governs:
        return None
    set_mkl = None
    if torch.backends.mkl.is_available():  # MKL's own threads would otherwise fill the gap in every BLAS call
        mkl = _loaded([str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"), "libmkl_rt.so.2", "libmkl_rt.so"])
        set_mkl = getattr(mkl, "MKL_Set_Num_Threads_Local", None)
        if set_mkl is None:
            return None
        set_mkl.argtypes, set_mkl.restype = (ctypes.c_int,), ctypes.c_int
    return set_omp, set_mkl


@contextlib.contextmanager
def decoding() -> Iterator[None]:
    """Marks a decode step whose heavy work runs on these kernels, in the calling thread: within it torch's
    own parallel ops (OpenMP and MKL) in this thread run on this thread alone, the kernels keep the thread
    count of outside (`threads()`), and `attention` may be used (`in_decoding()`).

    Such a step leaves torch only small ops (norms, residual adds), for which a team of threads costs
    more than it gives: each parallel op wakes torch's OpenMP pool, whose threads then spin for
    milliseconds on the cores the kernels' threads need. Only this thread's settings change
    (``omp_set_num_threads``, ``MKL_Set_Num_Threads_Local``), not torch's global ones; where they cannot
    be found, torch's ops keep their threads.
    """
    if "threads" in _local.__dict__:  # nested: the outer step governs
        yield
        return
    outer = torch.get_num_threads()  # (also applies torch.set_num_threads to a new thread first)
    setters = _thread_setters() if outer > 1 else None
    _local.threads = outer
    if setters is not None:
        setters[0](1)
        mkl_before = setters[1](1) if setters[1] else 0
    try:
        yield
    finally:
        if setters is not None:
            if setters[1]:
                setters[1](mkl_before)
            setters[0](outer)
        del _local.threads


def in_decoding() -> bool:
    """Whether the calling thread is within `decoding`."""
    return "threads" in _local.__dict__


def attention(q: Tensor, k: Tensor, v: Tensor, rope: Tensor, cache_k: Tensor, cache_v: Tensor,
              positions: Tensor, rows: slice, kv_len: int) -> Tensor | None:
    """Rotary embeddings, the KV cache write and attention for a decode step, in one call.

    ``q`` ``[B, S, H, D]``, ``k``/``v`` ``[B, S, Hkv, D]`` (float32, before rotation); ``rope`` the complex
    rotations ``[1 or B, S, 1, D/2]``; ``cache_k``/``cache_v`` ``[rows, Hkv, T, D]`` float32, of which rows
    ``rows`` (a slice of ``B``) are used; ``positions`` ``[B, S]`` the slots of the new keys/values. The
    rotated keys and the values are stored in the caches, and each query attends (softmax with scale
    ``D ** -0.5``) to the slots at positions up to its own and below ``kv_len``, query head ``h`` to cache
    head ``h // (H / Hkv)``. Returns ``[B, S, H * D]``, or None when these tensors do not fit the kernel
    (other dtypes or devices, ``D`` not a multiple of 8 up to 256, non-contiguous caches): use torch then.

    Raises:
        IndexError: a position outside the cache.
    """
    B, S, H, D = q.shape
    Hkv, T = cache_k.shape[1], cache_k.shape[2]
    f32 = torch.float32
    if not (q.is_cpu and k.is_cpu and v.is_cpu and rope.is_cpu and cache_k.is_cpu and cache_v.is_cpu
            and q.dtype == f32 and k.dtype == f32 and v.dtype == f32 and cache_k.dtype == f32
            and cache_v.dtype == f32 and rope.dtype == torch.complex64 and D % 8 == 0 and D <= 256
            and cache_k.is_contiguous() and cache_v.is_contiguous() and cache_v.shape == cache_k.shape):
        return None
    start = rows.indices(cache_k.shape[0])[0]
    q, k, v, rope = q.contiguous(), k.contiguous(), v.contiguous(), rope.contiguous()
    positions = positions.to(torch.int64).contiguous()
    y = torch.empty(B, S, H * D)
    offset = start * Hkv * T * D * 4
    if not _library().ibl_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), rope.data_ptr(), rope.shape[0],
                                    cache_k.data_ptr() + offset, cache_v.data_ptr() + offset, positions.data_ptr(),
                                    B, S, H, Hkv, D, T, kv_len, y.data_ptr(), threads()):
        raise IndexError(f"cache positions {positions.tolist()} outside the {T} slots of the cache")
    return y


def isa() -> str:
    """The instruction set of the products: ``"avx2"`` or ``"avx512-vnni"`` (512-bit vectors)."""
    return {v: k for k, v in ISAS.items()}[_library().ibl_isa()]


def set_isa(name: str) -> None:
    """Use ``name`` (a key of `ISAS`; ``"auto"``: the best this CPU has) for the products, for tests and
    benchmarks: the AVX2 code is what CPUs without AVX512-VNNI run. Results differ between the two in
    the float rounding of their sums."""
    if not _library().ibl_set_isa(ISAS[name]):
        raise KernelsUnavailable(f"this CPU cannot run the {name} kernels")


def pool_workers() -> int:
    """Threads the kernels' pool has started in this process (besides the callers)."""
    return _library().ibl_pool_workers()
