"""Multimodal request latency of ImageBind-LLM on the embedded tiny model (``"tiny-random"``), stage by stage.

For batch 1 and 8 (image + audio per request): media decoding, ImageBind encoding, bind network and
injection terms, prefill, and decode tokens/s. Peers measured in the same run: the same requests
served one at a time (batching speed-up), and the plain LLM without media (cost of the injection).

    python bench/generate.py [--batch-sizes 1,8] [--new-tokens 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from imagebind_llm.llm.generate import generate_tokens
from imagebind_llm.model.factory import create_model
from imagebind_llm.model.media import load_media

MEDIA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "media"
QUESTION = "Guess the girl's mood based on the background music and explain the reason."


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def decode_steps(model, prompts, injections, new_tokens: int, device: str) -> tuple[float, float]:
    """(seconds to the first token, seconds per later step) with greedy decoding of `new_tokens` tokens."""
    steps = generate_tokens(model.llm, prompts, max_new_tokens=new_tokens, injections=injections)
    _sync(device)
    start = time.perf_counter()
    next(steps)
    _sync(device)
    first = time.perf_counter() - start
    for _ in steps:
        pass
    _sync(device)
    return first, (time.perf_counter() - start - first) / max(new_tokens - 1, 1)


@torch.inference_mode()
def bench_batch(model, batch: int, new_tokens: int, device: str) -> dict[str, float]:
    files = {"image": MEDIA / "girl.jpg", "audio": MEDIA / "girl_bgm.wav"}
    media, t_media = timed(lambda: [load_media(files) for _ in range(batch)], device)
    media = [{k: (v.to(device), w) for k, (v, w) in m.items()} for m in media]
    stacked = {k: (torch.cat([m[k][0] for m in media]), 1.0) for k in files}
    mixed, t_encoder = timed(lambda: model.mix_features(stacked), device)
    injections, t_bind = timed(lambda: model.injections(model.bind(mixed.unsqueeze(1))), device)
    prompt = model.tokenizer.encode(QUESTION, bos=model.tokenizer.add_bos)
    prompts = [prompt] * batch
    decode_steps(model, prompts, injections, 2, device)  # warm-up
    first, per_step = decode_steps(model, prompts, injections, new_tokens, device)
    _, plain_step = decode_steps(model, prompts, None, new_tokens, device)
    single_first, single_step = decode_steps(model, [prompt], [t[:1] if t is not None else None for t in injections],
                                             new_tokens, device)
    return dict(media=t_media, encoder=t_encoder, bind=t_bind, prefill=first, tok_s=batch / per_step,
                plain_tok_s=batch / plain_step, sequential_tok_s=1 / single_step, prompt=len(prompt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    model = create_model("tiny-random", dtype=args.dtype, device=args.device)
    print(f"tiny-random (SmolLM2-135M + small random ImageBind, {args.dtype}) on {args.device}, "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens, image + audio per request\n")
    header = ("batch", "media ms", "encoder ms", "bind ms", "prefill ms", "decode tok/s", "plain LLM tok/s",
              "injection cost", "one-by-one tok/s", "batching gain")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for batch in map(int, args.batch_sizes.split(",")):
        r = bench_batch(model, batch, args.new_tokens, args.device)
        row = (batch, f"{r['media'] * 1e3:.0f}", f"{r['encoder'] * 1e3:.0f}", f"{r['bind'] * 1e3:.1f}",
               f"{r['prefill'] * 1e3:.0f}", f"{r['tok_s']:.1f}", f"{r['plain_tok_s']:.1f}",
               f"{r['plain_tok_s'] / r['tok_s']:.2f}x", f"{r['sequential_tok_s']:.1f}",
               f"{r['tok_s'] / r['sequential_tok_s']:.2f}x")
        print(" | ".join(map(str, row)))


if __name__ == "__main__":
    main()
