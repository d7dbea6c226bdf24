"""``imagebind-llm merge-delta``: LLaMA-7B + Open-Chinese-LLaMA delta -> the base the released 7B.pth needs."""

from __future__ import annotations

import argparse

from imagebind_llm.model.factory import merge_delta


def add_merge_delta_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge-delta", help="build Open-Chinese-LLaMA-7B (the base of the released 7B.pth) from LLaMA-7B + delta",
        description="out = fp16(base + delta) for every tensor (rope keys skipped). The released 7B.pth adapter "
                    "was trained on this base and gives meaningless text on vanilla LLaMA-7B.",
    )
    p.add_argument("--base", required=True, help="Meta LLaMA-7B folder (params.json + consolidated.00.pth)")
    p.add_argument("--delta", required=True, help="7B_chinese_delta folder (consolidated.00.pth + params.json)")
    p.add_argument("--out", required=True, help="output folder, e.g. llama_dir/7B_chinese")
    p.add_argument("--overwrite", action="store_true", help="replace a merge (or any weights) already in --out")
    p.set_defaults(func=run_merge_delta)


def run_merge_delta(args: argparse.Namespace) -> int:
    print(f"wrote {merge_delta(args.base, args.delta, args.out, overwrite=args.overwrite)}")
    return 0
