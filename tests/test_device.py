"""Checks that need a GPU (marker ``device``): the encoder and the decoder in low precision against float32,
``torch.compile``d generation against eager, training steps under bf16 autocast, GPU FAISS search.

Without CUDA they skip (tests/conftest.py gives the reason); ``IMAGEBIND_LLM_TEST_DEVICE=cpu`` runs them on the
CPU with tiny shapes, to keep their logic honest where there is no GPU. ``bash bench/device_check.sh`` runs them
with the GPU benches.

The truth is float32 on the same device with TF32 off. Errors are relative, ``|out - ref| / |ref|`` per row, in
units of the format's ``eps = torch.finfo(dtype).eps``, the gap between 1 and the next number: 2^-7 for bf16
(8 significant bits), 2^-10 for fp16 (11). One rounding costs at most eps/2; a network rounds at every
operation, and the errors of a residual stack grow about as sqrt(depth): measured on the CPU, 0.8-1.2 eps with 2
to 8 layers, so about 3.5 eps at the 32 blocks of ImageBind-huge's vision tower. ``LOW = 6 eps`` keeps a margin
over that; a real fault (a wrong cast, an fp16 overflow, a mis-scaled softmax) gives errors of order 1.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from imagebind_llm.encoders import ImageBind
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.generate import decode_one_token, generate, pad_right, prefill
from imagebind_llm.llm.model import Transformer
from imagebind_llm.train.loop import TrainStep, train_step
from imagebind_llm.train.optim import build_optimizer

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))  # appended: it shadows nothing
from device_bench import bench_module, encoder_config  # noqa: E402

pytestmark = pytest.mark.device

LOW = 6  # tolerance in eps for bf16 / fp16 against float32 (see above)
# float32 compiled vs eager: the compiler reorders sums (fused norms, softmax), which moves results by a few eps
# per reduction of thousands of terms; 1e-5 (~80 eps) is far above that and far below any real fault.
FP32_REORDERED = 1e-5


def tolerance(dtype: torch.dtype) -> float:
    return FP32_REORDERED if dtype == torch.float32 else LOW * torch.finfo(dtype).eps


def rel_err(out: Tensor, ref: Tensor) -> float:
    """Largest ``|out - ref| / |ref|`` over the rows (last dimension) of two ``[..., D]`` tensors."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Float32 matmuls and convolutions in full precision (no TF32) on CUDA, for the reference.

    Through the legacy flags: setting cuDNN's newer ``fp32_precision`` makes torch raise where it later reads them."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def small(device: torch.device) -> bool:
    """Tiny shapes off the GPU (IMAGEBIND_LLM_TEST_DEVICE=cpu)."""
    return device.type == "cpu"


def decoder_config(device: torch.device, layers: int) -> LLMConfig:
    """The ``tiny`` test decoder on the CPU; on a GPU LLaMA-7B's widths with ``layers`` of its 32 layers."""
    if small(device):
        return LLMConfig.from_name("tiny", max_seq_len=64)
    return LLMConfig.from_name("llama-7b", n_layers=layers, max_seq_len=256)


def random_decoder(device: torch.device, layers: int) -> Transformer:
    with torch.device(device):
        torch.manual_seed(0)
        return Transformer(decoder_config(device, layers)).eval()


