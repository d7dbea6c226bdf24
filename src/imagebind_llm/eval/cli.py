"""``imagebind-llm eval BENCHMARK``: the evaluation commands (``mme``, ``mme-score``, ``zero-shot``).

Each subcommand is one ``add_*`` function in `EVAL_COMMANDS`: it adds its parser to the ``eval`` group and
sets ``func`` (parsed arguments -> exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from imagebind_llm.engine.cli import add_model_args, build_engine, uses_demo
from imagebind_llm.eval.mme import MME_HEADER, MODES, SUBTASKS, MMEOptions, load_mme, run_mme
from imagebind_llm.eval.mme_score import score_dir
from imagebind_llm.eval.report import format_table, load_compare, write_report
from imagebind_llm.eval.zero_shot_cli import add_zero_shot_command

MODEL_FIELDS = ("name", "model", "adapter", "weights", "imagebind", "imagebind_config", "phase", "dtype", "cache")


def add_mme_command(subparsers: argparse._SubParsersAction) -> None:
    """``eval mme --data MME_DIR --out RESULTS_DIR``: answer the MME questions into official result files."""
    p = subparsers.add_parser(
        "mme", help="answer the MME benchmark into official result files (resumable)",
        description="Answer every question of the MME release (MME_Benchmark_release_version) through the engine, "
                    "as LLaMA-Adapter's MME script does (Alpaca prompt '...using a single word or phrase.', greedy, "
                    "at most 30 new tokens), into RESULTS_DIR/<subtask>.txt in the official 4-column format. A rerun "
                    "goes on where the last one stopped. --mode likelihood answers Yes or No by comparing "
                    "log p('Yes') and log p('No') instead: not the official protocol, give it its own RESULTS_DIR. "
                    "Without model options it runs the embedded demo model. Score with `eval mme-score`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="the MME_Benchmark_release_version folder (or its parent)")
    p.add_argument("--out", required=True, type=Path, help="results folder: <subtask>.txt files, mme_run.json")
    p.add_argument("--subtasks", help=f"comma-separated subtasks (default: all found of {', '.join(SUBTASKS)})")
    p.add_argument("--mode", choices=MODES, default="generate", help="how questions are answered")
    p.add_argument("--prompt-header", default=MME_HEADER, help="the Alpaca header sentence before '### Instruction:'")
    p.add_argument("--max-new-tokens", type=int, default=30, help="answer length limit (generate mode)")
    p.add_argument("--batch", type=int, default=8, help="questions decoded together")
    p.add_argument("--max-context", type=int, default=512, help="tokens per question, prompt + answer (the official "
                                                                "script's max_seq_len)")
    p.add_argument("--cache", help="retrieval cache folder (imagebind-llm cache build)")
    add_model_args(p)
    p.set_defaults(func=run_mme_command)


def add_mme_score_command(subparsers: argparse._SubParsersAction) -> None:
    """``eval mme-score RESULTS_DIR``: the official scores of MME result files, a report and a chart."""
    p = subparsers.add_parser(
        "mme-score", help="score MME result files exactly as the official calculation.py",
        description="Score RESULTS_DIR/<subtask>.txt as the official eval_tool/calculation.py does (missing subtasks "
                    "are reported and skipped), print a table (or JSON), and write REPORT_DIR/report.md with a bar "
                    "chart REPORT_DIR/scores.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("results", type=Path, help="folder of <subtask>.txt result files")
    p.add_argument("--json", action="store_true", help="print the scores as JSON (the shape --compare reads)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=FILE",
                   help="scores to show beside ours (e.g. the paper's), a JSON file in the --json shape; repeatable")
    p.add_argument("--report-dir", type=Path, help="where report.md and scores.png go (default: RESULTS_DIR)")
    p.set_defaults(func=run_mme_score_command)


# One entry per `eval` subcommand.
EVAL_COMMANDS: list[Callable[[argparse._SubParsersAction], object]] = [add_mme_command, add_mme_score_command,
                                                                      add_zero_shot_command]


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """The ``eval`` command group: one subcommand per entry of `EVAL_COMMANDS`."""
    p = subparsers.add_parser("eval", help="evaluate a model (MME) or its encoder (zero-shot classification, retrieval)",
                              description="Benchmarks: answer them with a model, score the answers.")
    group = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for add in EVAL_COMMANDS:
        add(group)


def run_mme_command(args: argparse.Namespace) -> int:
    subtasks = [s.strip() for s in args.subtasks.split(",") if s.strip()] if args.subtasks else SUBTASKS
    options = MMEOptions(mode=args.mode, prompt_header=args.prompt_header, max_new_tokens=args.max_new_tokens,
                         batch=args.batch)
    tasks, missing = load_mme(args.data, subtasks)  # a malformed data set fails before the model loads
    if missing:
        print(f"note: no folder for subtasks {', '.join(missing)}: skipped", file=sys.stderr)
    if args.model and not (args.adapter or args.weights or args.name):
        raise ValueError("MME asks about images: add --adapter (official file) or --weights to --model")
    uses_demo(args)
    engine = build_engine(args, max_batch=args.batch, max_context=args.max_context, background=False,
                          template="alpaca")
    model = {field: getattr(args, field) for field in MODEL_FIELDS}
    asked = run_mme(engine, tasks, args.out, options, model=model)
    total = sum(len(questions) for questions in tasks.values())
    print(f"{asked} questions answered now, {total} in {args.out}; score: imagebind-llm eval mme-score {args.out}",
          file=sys.stderr)
    return 0


def run_mme_score_command(args: argparse.Namespace) -> int:
    compare = dict(load_compare(spec) for spec in args.compare)
    report, missing = score_dir(args.results)
    if not any(report[group]["subtasks"] for group in report):
        raise ValueError(f"{args.results}: no MME result files (<subtask>.txt for {', '.join(SUBTASKS)})")
    if missing:
        print(f"note: no result file for subtasks {', '.join(missing)}: skipped", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else format_table(report, compare))
    markdown, chart = write_report(report, args.report_dir or args.results, compare, missing)
    print(f"report: {markdown} (chart: {chart})", file=sys.stderr)
    return 0
