"""The ``imagebind-llm`` command line: a dispatcher only.

Each package adds its own subcommands (``engine.cli``: ask, chat; ``model.cli``: merge-delta; ``hub.cli``:
weights; ``llm.weights.cli``: export-gguf; ``cache.cli``; ``train.cli``; ``serve.cli``: serve, web; ``eval.cli``: eval;
``apps.cli``: imagine; ``world.cli``: world generate).
Each is one ``add_*`` function in `SUBCOMMANDS`: it adds its parser and sets ``func`` (parsed arguments -> exit
code). Errors a user can fix (missing files, unknown formats, mismatched weights, invalid options, a ``--device``
this machine lacks, failed downloads) are printed as one line on stderr with exit code 1; ``--debug`` shows the
traceback instead. Any other exception is a bug: its traceback is printed with a request to report it (exit code
70). A reader that closes the pipe (``... | head -1``) ends the command quietly (exit code 141, as SIGPIPE would).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import torch

from imagebind_llm import __version__
from imagebind_llm.apps.cli import add_imagine_command
from imagebind_llm.cache.cli import add_cache_subcommands
from imagebind_llm.engine.cli import add_ask_command, add_chat_command
from imagebind_llm.eval.cli import add_eval_commands
from imagebind_llm.hub import DownloadError
from imagebind_llm.hub.cli import add_weights_command
from imagebind_llm.llm.weights.cli import add_export_gguf_command
from imagebind_llm.model.cli import add_merge_delta_command
from imagebind_llm.serve.cli import add_serve_commands
from imagebind_llm.train.cli import add_train_subcommands
from imagebind_llm.world.cli import add_world_command

EXIT_USER_ERROR = 1
EXIT_BUG = 70  # sysexits' EX_SOFTWARE: an error of ours, not of the input
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
# What our library raises for bad input: every error type of ours is a ValueError (MediaError, StateDictError,
# CheckpointMismatchError, WeightsFormatError, CacheError, ChecksumError...), an OSError (missing or unreadable
# files) or a DownloadError; library errors that mean bad input are turned into these where they are raised.
USER_ERRORS = (OSError, ValueError, DownloadError, FloatingPointError)  # the last: a training diverged (its settings)


# One entry per subcommand (or group of subcommands).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], object]] = [
    add_chat_command, add_ask_command, add_merge_delta_command, add_weights_command, add_export_gguf_command,
    add_cache_subcommands, add_train_subcommands, add_serve_commands, add_eval_commands, add_imagine_command,
    add_world_command,
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
    """Run the CLI; returns the exit code (0 on success, 1 for bad input, 70 for a bug, 141 for a closed pipe)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader is gone (`| head -1`); network errors never get here as such
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # exiting flushes stdout: let it succeed
        return EXIT_BROKEN_PIPE
    except USER_ERRORS as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"imagebind-llm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # noqa: BLE001 (not bad input: a bug, shown in full)
        if args.debug:
            raise
        traceback.print_exc()
        print(f"imagebind-llm {args.command}: internal error ({type(e).__name__}): this is a bug of imagebind-llm, "
              "not of your input; please report it with the traceback above", file=sys.stderr)
        return EXIT_BUG


def check_device(name: str) -> None:
    """Raise ValueError unless ``name`` is a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``).

    Every command's ``--device`` is checked here, before any work, instead of failing deep in torch.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, NotImplementedError) as e:  # torch's errors for a missing backend or GPU
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--device {name}: not available on this machine ({reason}); use --device cpu") from None


if __name__ == "__main__":
    sys.exit(main())
