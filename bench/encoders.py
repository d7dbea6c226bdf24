"""Throughput of the ImageBind-huge encoder (+ Point-BERT branch) per modality, random weights.

For every device / dtype / modality / batch size it times ``model({modality: x})`` and, as the peer
measured in the same run, the same tower with every attention layer swapped for the official
formulation (``torch.nn.MultiheadAttention``, sequence-first, additive float causal mask) sharing
the same weight tensors. Only one tower is materialised at a time (the rest stay on the meta
device), so "weights MiB" is that tower's parameters and "peak MiB" the peak during its forward passes
(CPU: process RSS high-water mark via /proc, interpreter and weights included; CUDA:
``max_memory_allocated``, weights included).

    python bench/encoders.py                 # quick: CPU fp32+bf16, batch 1 and 8, GPU too if present
                                             # (CPU rows over --heavy: one iteration, no peer)
    python bench/encoders.py --full          # more iterations
    python bench/encoders.py --devices cuda --batches 1,8,32 --dtypes fp32,bf16,fp16
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from imagebind_llm.encoders import ImageBind, ImageBindConfig
from imagebind_llm.encoders.config import IMU_CHANNELS, IMU_LENGTH, LOGIT_SCALE_INIT, TEXT_CONTEXT
from imagebind_llm.encoders.layers import Attention, Block

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu", "point")
EOT = 49407


def make_input(modality: str, batch: int, cfg: ImageBindConfig, g: torch.Generator) -> torch.Tensor:
    """A random input of the shape the preprocessors produce (audio: 3 clips; point: 8192 points)."""
    if modality == "vision":
        return torch.randn(batch, 3, 224, 224, generator=g)
    if modality == "text":
        ids = torch.randint(1, EOT - 1, (batch, TEXT_CONTEXT), generator=g)
        ids[:, 0], ids[:, 20], ids[:, 21:] = EOT - 1, EOT, 0  # SOT, 19 tokens, EOT, padding
        return ids
    if modality == "audio":
        return torch.randn(batch, 3, 1, cfg.audio_num_mel_bins, cfg.audio_target_len, generator=g)
    if modality in ("depth", "thermal"):
        return torch.randn(batch, 1, 224, 224, generator=g)
    if modality == "imu":
        return torch.randn(batch, IMU_CHANNELS, IMU_LENGTH, generator=g)
    pts = torch.randn(batch, 8192, 3, generator=g)
    return pts / pts.norm(dim=-1).amax(dim=1, keepdim=True)[..., None]


@torch.no_grad()
def fast_init(tower: nn.Module, modality: str) -> None:
    """Cheap random init: N(0, 0.02) matrices, unit norms, zero biases (no trunc_normal over 1.2B params)."""
    for name, t in list(tower.named_parameters()) + list(tower.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "log_logit_scale":
            t.fill_(math.log(LOGIT_SCALE_INIT[modality]))
        elif leaf in ("running_var",) or (t.ndim == 1 and leaf == "weight"):
            t.fill_(1.0)
        elif leaf in ("bias", "running_mean", "num_batches_tracked"):
            t.zero_()
        else:
            t.normal_(0.0, 0.02)


class MHAPeer(nn.Module):
    """The official attention: ``nn.MultiheadAttention`` (sequence-first) over the same weight tensors."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        dim = attn.qkv.in_features
        self.mha = nn.MultiheadAttention(dim, attn.num_heads, add_bias_kv=attn.bias_k is not None, device="meta")
        self.mha.in_proj_weight = attn.qkv.weight
        self.mha.in_proj_bias = attn.qkv.bias if attn.qkv.bias is not None else nn.Parameter(
            torch.zeros(3 * dim, device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype))
        self.mha.out_proj.weight, self.mha.out_proj.bias = attn.proj.weight, attn.proj.bias
        if attn.bias_k is not None:
            self.mha.bias_k, self.mha.bias_v = attn.bias_k, attn.bias_v

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x.transpose(0, 1)
        mask = None
        if causal:
            n = x.shape[0]
            mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        return self.mha(x, x, x, need_weights=False, attn_mask=mask)[0].transpose(0, 1)


