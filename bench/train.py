"""Training-step throughput per stage, with the frozen ImageBind in the step vs. from the feature cache.

Times the recipe's real optimiser step (`imagebind_llm.train.loop.train_step` over `TrainStep`, AdamW
with the official groups; median over steps alternating between the two variants) on synthetic batches
of full-length sequences (stage 1: ``max_words`` 96, stage 2: 512) and reports samples/s, tokens/s and
the speed-up of training from pre-extracted features (``data.features``: the encoder is skipped) over
encoding the images in every step. On CUDA it runs under bf16 autocast and adds the model-FLOPs
utilisation against ``--peak-tflops``.

Model FLOPs per step: decoder ``4 * N_dec * tokens`` (forward, and the backward to activations only: the
base is frozen; LoRA weight gradients are negligible) plus, without the cache, the encoder forward
``2 * N_vision * 257 * images``; attention score FLOPs are left out.

    python bench/train.py        # CPU: tiny (test fixtures), demo (SmolLM2-135M + small ImageBind)
    python bench/train.py --configs demo --encoder huge --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from imagebind_llm.encoders import ImageBind, ImageBindConfig
from imagebind_llm.model import ImageBindLLM, ModelSpec, create_model
from imagebind_llm.train.loop import TrainStep, train_step
from imagebind_llm.train.optim import build_optimizer

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
STAGES = {1: ("pretrain", 96), 2: ("finetune", 512)}


def build(config: str, encoder_size: str, phase: str) -> ImageBindLLM:
    """``tiny``: the fixture LLaMA (dim 64) + small ImageBind; ``demo``: SmolLM2-135M + a small ImageBind.
    ``encoder_size="huge"`` swaps in a randomly initialised ImageBind-huge (no point branch)."""
    huge = encoder_size == "huge"
    if config == "tiny":
        spec = ModelSpec(llm=FIXTURES / "adapter" / "llama" / "base", phase=phase,
                         imagebind=None if huge else FIXTURES / "imagebind" / "imagebind_small.pth",
                         imagebind_config=FIXTURES / "imagebind" / "imagebind_small.json")
    else:
        spec = ModelSpec(name="tiny-random", phase=phase)
    spec = spec.replace(quantized=False)  # training multiplies by dense weights, as the recipes do
    model = create_model(spec.replace(feature_dim=1024) if huge else spec)
    if huge:
        model.encoder = ImageBind(ImageBindConfig.huge(with_point=False)).eval().requires_grad_(False)
    return model


def model_flops(model: ImageBindLLM, tokens: int, images: int) -> float:
    dec = sum(p.numel() for n, p in model.llm.named_parameters() if "tok_embeddings" not in n)
    vision = sum(p.numel() for n, p in model.encoder.named_parameters() if "vision" in n)
    return 4 * dec * tokens + 2 * vision * 257 * images


def make_inputs(model: ImageBindLLM, stage: int, batch: int, cached: bool) -> dict[str, torch.Tensor]:
    length = STAGES[stage][1]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.llm.config.vocab_size, (batch, length), generator=g)
    labels = tokens.clone()
    labels[:, : length // 4] = 0  # the prompt part
    inputs = {"tokens": tokens, "labels": labels, "has_media": torch.ones(batch, dtype=torch.bool)}
    if cached:
        features = torch.randn(batch, model.config.feature_dim, generator=g)
        inputs["features"] = torch.nn.functional.normalize(features, dim=-1)
    else:
        inputs["images"] = torch.randn(batch, 3, 224, 224, generator=g)
    return inputs


def bench(model: ImageBindLLM, stage: int, batch: int, device: torch.device, steps: int,
          peak_tflops: float | None) -> list[dict]:
    """Time encoder and cache steps alternately (so load drift hits both alike); median step time of each."""
    module = TrainStep(model).train()
    optimizer = build_optimizer(module, 1e-4, 0.05)
    amp = torch.bfloat16 if device.type == "cuda" else None
    variants = {cached: make_inputs(model, stage, batch, cached) for cached in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(steps + 1):
        for cached, inputs in variants.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(module, optimizer, [inputs], device=device, amp_dtype=amp)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round is warm-up
                times[cached].append(time.perf_counter() - t0)
    rows = []
    length = STAGES[stage][1]
    for cached, samples in times.items():
        seconds = statistics.median(samples)
        row = {"stage": stage, "batch": batch, "tokens": length, "features": "cache" if cached else "encoder",
               "samples_s": batch / seconds, "tokens_s": batch * length / seconds, "step_ms": seconds * 1e3}
        if peak_tflops:
            row["mfu"] = model_flops(model, batch * length, 0 if cached else batch) / seconds / (peak_tflops * 1e12)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,demo", help="comma list of tiny, demo")
    parser.add_argument("--encoder", choices=["config", "huge"], default="config",
                        help="'huge' swaps in the full ImageBind-huge vision tower (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak (H100 SXM bf16 dense: 989)")
    args = parser.parse_args()
    device = torch.device(args.device)
    peak = args.peak_tflops if device.type == "cuda" else None
    print(f"device {device}, batch {args.batch}, {args.steps} timed steps, encoder {args.encoder}")
    header = (f"{'config':6} {'stage':>5} {'tokens':>6} {'features':>8} {'samples/s':>10} {'tokens/s':>10} "
              f"{'step ms':>9}")
    print(header + (f" {'MFU':>6}" if peak else "") + f" {'cache speed-up':>15}")
    for config in args.configs.split(","):
        for stage in map(int, args.stages.split(",")):
            model = build(config, args.encoder, STAGES[stage][0]).to(device)
            rows = bench(model, stage, args.batch, device, args.steps, peak)
            for row in rows:
                line = (f"{config:6} {row['stage']:>5} {row['tokens']:>6} {row['features']:>8} "
                        f"{row['samples_s']:>10.2f} {row['tokens_s']:>10.0f} {row['step_ms']:>9.1f}")
                line += f" {row['mfu']:>6.1%}" if peak else ""
                speedup = rows[0]["step_ms"] / rows[1]["step_ms"]
                print(line + (f" {speedup:>14.2f}x" if row["features"] == "cache" else ""))


if __name__ == "__main__":
    main()