# ---------------------------------------------------------------------------------------------- encoder
@pytest.fixture(scope="module")
def fp32_encoder(target_device: torch.device) -> ImageBind:
    """ImageBind-huge (CPU: the demo's small ImageBind) without the point branch, random float32 weights."""
    with torch.device(target_device):
        torch.manual_seed(0)
        return ImageBind(encoder_config("demo" if small(target_device) else "huge"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_encoder_in_low_precision_matches_fp32(fp32_encoder: ImageBind, dtype: torch.dtype) -> None:
    make_input = bench_module("encoders").make_input
    g = torch.Generator().manual_seed(0)
    inputs = {m: make_input(m, 2, fp32_encoder.config, g) for m in fp32_encoder.modalities}
    with torch.inference_mode(), exact_fp32():
        want = fp32_encoder(inputs)
    with torch.inference_mode():
        got = copy.deepcopy(fp32_encoder).to(dtype)(inputs)
    errors = {m: rel_err(got[m], want[m]) for m in inputs}
    assert max(errors.values()) < tolerance(dtype), errors


# ---------------------------------------------------------------------------------------------- decoder
def test_decoder_bf16_logits_match_fp32(target_device: torch.device) -> None:
    reference = random_decoder(target_device, layers=4)
    low = copy.deepcopy(reference).to(torch.bfloat16)
    tokens = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(target_device)
    with torch.inference_mode(), exact_fp32():
        want = reference(tokens)
    with torch.inference_mode():
        got = low(tokens)
        low.setup_caches(2, 32)  # the generation path: a prompt of 16, then 8 more tokens through the static cache
        cached = torch.cat([low(tokens[:, :16], torch.arange(16, device=target_device)),
                            low(tokens[:, 16:], torch.arange(16, 24, device=target_device))], dim=1)
    assert rel_err(got, want) < tolerance(torch.bfloat16)
    assert rel_err(cached, want) < tolerance(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- compiled generation
@torch.inference_mode()
def step_logits(model: Transformer, prompts: list[list[int]], fed: Tensor, step: Callable[..., Tensor]) -> Tensor:
    """Logits ``[B, n, V]`` of the ``n`` greedy steps when tokens ``fed`` ``[B, n]`` are fed back (the same inputs
    for the eager and the compiled step; KV cache sized as `generate` sizes it, so no recompilation)."""
    tokens, lengths = pad_right(prompts, fed.device)
    model.setup_caches(len(prompts), tokens.shape[1] + fed.shape[1])
    logits = [prefill(model, tokens, lengths)]
    positions = lengths.clone()
    for i in range(fed.shape[1] - 1):
        logits.append(step(model, fed[:, i], positions))
        positions += 1
    return torch.stack(logits, dim=1).float()


def decided_steps(want: Tensor, got: Tensor) -> list[int]:
    """Per row, how many leading steps have an argmax that the difference ``got - want`` cannot flip
    (top-2 margin of ``want`` over twice the row's largest difference)."""
    top2 = want.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]  # [B, n]
    clear = margin > 2 * (got - want).abs().amax(dim=(1, 2))[:, None]
    return [int(row.long().cumprod(0).sum()) for row in clear]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_generation_with_static_cache_matches_eager(target_device: torch.device, dtype: torch.dtype) -> None:
    model = random_decoder(target_device, layers=2).to(dtype)
    prompts = [[1, 5, 9, 17, 33, 2, 8], [1, 3, 4]]  # different lengths: right padding, per-row positions
    n = 6 if small(target_device) else 16
    with exact_fp32():
        eager = [c.tokens for c in generate(model, prompts, max_new_tokens=n, stop_token_ids=[])]
        compiled = [c.tokens for c in generate(model, prompts, max_new_tokens=n, stop_token_ids=[], compile=True)]
        fed = torch.tensor(eager, device=target_device)
        want = step_logits(model, prompts, fed, decode_one_token)
        got = step_logits(model, prompts, fed, torch.compile(decode_one_token, dynamic=False))
    assert rel_err(got, want) < tolerance(dtype)
    decided = decided_steps(want, got)
    if dtype == torch.float32:
        assert decided == [n] * len(prompts), "float32 greedy steps too close to call"
    for row, k in enumerate(decided):  # bf16: a near-tie of random weights may go either way after step k
        assert compiled[row][:k] == eager[row][:k], (row, k, compiled[row], eager[row])


# ---------------------------------------------------------------------------------------------- training
def test_training_steps_under_bf16_autocast_track_fp32(target_device: torch.device) -> None:
    train_bench = bench_module("train")
    model = train_bench.build("tiny", "config", "pretrain").to(target_device)  # fixture LLaMA + small ImageBind
    batch = train_bench.make_inputs(model, 1, 4, cached=False)  # stage 1: images through the frozen encoder
    losses = {}
    for amp in (None, torch.bfloat16):
        trained = copy.deepcopy(model)
        module = TrainStep(trained).train()
        optimizer = build_optimizer(module, 1e-3, 0.05)
        frozen = {n: p.detach().clone() for n, p in trained.named_parameters() if not p.requires_grad}
        start = {n: p.detach().clone() for n, p in trained.adapter_params().items()}
        with exact_fp32():
            losses[amp] = [train_step(module, optimizer, [batch], device=target_device, amp_dtype=amp)
                           for _ in range(4)]
        params = dict(trained.named_parameters())
        assert all(torch.equal(params[n], p) for n, p in frozen.items()), "a frozen weight moved"
        assert all(p.dtype == torch.float32 for p in trained.adapter_params().values())  # autocast keeps fp32 masters
        assert any(not torch.equal(p, start[n]) for n, p in trained.adapter_params().items())
        assert losses[amp][-1] < losses[amp][0], losses[amp]
    # The loss averages ~300 tokens' log-probabilities, computed in float32 from bf16 logits: rounding averages
    # out (1e-4 relative seen on the CPU); 1e-2 still catches a broken step (inf, NaN, a wrong cast: order 1).
    fp32, bf16 = losses[None], losses[torch.bfloat16]
    assert all(abs(b - f) <= 1e-2 * abs(f) for f, b in zip(fp32, bf16)), (fp32, bf16)


# ---------------------------------------------------------------------------------------------- GPU FAISS
def test_faiss_gpu_search_matches_cpu(target_device: torch.device) -> None:
    faiss = pytest.importorskip("faiss", reason="faiss is not installed")
    if getattr(faiss, "__stubbed__", False):
        pytest.skip("faiss is not installed here (a stand-in from bench/device_bench.py)")
    if target_device.type != "cuda" or not hasattr(faiss, "index_cpu_to_all_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("needs GPU FAISS (faiss-gpu) and a GPU: this faiss has no GPU support or sees no GPU")
    from imagebind_llm.cache import FeatureCache

    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(20000, 1024, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(64, 1024, generator=g), dim=-1)
    built = FeatureCache.from_vectors(vectors, factory="Flat", keep_vectors=None)
    cpu = FeatureCache(built.index, built.meta, use_gpu=False)
    gpu = FeatureCache(built.index, built.meta, use_gpu=True)
    (cpu_sims, cpu_ids), (gpu_sims, gpu_ids) = cpu.search(queries, 10), gpu.search(queries, 10)
    assert (cpu_ids == gpu_ids).mean() > 0.99  # exact search: only near-ties may swap
    assert abs(cpu_sims - gpu_sims).max() < 1e-4
    assert rel_err(gpu(queries), cpu(queries)) < 1e-4  # the official blend through the GPU index