@contextmanager
def peer_attention(tower: nn.Module):
    blocks = [m for m in tower.modules() if isinstance(m, Block)]
    originals = [b.attn for b in blocks]
    for b in blocks:
        b.attn = MHAPeer(b.attn)
    try:
        yield
    finally:
        for b, a in zip(blocks, originals):
            b.attn = a


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory in MiB during a block: CUDA ``max_memory_allocated``, or on CPU the process RSS
    high-water mark (reset on entry through /proc/self/clear_refs; includes the interpreter and weights)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.mib = device, float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mib = _rss_kib("VmHWM:") / 1024


def time_call(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Mean seconds per call."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def bench(args: argparse.Namespace) -> list[dict]:
    cfg = ImageBindConfig.huge()
    with torch.device("meta"):
        model = ImageBind(cfg)
    rows = []
    g = torch.Generator().manual_seed(0)
    for dev_name in args.devices:
        device = torch.device(dev_name)
        for dtype_name in args.dtypes:
            for modality in args.modalities:
                tower = model.towers[modality]
                tower.to_empty(device=device).to(DTYPES[dtype_name])
                fast_init(tower, modality)
                weights_mib = sum(t.numel() * t.element_size() for t in tower.state_dict().values()) / 2**20
                for batch in args.batches:
                    x = make_input(modality, batch, cfg, g).to(device)
                    heavy = device.type == "cpu" and batch * _cost(modality) > args.heavy
                    warmup, iters = (0, 1) if heavy else (args.warmup, args.iters)
                    with torch.inference_mode():
                        with PeakMemory(device) as mem:
                            ours = time_call(lambda: model({modality: x}), device, warmup, iters)
                        peer = float("nan")
                        if args.peer and not heavy:
                            with peer_attention(tower):
                                peer = time_call(lambda: model({modality: x}), device, warmup, iters)
                    rows.append(dict(device=dev_name, dtype=dtype_name, modality=modality, batch=batch,
                                     ms=ours * 1e3, per_s=batch / ours, peer_ms=peer * 1e3,
                                     ratio=peer / ours, weights=weights_mib, mem=mem.mib, iters=iters))
                    print(_fmt(rows[-1]), flush=True)
                tower.to_empty(device="meta")
    return rows


def _cost(modality: str) -> float:
    """Relative cost of one sample (vision = 1), for deciding when one timed iteration is enough."""
    return {"vision": 1.0, "text": 0.15, "audio": 0.35, "depth": 0.03, "thermal": 0.1, "imu": 0.03,
            "point": 0.1}[modality]


HEADER = (f"{'device':<6} {'dtype':<5} {'modality':<8} {'batch':>5} {'ms/iter':>10} {'samples/s':>10} "
          f"{'MHA peer ms':>12} {'peer/ours':>9} {'weights MiB':>11} {'peak MiB':>9} {'iters':>5}")


def _fmt(r: dict) -> str:
    return (f"{r['device']:<6} {r['dtype']:<5} {r['modality']:<8} {r['batch']:>5} {r['ms']:>10.1f} "
            f"{r['per_s']:>10.2f} {r['peer_ms']:>12.1f} {r['ratio']:>9.2f} {r['weights']:>11.0f} {r['mem']:>9.0f} {r['iters']:>5}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--modalities", default=",".join(MODALITIES))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--full", action="store_true", help="3 warm-up + 10 timed iterations (default 1 + 1)")
    p.add_argument("--no-peer", dest="peer", action="store_false", help="skip the nn.MultiheadAttention peer")
    p.add_argument("--heavy", type=float, default=2.0,
                   help="CPU rows costing more than this many vision images get 0 warm-up, 1 iteration, no peer")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    args = p.parse_args()
    for key in ("devices", "dtypes", "modalities"):
        setattr(args, key, getattr(args, key).split(","))
    args.batches = [int(b) for b in args.batches.split(",")]
    args.warmup, args.iters = (3, 10) if args.full else (1, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"ImageBind-huge + Point-BERT, random weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in args.devices else ""))
    print("ours = F.scaled_dot_product_attention; peer = nn.MultiheadAttention (official formulation), "
          "same weights; peer/ours > 1 means ours is faster")
    print(HEADER)
    t0 = time.perf_counter()
    rows = bench(args)
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s)\n{HEADER}")
    for r in rows:
        print(_fmt(r))


if __name__ == "__main__":
    main()
