"""Decode speed of our decoder vs llama.cpp and `transformers` on a GGUF model (CPU, float32).

All read the same weights, by default the bundled SmolLM2-135M-Instruct GGUF (Q4_1 projections, Q8_0
tied embedding; ``--model`` for another file):

* ``ours``: our decoder as `load_gguf` builds it by default, the projections kept in their Q4_1/Q8_0
  blocks and multiplied by the compiled kernels (float32 accumulation; float32 activations, or int8 per
  32-block for weights at least `kernels.INT8_AUTO_MIN_K` inputs wide, as llama.cpp does);
* ``ours int8``: the same with the kernels rounding every activation to int8 per 32-block
  (`kernels.set_int8_activations(True)`);
* ``ours dense``: our decoder with every tensor dequantised to float32 (``quantized=False``);
* ``llama.cpp``: llama-cpp-python on the same file, in a worker process (`common.LlamaPeer`): the rows
  of a batch decoded together as one sequence each, greedy on its logits, its extra weight buffers off
  (``--llama-extra-bufts`` keeps them; llama-cpp-python 0.3.36 crashes with them on AMX CPUs);
* ``transformers``: `LlamaForCausalLM` from transformers' own GGUF loader (dequantised to float32).

On a GPU (``--device cuda``, optionally ``--dtype bfloat16 --compile``) both our decoders are dense and
llama.cpp (a CPU build) is left out. ``--synthetic-7b L`` measures LLaMA-7B's shapes instead (dim 4096,
32 heads, SwiGLU 11008, untied Q8_0 output): a GGUF of ``L`` such layers with random Q4_1 weights and the
bundled model's tokenizer (vocabulary 49152), written to a temporary file (~130 MB per layer; its answers
are noise, and near-ties may make the implementations' tokens differ; ``--skip dense transformers``
spares the float32 copies, 800 MB per layer).

Each runs greedy on the same chat prompt (``--prompt-tokens N``: the question repeated to at least N
tokens) for the same number of new tokens (EOS is suppressed until then on all sides), with the same
number of threads. Per batch size:

* prompt tok/s = ``B * prompt_len / t(1 new token)`` (the prefill, plus one sampling step),
* decode tok/s = ``B * (N - 1) / (t(N new tokens) - t(1 new token))``,

each the best of ``--repeats`` runs, alternating the implementations so that load from other processes
hits all alike; the ratios compare each with llama.cpp (and transformers) in the same run. ``weights MB``
is what one decode step reads of weights (llama.cpp: the file) and ``weights GB/s`` that times steps/s.
``--contend N`` runs N busy-loop neighbour processes during the measurements. The tokens of every
implementation are compared with ours (float arithmetic in other orders may flip a near-tie).

    python bench/decode.py [--new-tokens 64] [--batch-sizes 1 4] [--threads 2] [--model file.gguf]
                           [--synthetic-7b LAYERS] [--prompt-tokens N] [--contend N] [--skip dense transformers ...]
                           [--llama-wait-policy PASSIVE] [--device cuda --dtype bfloat16 --compile]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from common import LlamaPeer, contend
from imagebind_llm.llm import kernels
from imagebind_llm.llm.generate import generate
from imagebind_llm.llm.quantized import QuantizedLinear
from imagebind_llm.llm.weights.gguf import find_default_gguf, load_gguf

PROMPT = "What is the capital of France? Answer in one sentence, then name three famous landmarks there."
LLAMA, HF = "llama.cpp", "transformers"
OPTIONAL = ("int8", "dense", LLAMA, HF)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of distinct weight tensors (tied ones counted once; KV caches are not in the state dict)."""
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())


