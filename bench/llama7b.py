"""The released model's shapes on this machine: a LLaMA-7B-shaped base quantised on load, against llama.cpp.

No LLaMA weights exist offline, so the script writes a base with random weights in the released shapes
(dim 4096, 32 layers, 32 heads, SwiGLU 11008, vocabulary 32000) in Meta's layout (float16
``consolidated.0N.pth`` + ``params.json``) and a SentencePiece ``tokenizer.model`` of 32000 pieces.
Then, each in its own process (so that peak RSS is its own):

* ``ours <q>``: `create_model`'s parts at full size: the base loaded with ``quantize=<q>`` (quantised
  tensor by tensor from the memory-mapped float16 shards), the 7B adapter skeleton (bind network,
  prefix, gates, LoRA rank 16 on every layer) and ImageBind-huge (random weights); it answers a question
  about an image, then decodes the base greedily at each batch size;
* ``export <type>``: ``imagebind-llm export-gguf`` of the same base;
* ``llama.cpp <type>``: llama-cpp-python on that GGUF, the same prompt and threads (`common.LlamaCpp`).

Reported per process: load seconds, peak RSS, decode tok/s per batch (``B * (N - 1) / (t(N) - t(1))``,
best of ``--repeats``) and the ratio to llama.cpp on the same quantised weights. The checkpoint (13.5 GB)
stays in ``--dir`` for the next run (``--clean`` removes it at the end).

    python bench/llama7b.py [--dir /tmp/llama7b] [--quantize q4_1 q8] [--batch-sizes 1 4]
                            [--new-tokens 16] [--threads 2] [--contend N] [--clean]
"""

from __future__ import annotations

