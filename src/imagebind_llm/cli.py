"""The ``imagebind-llm`` command line.

Each subcommand is one ``add_*`` function in `SUBCOMMANDS`: it adds its parser to the subparsers and sets
``func`` (parsed arguments -> exit code). Errors a user can fix (missing files, unknown formats,
mismatched weights, invalid options) are printed as one line on stderr with a non-zero exit code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import torch

from imagebind_llm import __version__
from imagebind_llm.cache.cli import add_cache_subcommands

EXIT_USER_ERROR = 1
# What our library raises for bad input (CheckpointMismatchError and WeightsFormatError are ValueErrors).
USER_ERRORS = (OSError, ValueError)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXIT_COMMANDS = ("/exit", "/quit")


def add_chat_command(subparsers: argparse._SubParsersAction) -> None:
    """``imagebind-llm chat [PROMPT]``: answer one prompt, or chat interactively when none is given."""
    p = subparsers.add_parser(
        "chat", help="text chat with an LLM (default: the embedded SmolLM2-135M-Instruct)",
        description="Answer PROMPT, or, without PROMPT, chat turn by turn reading lines from stdin "
                    "(/exit or end of input quits, /reset forgets the conversation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="the message; omit it for an interactive session")
    p.add_argument("--model", help="a .gguf file, a Hugging Face directory (config.json + *.safetensors) or a Meta "
                                   "directory (params.json + consolidated.*.pth); default: embedded SmolLM2")
    p.add_argument("--template", choices=["model", "alpaca", "chatml", "llama2"],
                   help="prompt template (default: the model's own chat template, else alpaca)")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, help="nucleus sampling probability mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 disables)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="parameter dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from imagebind_llm.llm.chat import ChatSession, choose_template
    from imagebind_llm.llm.weights import load_llm

    llm = load_llm(args.model, dtype=_DTYPES[args.dtype], device=args.device)
    session = ChatSession(llm.model, llm.tokenizer, choose_template(args.template, llm.tokenizer), system=args.system)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    if args.seed is not None:
        sampling["generator"] = torch.Generator(device=args.device).manual_seed(args.seed)
    if args.prompt is not None:
        _answer(session, args.prompt, args.stream, sampling)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {llm.path.name} ({llm.format}); /exit to quit, /reset to start over.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if line in _EXIT_COMMANDS:
            return 0
        if line == "/reset":
            session.reset()
        elif line:
            _answer(session, line, args.stream, sampling)


def _answer(session, prompt: str, stream: bool, sampling: dict) -> None:
    if stream:
        for piece in session.respond(prompt, **sampling):
            print(piece, end="", flush=True)
        print(flush=True)
    else:
        print("".join(session.respond(prompt, **sampling)).strip(), flush=True)


# One entry per subcommand (or group of subcommands).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], object]] = [add_chat_command, add_cache_subcommands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imagebind-llm", description="ImageBind-LLM: multimodal instruction-following LLaMA-family models."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO level)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 on success)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"imagebind-llm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
