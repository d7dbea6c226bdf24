"""Decode speed of our decoder vs `transformers` `generate` on a GGUF model (CPU, float32).

All three read the same weights, by default the bundled SmolLM2-135M-Instruct GGUF (Q4_1 projections,
Q8_0 tied embedding; ``--model`` for another file):

* ``ours``: our decoder as `load_gguf` builds it by default, the projections kept in their Q4_1/Q8_0
  blocks and multiplied by the compiled kernels (float32 activations and accumulation);
* ``ours dense``: our decoder with every tensor dequantised to float32 (``quantized=False``);
* ``transformers``: `LlamaForCausalLM` from transformers' own GGUF loader (dequantised to float32).

On a GPU (``--device cuda``, optionally ``--dtype bfloat16 --compile``) both decoders are dense.

Each runs greedy on the same chat prompt for the same number of new tokens (``min_new_tokens`` on all
sides: EOS is suppressed until then), and all must produce identical tokens. Per batch size:

* prompt tok/s = ``B * prompt_len / t(1 new token)`` (the prefill, plus one sampling step),
* decode tok/s = ``B * (N - 1) / (t(N new tokens) - t(1 new token))``,

each the best of ``--repeats`` runs, alternating the implementations so that load from other processes
hits all alike. ``weights MB`` is what one decode step reads of weights and ``weights GB/s`` that times
steps/s: at batch 1 decoding is bound by memory traffic, which the quantised blocks cut 5x.

    python bench/decode.py [--new-tokens 64] [--batch-sizes 1 8] [--threads 2] [--model file.gguf]
                           [--device cuda --dtype bfloat16 --compile]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from imagebind_llm.llm import kernels
from imagebind_llm.llm.generate import generate
from imagebind_llm.llm.quantized import QuantizedLinear
from imagebind_llm.llm.weights.gguf import find_default_gguf, load_gguf

PROMPT = "What is the capital of France? Answer in one sentence, then name three famous landmarks there."
PEER = "transformers"


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def weight_bytes(model: nn.Module) -> int:
    """Bytes of distinct weight tensors (tied ones counted once; KV caches are not in the state dict)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a LLaMA-family .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU everything is dense)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile our decode step (GPU)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # the peer; imported late so HF_HUB_OFFLINE applies

    path = args.model or find_default_gguf()
    models = {"ours": load_gguf(path, dtype=dtype, device=args.device)[0]}
    if any(isinstance(m, QuantizedLinear) for m in models["ours"].modules()):  # else "ours" is dense already
        models["ours dense"] = load_gguf(path, dtype=dtype, device=args.device, quantized=False)[0]
    elif args.device == "cpu" and dtype == torch.float32:
        print(f"note: quantised kernels unavailable ({kernels.unavailable_reason()}); 'ours' is dense")
    models[PEER] = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype).to(args.device).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    n = args.new_tokens

    def run_ours(model: nn.Module, batch: int, new: int) -> list[list[int]]:
        completions = generate(model, [prompt] * batch, max_new_tokens=new, min_new_tokens=new,
                               stop_token_ids=[hf_tok.eos_token_id], compile=args.compile)
        return [c.tokens for c in completions]

    @torch.inference_mode()
    def run_peer(model: nn.Module, batch: int, new: int) -> list[list[int]]:
        ids = torch.tensor([prompt] * batch, device=args.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=hf_tok.eos_token_id)
        return out[:, len(prompt):].tolist()

    runs = {name: (lambda b, k, m=model, r=(run_peer if name == PEER else run_ours): r(m, b, k))
            for name, model in models.items()}
    for run in runs.values():
        run(1, 2)  # warm-up
    table, identical = [], True
    for batch in args.batch_sizes:
        best = {name: [float("inf"), float("inf"), None] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                t1, _ = timed(lambda: run(batch, 1))
                tn, out = timed(lambda: run(batch, n))
                best[name] = [min(best[name][0], t1), min(best[name][1], tn), out]
        speeds = {name: (batch * len(prompt) / t1, batch * (n - 1) / (tn - t1)) for name, (t1, tn, _) in best.items()}
        identical &= all(best[name][2] == best[PEER][2] for name in runs)
        table.append((batch, speeds))

    where = f"CPU, {torch.get_num_threads()} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"{path.name} on {where}, {args.dtype} activations{', compiled' if args.compile else ''}; "
          f"prompt {len(prompt)} tokens, {n} new tokens, greedy, best of {args.repeats}")
    sizes = {name: weight_bytes(model) for name, model in models.items()}
    header = f"{'batch':>5} | {'impl':<12} | {'prompt tok/s':>12} | {'decode tok/s':>12} | " \
             f"{'prompt ratio':>12} | {'decode ratio':>12} | {'weights MB':>10} | {'weights GB/s':>12}"
    print(header + "\n" + "-" * len(header))
    for batch, speeds in table:
        for name, (pp, dec) in speeds.items():
            pr, dr = (f"{pp / speeds[PEER][0]:.2f}x", f"{dec / speeds[PEER][1]:.2f}x") if name != PEER else ("", "")
            print(f"{batch:>5} | {name:<12} | {pp:>12.1f} | {dec:>12.1f} | {pr:>12} | {dr:>12} | "
                  f"{sizes[name] / 1e6:>10.0f} | {sizes[name] * dec / batch / 1e9:>12.1f}")
    print(f"greedy outputs identical: {identical}")
    print(f"sample: {hf_tok.decode(best[PEER][2][0])!r}")


if __name__ == "__main__":
    main()