def synthetic_7b(layers: int, path: Path, tokenizer_source: Path) -> Path:
    """Write a GGUF of ``layers`` LLaMA-7B-shaped layers (random Q4_1 projections, Q8_0 embedding and
    output, unit norms) with the tokenizer of ``tokenizer_source``; returns ``path``."""
    dim, hidden, heads, rng = 4096, 11008, 32, np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, field in gguf.GGUFReader(tokenizer_source).fields.items():
        if name.startswith("tokenizer."):
            writer.add_key_value(name, field.contents(), field.types[0], field.types[-1] if len(field.types) > 1 else None)
    vocab = len(gguf.GGUFReader(tokenizer_source).fields["tokenizer.ggml.tokens"].contents())
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)

    def blocks(n: int, k: int, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        """Random blocks with values of standard deviation ~1/sqrt(k) (zero mean)."""
        nb = k // 32
        if qtype == gguf.GGMLQuantizationType.Q4_1:  # d, m (float16), 16 bytes of nibbles
            d = np.full((n, nb, 1), 1 / (4.6 * k ** 0.5), np.float16)
            head = np.concatenate([d, (-7.5 * d).astype(np.float16)], -1).view(np.uint8)
            return np.concatenate([head, rng.integers(0, 256, (n, nb, 16), np.uint8)], -1).reshape(n, -1)
        d = np.full((n, nb, 1), 1 / (73 * k ** 0.5), np.float16).view(np.uint8)  # Q8_0: d, 32 int8
        return np.concatenate([d, rng.integers(0, 256, (n, nb, 32), np.uint8)], -1).reshape(n, -1)

    q4, q8 = gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("token_embd.weight", blocks(vocab, dim, q8), raw_dtype=q8)
    writer.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    writer.add_tensor("output.weight", blocks(vocab, dim, q8), raw_dtype=q8)
    for i in range(layers):
        for role, (n, k) in {"attn_q": (dim, dim), "attn_k": (dim, dim), "attn_v": (dim, dim),
                             "attn_output": (dim, dim), "ffn_gate": (hidden, dim), "ffn_up": (hidden, dim),
                             "ffn_down": (dim, hidden)}.items():
            writer.add_tensor(f"blk.{i}.{role}.weight", blocks(n, k, q4), raw_dtype=q4)
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def chat_prompt(tokenizer, min_tokens: int) -> list[int]:
    """The chat-templated question, its text repeated until the prompt has at least ``min_tokens`` tokens."""
    for repeat in range(1, 10_000):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": " ".join([PROMPT] * repeat)}],
                                            add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if len(ids) >= min_tokens:
            return ids
    raise ValueError(f"cannot make a prompt of {min_tokens} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="threads of every implementation "
                        "(default: torch's choice)")
    parser.add_argument("--model", type=Path, default=None,
                        help="a LLaMA-family .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--synthetic-7b", type=int, default=0, metavar="LAYERS",
                        help="LLaMA-7B-shaped layers with random Q4_1 weights instead of --model (see above)")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="repeat the question to at least this many")
    parser.add_argument("--contend", type=int, default=0, help="busy-loop neighbour processes during the runs")
    parser.add_argument("--skip", nargs="*", default=[], choices=OPTIONAL, help="implementations to leave out")
    parser.add_argument("--llama-wait-policy", default=None,
                        help="OMP_WAIT_POLICY for llama.cpp's process only (default: as in this environment)")
    parser.add_argument("--llama-extra-bufts", action="store_true",
                        help="let llama.cpp use its extra weight buffers (AMX, repacking; crashes 0.3.36 on AMX CPUs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on a GPU everything is dense)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile our decode step (GPU)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # a peer; imported late so HF_HUB_OFFLINE applies

    path = args.model or find_default_gguf()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if args.synthetic_7b:
        scratch = tempfile.TemporaryDirectory(prefix="decode-7b-")
        path = synthetic_7b(args.synthetic_7b, Path(scratch.name) / f"llama7b-shaped-{args.synthetic_7b}L.gguf", path)
    prompt = chat_prompt(hf_tok, args.prompt_tokens)
    n, eos = args.new_tokens, hf_tok.eos_token_id

    models = {"ours": load_gguf(path, dtype=dtype, device=args.device)[0]}
    quantised = any(isinstance(m, QuantizedLinear) for m in models["ours"].modules())
    if not quantised and args.device == "cpu" and dtype == torch.float32:
        print(f"note: quantised kernels unavailable ({kernels.unavailable_reason()}); 'ours' is dense")
    if quantised and "int8" not in args.skip:
        models["ours int8"] = models["ours"]
    if quantised and "dense" not in args.skip:
        models["ours dense"] = load_gguf(path, dtype=dtype, device=args.device, quantized=False)[0]
    if HF not in args.skip:
        models[HF] = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype).to(args.device).eval()
    llama = None
    if LLAMA not in args.skip and args.device == "cpu":
        env = {"OMP_WAIT_POLICY": args.llama_wait_policy} if args.llama_wait_policy else {}
        llama = LlamaPeer(path, threads, max(args.batch_sizes), len(prompt) + n + 8,
                          extra_bufts=args.llama_extra_bufts, env=env)

    def run_ours(model: nn.Module, batch: int, new: int, int8: bool) -> tuple[float, list[list[int]]]:
        setting = kernels.int8_activations()
        if int8:
            kernels.set_int8_activations(True)
        try:
            start = time.perf_counter()
            completions = generate(model, [prompt] * batch, max_new_tokens=new, min_new_tokens=new,
                                   stop_token_ids=[eos], compile=args.compile)
            return time.perf_counter() - start, [c.tokens for c in completions]
        finally:
            kernels.set_int8_activations(setting)

    @torch.inference_mode()
    def run_hf(model: nn.Module, batch: int, new: int) -> tuple[float, list[list[int]]]:
        ids = torch.tensor([prompt] * batch, device=args.device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=eos)
        return time.perf_counter() - start, out[:, len(prompt):].tolist()

    runs: dict[str, Callable[[int, int], tuple[float, list[list[int]]]]] = {}
    for name, model in models.items():
        if name == HF:
            runs[name] = lambda b, k, m=model: run_hf(m, b, k)
        else:
            runs[name] = lambda b, k, m=model, i=name == "ours int8": run_ours(m, b, k, i)
    if llama is not None:
        runs[LLAMA] = lambda b, k: llama.generate(prompt, b, k, [eos])
    for run in runs.values():
        run(1, 2)  # warm-up

    neighbours = contend(args.contend)
    table, same = [], {name: True for name in runs}
    try:
        for batch in args.batch_sizes:
            best = {name: [float("inf"), float("inf"), None] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    t1, _ = run(batch, 1)
                    tn, out = run(batch, n)
                    best[name] = [min(best[name][0], t1), min(best[name][1], tn), out]
            table.append((batch, {name: (batch * len(prompt) / t1, batch * (n - 1) / (tn - t1))
                                  for name, (t1, tn, _) in best.items()}))
            for name in runs:
                same[name] &= best[name][2] == best["ours"][2]
    finally:
        for p in neighbours:
            p.kill()
            p.wait()
        if llama is not None:
            llama.close()

    where = f"CPU, {threads} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{path.name} on {where}, {args.dtype} activations{', compiled' if args.compile else ''}; "
          f"prompt {len(prompt)} tokens, {n} new tokens, greedy, best of {args.repeats}; "
          f"{args.contend} busy neighbours; load average at the end {load}")
    if llama is not None:
        print(f"llama.cpp: llama-cpp-python, {threads} threads, OMP_WAIT_POLICY="
              f"{args.llama_wait_policy or os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
              f"extra buffers {'on' if args.llama_extra_bufts else 'off'}")
    sizes = {name: weight_bytes(model) for name, model in models.items()}
    sizes[LLAMA] = path.stat().st_size
    peers = [p for p in (LLAMA, HF) if p in runs]
    header = (f"{'batch':>5} | {'impl':<12} | {'prompt tok/s':>12} | {'decode tok/s':>12} | "
              + "".join(f"{'prompt vs ' + p:>22} | {'decode vs ' + p:>22} | " for p in peers)
              + f"{'weights MB':>10} | {'weights GB/s':>12}")
    print(header + "\n" + "-" * len(header))
    for batch, speeds in table:
        for name, (pp, dec) in speeds.items():
            ratios = "".join(f"{pp / speeds[p][0]:>21.2f}x | {dec / speeds[p][1]:>21.2f}x | " if name != p
                             else f"{'':>22} | {'':>22} | " for p in peers)
            print(f"{batch:>5} | {name:<12} | {pp:>12.1f} | {dec:>12.1f} | {ratios}"
                  f"{sizes[name] / 1e6:>10.0f} | {sizes[name] * dec / batch / 1e9:>12.1f}")
    print("greedy tokens identical to ours: " + ", ".join(f"{name} {same[name]}" for name in runs if name != "ours"))
    print(f"sample (ours): {hf_tok.decode(best['ours'][2][0])!r}")


if __name__ == "__main__":
    main()
