"""The ``imagebind-llm`` command line: a dispatcher only.

Each package adds its own subcommands (``engine.cli``: ask, chat; ``model.cli``: merge-delta; ``hub.cli``:
weights; ``cache.cli``; ``train.cli``; ``serve.cli``: serve, web; ``eval.cli``: eval). Each is one ``add_*``
function in `SUBCOMMANDS`: it adds its parser and sets ``func`` (parsed arguments -> exit code). Errors a user can fix (missing files, unknown formats,
mismatched weights, invalid options) are printed as one line on stderr with a non-zero exit code;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from imagebind_llm import __version__
from imagebind_llm.cache.cli import add_cache_subcommands
from imagebind_llm.engine.cli import add_ask_command, add_chat_command
from imagebind_llm.eval.cli import add_eval_commands
from imagebind_llm.hub import DownloadError
from imagebind_llm.hub.cli import add_weights_command
from imagebind_llm.model.cli import add_merge_delta_command
from imagebind_llm.serve.cli import add_serve_commands
from imagebind_llm.train.cli import add_train_subcommands

EXIT_USER_ERROR = 1
# What our library raises for bad input (CheckpointMismatchError and WeightsFormatError are ValueErrors).
USER_ERRORS = (OSError, ValueError, DownloadError)


# One entry per subcommand (or group of subcommands).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], object]] = [
    add_chat_command, add_ask_command, add_merge_delta_command, add_weights_command, add_cache_subcommands,
    add_train_subcommands, add_serve_commands, add_eval_commands,
]


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
