"""The compiled kernels against independent truths: the `gguf` package's dequantisation, float64 products,
an int8-activation product computed in float64, and torch's rotary + attention; their thread pool
(thread counts, determinism, concurrent callers, fork, exit) and the decode step that uses them."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from gguf import quants

from imagebind_llm.llm import kernels, quantized
from imagebind_llm.llm.model import apply_rope
from imagebind_llm.llm.quantized import QuantizedWeight, dequantize_reference

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels: {kernels.unavailable_reason()}")

# (format, values per scale, offsets): Q4_0/Q4_1/Q4_K; Q8_0/Q5_0; Q6_K; Q5_1/Q5_K
FORMATS = [("q4_1", 32, True), ("q8", 32, False), ("q8", 16, False), ("q8", 32, True)]
ISAS = ["avx2"] + (["avx512-vnni"] if kernels.available() and kernels.isa() == "avx512-vnni" else [])


def random_weight(fmt: str, n: int, k: int, group: int = 32, offsets: bool = False, seed: int = 0) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half().float()
    mins = (-torch.rand(n, k // 32, generator=g) * 0.1).half().float()
    if fmt == "q4_1":
        return QuantizedWeight(fmt, torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g), scales, mins)
    values = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    return QuantizedWeight(fmt, values, scales, mins if offsets else None)


def gguf_weight(qtype: Q, n: int, k: int, seed: int = 0) -> tuple[QuantizedWeight, torch.Tensor]:
    """Random weights quantised by the `gguf` package, repacked here; and its own dequantisation."""
    data = np.random.default_rng(seed).standard_normal((n, k), dtype=np.float32)
    raw = quants.quantize(data, qtype).reshape(n, -1, 20 if qtype == Q.Q4_1 else 34)
    scales = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    truth = torch.from_numpy(quants.dequantize(raw.reshape(n, -1), qtype))
    if qtype == Q.Q4_1:
        mins = torch.from_numpy(raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
        return QuantizedWeight("q4_1", torch.from_numpy(raw[..., 4:].reshape(n, -1).copy()), scales, mins), truth
    return QuantizedWeight("q8", torch.from_numpy(raw[..., 2:].reshape(n, -1).copy().view(np.int8)), scales), truth


def dense(w: QuantizedWeight) -> torch.Tensor:
    return dequantize_reference(w.fmt, w.blocks, w.scales, w.offsets).double()


def int8_truth(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """The int8-activation product in float64: x rounded per 32-block as the kernel rounds it (scale
    max|x| / 127 and its float32 reciprocal, round half to even), times the weight's exact values."""
    M, K = x.shape
    blocks = x.view(M, K // 32, 32)
    dx = blocks.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    xq = torch.round(blocks * inv[..., None]).clamp(-127, 127).double() * dx.double()[..., None]
    y = xq.view(M, K) @ dense(w).T
    if w.offsets is not None:  # offsets multiply the exact block sums
        exact_offsets = blocks.double().sum(-1) @ w.offsets.double().T
        quantised_offsets = xq.sum(-1) @ w.offsets.double().T
        y += exact_offsets - quantised_offsets
    return y


@pytest.fixture(autouse=True)
def _restore_settings():
    threads, int8 = torch.get_num_threads(), kernels.int8_activations()
    yield
    torch.set_num_threads(threads)
    kernels.set_int8_activations(int8)
    kernels.set_isa("auto")


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
def test_dequantisation_is_the_gguf_packages(qtype):
    w, truth = gguf_weight(qtype, 45, 96)
    assert torch.equal(w.dequantize(), truth)
    assert torch.equal(kernels.dequantize(*w.kernel_args(), start=7, stop=30), truth[7:30])
    assert torch.equal(dequantize_reference(w.fmt, w.blocks, w.scales, w.offsets), truth)


def test_dequantising_rows_writes_only_those_rows():
    w = random_weight("q4_1", 77, 64)
    buffer = torch.full((40, 64), 7.0)
    kernels.dequantize(*w.kernel_args(), start=20, stop=51, out=buffer[:31], num_threads=3)
    assert torch.equal(buffer[:31], w.dequantize()[20:51]) and bool((buffer[31:] == 7.0).all())
    with pytest.raises(ValueError, match="out must be"):
        kernels.dequantize(*w.kernel_args(), start=0, stop=10, out=torch.empty(9, 64))


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 65])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_exact_products_against_the_gguf_weights_in_float64(qtype, isa, rows, threads):
    torch.set_num_threads(threads)
    kernels.set_isa(isa)
    w, truth = gguf_weight(qtype, 75, 128, seed=rows)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
    got = kernels.matmul_function(*w.kernel_args())(x)
    torch.testing.assert_close(got.double(), x.double() @ truth.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,group,offsets", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 4, 9])  # 4+ rows share pre-scaled blocks, fewer scale dot products
def test_exact_products_of_every_format_against_float64(fmt, group, offsets, isa, rows):
    kernels.set_isa(isa)
    w = random_weight(fmt, 61, 32 * 5, group=group, offsets=offsets, seed=rows)
    x = torch.randn(rows, w.in_features, generator=torch.Generator().manual_seed(rows))
    got = kernels.matmul_function(*w.kernel_args())(x)
    torch.testing.assert_close(got.double(), x.double() @ dense(w).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,group,offsets", FORMATS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 7, 9, 65])
def test_int8_products_are_the_int8_algorithm_and_within_the_rounding_bound(fmt, group, offsets, isa, rows):
    kernels.set_isa(isa)
    kernels.set_int8_activations(True)
    w = random_weight(fmt, 83, 32 * 7, group=group, offsets=offsets, seed=rows)  # an odd number of blocks
    x = torch.randn(rows, w.in_features, generator=torch.Generator().manual_seed(rows))
    got = kernels.matmul_function(*w.kernel_args())(x).double()
    torch.testing.assert_close(got, int8_truth(x, w), rtol=1e-5, atol=1e-4)
    # each x value moves by at most half its block's step, max|x block| / 254
    step = (x.view(rows, -1, 32).abs().amax(-1) / 254).repeat_interleave(32, 1).double()
    bound = step @ dense(w).abs().T
    assert bool(((got - x.double() @ dense(w).T).abs() <= bound * (1 + 1e-4) + 1e-4).all())


@pytest.mark.parametrize("k", [kernels.INT8_AUTO_MIN_K - 32, kernels.INT8_AUTO_MIN_K])
def test_auto_rounds_activations_to_int8_only_for_wide_weights(k):
    kernels.set_int8_activations(None)
    w = random_weight("q4_1", 19, k, offsets=True, seed=k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
    got = kernels.matmul_function(*w.kernel_args())(x).double()
    fused = kernels.fused_matmul_function([w.kernel_args()])(x)[0].double()
    truth = int8_truth(x, w) if k >= kernels.INT8_AUTO_MIN_K else x.double() @ dense(w).T
    torch.testing.assert_close(got, truth, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fused, truth, rtol=1e-5, atol=1e-4)
    assert kernels.int8_activations() is None


def test_the_environment_variable_selects_the_int8_setting():
    code = "from imagebind_llm.llm import kernels; print(kernels.int8_activations())"
    seen = {}
    for value in ("1", "0", "auto", "bogus"):
        env = {**os.environ, kernels.INT8_ENV: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        seen[value] = out.stdout.strip()
        if value == "bogus":
            assert "expected 1, 0 or auto" in out.stderr
    assert seen == {"1": "True", "0": "False", "auto": "None", "bogus": "None"}


@pytest.mark.parametrize("int8", [False, True])
def test_results_do_not_depend_on_the_threads(int8):
    kernels.set_int8_activations(int8)
    weights = [random_weight("q4_1", 301, 96, seed=1), random_weight("q8", 77, 96, group=16, seed=2)]
    x = torch.randn(9, 96)
    outs = []
    for threads in (1, 2, 3, 4, 2):
        torch.set_num_threads(threads)
        outs.append([kernels.matmul_function(*w.kernel_args())(x) for w in weights]
                    + kernels.fused_matmul_function([w.kernel_args() for w in weights])(x))
    for out in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))
    assert all(torch.equal(a, b) for a, b in zip(outs[0][:2], outs[0][2:]))  # fused: the same values


def test_fused_norm_and_gate():
    from imagebind_llm.llm.model import RMSNorm

    gate, up = random_weight("q4_1", 70, 64, seed=1), random_weight("q8", 70, 64, seed=2)
    norm = RMSNorm(64, eps=1e-5)
    norm.weight.data = torch.rand(64) + 0.5
    x = torch.randn(3, 64) * 4
    with torch.no_grad():
        normed = norm(x)
        [y] = kernels.fused_matmul_function([gate.kernel_args(), up.kernel_args()], gated=True)(x, norm.kernel_args())
    expected = F.silu(normed.double() @ dense(gate).T) * (normed.double() @ dense(up).T)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same size"):
        kernels.fused_matmul_function([gate.kernel_args(), random_weight("q8", 71, 64).kernel_args()], gated=True)


def test_the_pool_follows_torch_threads_and_decoding_keeps_torch_serial():
    w = random_weight("q8", 512, 64)
    x = torch.randn(1, 64)
    torch.set_num_threads(3)
    kernels.matmul_function(*w.kernel_args())(x)
    assert kernels.pool_workers() >= 2
    torch.set_num_threads(2)
    with kernels.decoding():
        assert kernels.in_decoding() and kernels.threads() == 2
        if kernels._thread_setters() is not None:
            assert torch.get_num_threads() == 1  # torch's own ops: this thread alone
        torch.testing.assert_close(kernels.matmul_function(*w.kernel_args())(x).double(), x.double() @ dense(w).T,
                                   rtol=1e-5, atol=1e-5)
    assert not kernels.in_decoding() and torch.get_num_threads() == 2


def test_concurrent_callers_get_their_own_results():
    weights = [random_weight("q4_1", 257, 128, seed=s) for s in range(4)]
    xs = [torch.randn(2, 128, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    expected = [x.double() @ dense(w).T for w, x in zip(weights, xs)]
    errors = []

    def work(i: int) -> None:
        f = kernels.matmul_function(*weights[i].kernel_args())
        for _ in range(200):
            if not torch.allclose(f(xs[i]).double(), expected[i], rtol=1e-5, atol=1e-5):
                errors.append(i)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def _child_product(queue, w: QuantizedWeight, x: torch.Tensor, expected: torch.Tensor) -> None:
    # (no torch op here may start torch's own OpenMP team: libgomp's does not survive a fork)
    torch.set_num_threads(2)
    before = kernels.pool_workers()
    y = kernels.matmul_function(*w.kernel_args())(x)
    queue.put((before, kernels.pool_workers() >= 1, bool((y - expected).abs().max() < 1e-5)))


def test_a_forked_child_starts_its_own_pool():
    torch.set_num_threads(2)
    w = random_weight("q4_1", 300, 64)
    x = torch.randn(1, 64)
    expected = kernels.matmul_function(*w.kernel_args())(x)  # the parent's pool exists
    assert kernels.pool_workers() >= 1
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_product, args=(queue, w, x, expected))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == (0, True, True)
    assert torch.equal(kernels.matmul_function(*w.kernel_args())(x), expected)  # and the parent's still works


def test_a_process_using_the_pool_exits_cleanly():
    code = ("import torch; from imagebind_llm.llm import kernels; torch.set_num_threads(2); "
            "w = (torch.randint(0, 256, (512, 32), dtype=torch.uint8), torch.rand(512, 2), torch.rand(512, 2)); "
            "f = kernels.matmul_function('q4_1', *w); [f(torch.randn(1, 64)) for _ in range(100)]; "
            "assert kernels.pool_workers() >= 1; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def _reference_attention(q, k, v, rope, cache_k, cache_v, positions, kv_len):
    """Our model's torch path: rotate, scatter into the caches, masked SDPA."""
    B, S, H, D = q.shape
    q, k = apply_rope(q, rope).transpose(1, 2), apply_rope(k, rope).transpose(1, 2)
    slots = positions[:, None, :, None].expand(k.shape)
    cache_k.scatter_(2, slots, k)
    cache_v.scatter_(2, slots, v.transpose(1, 2))
    mask = positions[:, None, :, None] >= torch.arange(kv_len)
    y = F.scaled_dot_product_attention(q, cache_k[:, :, :kv_len], cache_v[:, :, :kv_len], attn_mask=mask,
                                       enable_gqa=True)
    return y.transpose(1, 2).reshape(B, S, H * D)


@pytest.mark.parametrize("B,S,H,Hkv,D,kv_len", [(1, 1, 9, 3, 64, 80), (3, 2, 4, 4, 32, 150), (2, 3, 8, 2, 16, 40)])
def test_decode_attention_matches_rotary_scatter_and_sdpa(B, S, H, Hkv, D, kv_len):
    g = torch.Generator().manual_seed(B * 100 + S)
    T = 160
    q, k, v = (torch.randn(B, S, h, D, generator=g) for h in (H, Hkv, Hkv))
    positions = torch.stack([torch.arange(S) + p for p in torch.randint(0, kv_len - S, (B,), generator=g)])
    angles = positions[..., None].float() * torch.rand(D // 2, generator=g)
    rope = torch.polar(torch.ones_like(angles), angles)[:, :, None]  # [B, S, 1, D/2]
    cache = torch.randn(2, B + 1, Hkv, T, D, generator=g)
    expected_cache = cache[:, 1:].clone()
    expected = _reference_attention(q, k, v, rope, expected_cache[0], expected_cache[1], positions, kv_len)
    torch.set_num_threads(2)
    got = kernels.attention(q, k, v, rope, cache[0], cache[1], positions, slice(1, B + 1), kv_len)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[:, 1:], expected_cache, rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError):
        kernels.attention(q, k, v, rope, cache[0], cache[1], positions + T, slice(1, B + 1), kv_len)


def test_prefill_tiles_against_float64(monkeypatch):
    monkeypatch.setattr(quantized, "TILE_BYTES", 64 * 4 * 20)  # tiles of 20 rows: 101 rows end with a short one
    for fmt, group, offsets in FORMATS:
        w = random_weight(fmt, 101, 64, group=group, offsets=offsets)
        x = torch.randn(2, 150, 64)
        got = w.matmul(x)
        assert got.shape == (2, 150, 101)
        torch.testing.assert_close(got.double(), x.double() @ dense(w).T, rtol=1e-5, atol=1e-5)


def quantised_decoder():
    from imagebind_llm.llm.config import LLMConfig
    from imagebind_llm.llm.model import Transformer
    from imagebind_llm.llm.quantized import QuantizedLinear

    config = LLMConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, max_seq_len=64,
                       attn_bias=True)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    seed = 0
    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name, old in list(parent.named_children()):
                if isinstance(old, torch.nn.Linear):
                    seed += 1
                    fmt = "q8" if name in ("wv", "w2") else "q4_1"
                    bias = None if old.bias is None else torch.randn(old.out_features) * 0.1
                    w = random_weight(fmt, old.out_features, old.in_features, offsets=fmt == "q4_1", seed=seed)
                    setattr(parent, name, QuantizedLinear(w, bias))
    return model


@pytest.mark.parametrize("int8", [False, True])
def test_decode_steps_on_the_kernels_match_the_full_forward(int8):
    """Cached one-token steps (fused norm + q/k/v with biases, the attention kernel, fused SwiGLU, LM head
    with its norm) against the uncached forward (torch attention, tiled BLAS products), rows at different
    positions in cache rows 1:3, with an injection."""
    kernels.set_int8_activations(int8)
    model = quantised_decoder()
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    injections = [torch.randn(2, 1, 4, 16) * 0.5, None]
    with torch.inference_mode():
        expected = model(tokens, injections=injections)
        model.setup_caches(3, 32)
        prompt = torch.tensor([10, 14])  # per-row prompt lengths, then one token per step
        positions = torch.arange(14)
        model(tokens[:, :14], positions, injections=injections, cache_rows=slice(1, 3))
        steps = []
        for i in range(10):
            pos = torch.minimum(prompt + i, torch.tensor(23))[:, None]
            with kernels.decoding():  # (Transformer.forward enters it itself; here to check it nests)
                steps.append(model(tokens.gather(1, pos), pos, injections=injections, cache_rows=slice(1, 3))[:, 0])
    got = torch.stack(steps, 1)
    want = torch.stack([expected[0, 10:20], expected[1, 14:24]])
    # int8: the rounding of the activations (2 blocks per row here) compounds over the layers; the
    # products themselves are checked against the int8 algorithm above
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * float(want.abs().max()) if int8 else 1e-4)
