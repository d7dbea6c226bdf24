"""Decode speed of our decoder vs `transformers` `generate` on the embedded SmolLM2-135M (CPU, fp32).

Both models hold the same fp32 weights (dequantised from the bundled GGUF), run greedy on the same
chat prompt for the same number of new tokens (``min_new_tokens`` on both sides: EOS is suppressed
until then), and must produce identical tokens. For each implementation and batch size:

* prompt tok/s = ``B * prompt_len / t(1 new token)`` (the prefill, plus one sampling step),
* decode tok/s = ``B * (N - 1) / (t(N new tokens) - t(1 new token))``,

each the best of ``--repeats`` runs, alternating the two implementations. ``weights GB/s`` is the
parameter bytes read per decode step times steps/s: at batch 1 decoding is bound by memory bandwidth,
so this column shows how close each implementation gets to the machine's limit. Run: ``python bench/decode.py [--new-tokens 64]``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

from imagebind_llm.llm.generate import generate
from imagebind_llm.llm.weights.gguf import find_default_gguf, load_gguf

PROMPT = "What is the capital of France? Answer in one sentence, then name three famous landmarks there."


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # the peer; imported late so HF_HUB_OFFLINE applies

    path = find_default_gguf()
    ours, _ = load_gguf(path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    n = args.new_tokens

    def run_ours(batch: int, new: int) -> list[list[int]]:
        completions = generate(ours, [prompt] * batch, max_new_tokens=new, min_new_tokens=new,
                               stop_token_ids=[hf_tok.eos_token_id])
        return [c.tokens for c in completions]

    @torch.inference_mode()
    def run_theirs(batch: int, new: int) -> list[list[int]]:
        ids = torch.tensor([prompt] * batch)
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=hf_tok.eos_token_id)
        return out[:, len(prompt):].tolist()

    run_ours(1, 2), run_theirs(1, 2)  # warm-up
    rows, identical = [], True
    for batch in args.batch_sizes:
        # Alternate the implementations so that load from other processes hits both alike.
        times = {name: [float("inf"), float("inf"), None] for name in ("ours", "transformers")}
        for _ in range(args.repeats):
            for name, run in (("ours", run_ours), ("transformers", run_theirs)):
                t1, _ = timed(lambda: run(batch, 1))
                tn, out = timed(lambda: run(batch, n))
                times[name] = [min(times[name][0], t1), min(times[name][1], tn), out]
        result = {name: (batch * len(prompt) / t1, batch * (n - 1) / (tn - t1), out)
                  for name, (t1, tn, out) in times.items()}
        identical &= result["ours"][2] == result["transformers"][2]
        rows.append((batch, result))

    print(f"SmolLM2-135M fp32 on CPU ({torch.get_num_threads()} threads), prompt {len(prompt)} tokens, "
          f"{n} new tokens, greedy; best of {args.repeats}")
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    print(f"{'batch':>5} | {'impl':<12} | {'prompt tok/s':>12} | {'decode tok/s':>12} | {'weights GB/s':>12}")
    print("-" * 67)
    for batch, result in rows:
        for name, (pp, dec, _) in result.items():
            print(f"{batch:>5} | {name:<12} | {pp:>12.1f} | {dec:>12.1f} | {weight_bytes * dec / batch / 1e9:>12.1f}")
        pp_ratio = result["ours"][0] / result["transformers"][0]
        dec_ratio = result["ours"][1] / result["transformers"][1]
        print(f"{batch:>5} | {'ratio':<12} | {pp_ratio:>11.2f}x | {dec_ratio:>11.2f}x |")
    print(f"greedy outputs identical: {identical}")
    print(f"sample (batch 1, ours): {hf_tok.decode(rows[0][1]['ours'][2][0])!r}")


if __name__ == "__main__":
    main()
