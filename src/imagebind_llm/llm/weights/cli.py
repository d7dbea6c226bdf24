"""``imagebind-llm export-gguf``: a base LLM (Meta or Hugging Face folder) as a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse

from imagebind_llm.llm.weights.export import EXPORT_TYPES, export_gguf


def add_export_gguf_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export-gguf", help="write a base LLM (Meta or Hugging Face folder) as a GGUF file for llama.cpp",
        description="Write the base LLM of --model, with its tokenizer and chat template, as a GGUF file that "
                    "llama.cpp and imagebind-llm both read (architecture llama). The projections, embedding and LM "
                    "head are quantised exactly as `--quantize` does on load; norms stay float32. An ImageBind-LLM "
                    "adapter is not part of it: keep passing it with --adapter / --weights.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="base LLM: a Meta folder (params.json + consolidated.NN.pth) or a "
                                                  "Hugging Face folder (config.json + *.safetensors)")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", choices=EXPORT_TYPES, default="q4_1",
                   help="weight type of the projections, embedding and LM head (q4_k: llama.cpp's Q4_K, slower to "
                        "write; f16: no quantisation)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    print(f"wrote {export_gguf(args.model, args.out, gguf_type=args.type, overwrite=args.overwrite)}")
    return 0