import argparse
from itertools import islice, product
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PARAMS = {"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "norm_eps": 1e-6, "vocab_size": -1}
VOCAB = 32000
SHARDS = 2  # two model-parallel files (as LLaMA-13B ships): half the memory to write each
GGUF_TYPE = {"q4_1": "q4_1", "q8": "q8_0"}
PROMPT = "Describe the picture in detail."


def write_tokenizer(path: Path) -> None:
    """A LLaMA-like SentencePiece BPE model of `VOCAB` pieces (specials, 256 byte pieces, letter n-grams)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = VOCAB
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    specials = [("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL),
                ("</s>", pb.ModelProto.SentencePiece.CONTROL)]
    pieces = [*specials, *((f"<0x{b:02X}>", pb.ModelProto.SentencePiece.BYTE) for b in range(256))]
    letters = "abcdefghijklmnopqrstuvwxyz"
    grams = (prefix + "".join(g) for n in range(1, 5) for prefix in ("\u2581", "") for g in product(letters, repeat=n))
    pieces += [(g, pb.ModelProto.SentencePiece.NORMAL) for g in ["\u2581", *islice(grams, VOCAB - len(pieces) - 1)]]
    for rank, (text, kind) in enumerate(pieces):
        piece = proto.pieces.add()
        piece.piece, piece.type = text, kind
        piece.score = 0.0 if kind != pb.ModelProto.SentencePiece.NORMAL else -float(rank)
    path.write_bytes(proto.SerializeToString())


def write_checkpoint(folder: Path, seed: int = 0) -> None:
    """Random float16 weights (std 0.02, norms 1) of LLaMA-7B's shapes in Meta's layout, one shard at a time."""
    from imagebind_llm.llm.config import LLMConfig
    from imagebind_llm.llm.weights.common import expected_shapes
    from imagebind_llm.llm.weights.meta import shard_axis

    folder.mkdir(parents=True, exist_ok=True)
    config = LLMConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=VOCAB, multiple_of=256, norm_eps=1e-6)
    shapes = expected_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    for rank in range(SHARDS):
        shard = {}
        for key, shape in shapes.items():
            axis = shard_axis(key)
            part = list(shape)
            if axis is not None:
                part[axis] //= SHARDS
            if "norm" in key:
                shard[key] = torch.ones(part, dtype=torch.float16)
            else:
                shard[key] = (torch.randn(part, generator=generator) * 0.02).to(torch.float16)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    write_tokenizer(folder / "tokenizer.model")
    (folder / "params.json").write_text(json.dumps(PARAMS))  # last: marks a complete checkpoint


class PeakMemory:
    """Peak resident memory of this process: ``rss_gb`` counts the memory-mapped checkpoint pages it touched
    (the kernel drops them under pressure), ``anon_gb`` only its own allocations (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.anon_kb = 0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            with open("/proc/self/status") as f:
                anon = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
            self.anon_kb = max(self.anon_kb, anon)
            time.sleep(0.05)

    def report(self) -> dict:
        return {"rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "anon_gb": self.anon_kb / 2**20}


def decode_speeds(run, batches: list[int], new: int, repeats: int) -> dict[int, float]:
    """``{batch: decode tok/s}`` from ``run(batch, new_tokens) -> tokens``, best of ``repeats``."""
    speeds = {}
    for batch in batches:
        run(batch, 2)  # warm-up: pages of a memory-mapped file, first-call allocations
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run(batch, 1)
            t1 = time.perf_counter() - start
            start = time.perf_counter()
            run(batch, new)
            best = min(best, time.perf_counter() - start - t1)
        speeds[batch] = batch * (new - 1) / best
    return speeds


def measure_ours(folder: Path, quantize: str, batches: list[int], new: int, repeats: int) -> dict:
    from imagebind_llm.encoders import ImageBind, ImageBindConfig
    from imagebind_llm.llm.generate import generate
    from imagebind_llm.llm.weights import load_llm
    from imagebind_llm.model import AdapterConfig, ImageBindLLM
    from imagebind_llm.model.media import load_media

    start = time.perf_counter()
    loaded = load_llm(folder, quantize=quantize)
    llm_seconds = time.perf_counter() - start
    encoder = ImageBind(ImageBindConfig.huge()).eval()
    model = ImageBindLLM(loaded.model, encoder, AdapterConfig(feature_dim=1024), tokenizer=loaded.tokenizer).eval()
    load_seconds = time.perf_counter() - start
    media = load_media({"image": str(REPO / "tests/fixtures/media/girl.jpg")})
    start = time.perf_counter()
    answer = model.ask(PROMPT, media, max_new_tokens=8, temperature=0.0)
    answer_seconds = time.perf_counter() - start
    prompt = loaded.tokenizer.encode(PROMPT, bos=True)
    with torch.inference_mode():
        speeds = decode_speeds(lambda b, n: generate(loaded.model, [prompt] * b, max_new_tokens=n, min_new_tokens=n),
                               batches, new, repeats)
    return {"load_s": load_seconds, "llm_load_s": llm_seconds, "answer_s": answer_seconds, "answer": answer,
            "decode": speeds, "prompt": prompt}


def measure_llama_cpp(gguf: Path, prompt: list[int], batches: list[int], new: int, repeats: int,
                      threads: int) -> dict:
    sys.path.insert(0, str(BENCH))
    from common import LlamaCpp

    speeds, load = {}, 0.0
    for batch in batches:
        start = time.perf_counter()
        peer = LlamaCpp(str(gguf), threads=threads, batch=batch, ctx_per_seq=len(prompt) + new + 8)
        load = max(load, time.perf_counter() - start)
        speeds |= decode_speeds(lambda b, n: peer.greedy(prompt, n), [batch], new, repeats)
        peer.close()
    return {"load_s": load, "decode": speeds}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    memory = PeakMemory()
    batches = args.batch_sizes
    if args.child == "ours":
        result = measure_ours(args.dir, args.what, batches, args.new_tokens, args.repeats)
    else:
        result = measure_llama_cpp(args.dir / f"model-{args.what}.gguf", json.loads(args.prompt), batches,
                                   args.new_tokens, args.repeats, args.threads)
    print("RESULT " + json.dumps(result | memory.report()))


def run_child(args: argparse.Namespace, kind: str, what: str, prompt: list[int] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--what", what, "--dir", str(args.dir),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
           "--batch-sizes", *map(str, args.batch_sizes), "--prompt", json.dumps(prompt)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{kind} {what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result["decode"] = {int(k): v for k, v in result["decode"].items()}
    return result


def export(args: argparse.Namespace, gguf_type: str) -> float:
    out = args.dir / f"model-{gguf_type}.gguf"
    if out.exists():
        return float("nan")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "imagebind_llm", "export-gguf", "--model", str(args.dir), "--out", str(out),
                    "--type", gguf_type], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama7b"))
    parser.add_argument("--quantize", nargs="+", default=["q4_1", "q8"], choices=sorted(GGUF_TYPE))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--contend", type=int, default=0, help="busy-loop neighbour processes during the runs")
    parser.add_argument("--clean", action="store_true", help="delete --dir at the end")
    parser.add_argument("--child", choices=["ours", "llama.cpp"], help=argparse.SUPPRESS)
    parser.add_argument("--what", help=argparse.SUPPRESS)
    parser.add_argument("--prompt", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not (args.dir / "params.json").is_file():
        start = time.perf_counter()
        write_checkpoint(args.dir)
        print(f"wrote a random LLaMA-7B-shaped checkpoint to {args.dir} in {time.perf_counter() - start:.0f} s")
    sys.path.insert(0, str(BENCH))
    from common import contend

    neighbours = contend(args.contend)
    rows = []
    try:
        for q in args.quantize:
            ours = run_child(args, "ours", q)
            export_s = export(args, GGUF_TYPE[q])
            peer = run_child(args, "llama.cpp", GGUF_TYPE[q], ours["prompt"])
            rows.append((q, ours, peer, export_s))
            print(f"{q}: ours answered {ours['answer']!r} about girl.jpg in {ours['answer_s']:.1f} s", flush=True)
    finally:
        for p in neighbours:
            p.kill()
    print(f"\nLLaMA-7B shapes, random weights; {args.threads} threads, {args.new_tokens} new tokens, "
          f"{args.contend} busy neighbours")
    header = "| weights | impl | load s | peak anon GB | peak RSS GB | " + " | ".join(
        f"decode tok/s B={b} | vs llama.cpp" for b in args.batch_sizes) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for q, ours, peer, export_s in rows:
        cells = " | ".join(f"{ours['decode'][b]:.2f} | {ours['decode'][b] / peer['decode'][b]:.2f}x"
                           for b in args.batch_sizes)
        print(f"| {q} | ours (base + adapter + ImageBind-huge) | {ours['load_s']:.0f} | {ours['anon_gb']:.1f} | {ours['rss_gb']:.1f} | "
              f"{cells} |")
        cells = " | ".join(f"{peer['decode'][b]:.2f} | " for b in args.batch_sizes)
        print(f"| {GGUF_TYPE[q]} | llama.cpp (base only) | {peer['load_s']:.0f} | {peer['anon_gb']:.1f} | {peer['rss_gb']:.1f} | {cells} |")
        if export_s == export_s:
            print(f"(export-gguf --type {GGUF_TYPE[q]}: {export_s:.0f} s)")
    if args.clean:
        shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
