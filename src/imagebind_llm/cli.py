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
from imagebind_llm.hub import DownloadError, fetch, format_weights_table
from imagebind_llm.train.cli import add_train_subcommands

EXIT_USER_ERROR = 1
# What our library raises for bad input (CheckpointMismatchError and WeightsFormatError are ValueErrors).
USER_ERRORS = (OSError, ValueError)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EXIT_COMMANDS = ("/exit", "/quit")


def _add_generation_args(p: argparse.ArgumentParser, *, temperature: float, top_p: float | None) -> None:
    """Sampling, dtype and device options (shared by ``chat`` and ``ask``)."""
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens")
    p.add_argument("--temperature", type=float, default=temperature, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling probability mass")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 disables)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="parameter dtype")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")


def _sampling(args: argparse.Namespace) -> dict:
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    if args.seed is not None:
        sampling["generator"] = torch.Generator(device=args.device).manual_seed(args.seed)
    return sampling


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
    _add_generation_args(p, temperature=0.0, top_p=None)
    _add_media_args(p)
    p.set_defaults(func=run_chat)


def run_chat(args: argparse.Namespace) -> int:
    from imagebind_llm.llm.chat import ChatSession, choose_template
    from imagebind_llm.llm.weights import load_llm

    sampling = _sampling(args)
    if _wants_multimodal(args):  # the media feature stays injected for the whole conversation
        from imagebind_llm.model.chat import start_chat

        model, media, options = _load_multimodal(args)
        session = start_chat(model, media, template=args.template, system=args.system, **options)
        name, fmt = "ImageBind-LLM", "multimodal"
    else:
        llm = load_llm(args.model, dtype=_DTYPES[args.dtype], device=args.device)
        session = ChatSession(llm.model, llm.tokenizer, choose_template(args.template, llm.tokenizer),
                              system=args.system)
        name, fmt = llm.path.name, llm.format
    if args.prompt is not None:
        _answer(session, args.prompt, args.stream, sampling)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {name} ({fmt}); /exit to quit, /reset to start over.")
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


_MEDIA_FILES = ("image", "video", "audio", "point", "depth", "thermal", "imu")


def _add_media_args(p: argparse.ArgumentParser) -> None:
    """Media inputs, ImageBind-LLM weights and the retrieval cache (shared by ``ask`` and ``chat``)."""
    media = p.add_argument_group("media (ImageBind-LLM)")
    for name in _MEDIA_FILES:
        media.add_argument(f"--{name}", metavar="FILE", help=f"{name} input file")
    media.add_argument("--text", metavar="STRING", help="a text input embedded by ImageBind (not the question)")
    media.add_argument("--weight", help="modality weights, e.g. image=0.4,audio=0.6 (default 1 each; normalised)")
    media.add_argument("--adapter", help="official adapter for --model: a path, or a registry name (7B.pth, "
                                         "7B-pretrained.pth, 7B-beta.pth; see `weights list`)")
    media.add_argument("--weights", help="a folder saved by imagebind-llm (config.json + adapter.safetensors)")
    media.add_argument("--imagebind", help="official ImageBind checkpoint: a path or a registry name "
                                           "(imagebind_w3D.pth, imagebind_huge.pth)")
    media.add_argument("--imagebind-config", help="JSON file of ImageBindModel arguments for --imagebind "
                                                  "(default: huge); the point branch follows the checkpoint unless given")
    media.add_argument("--phase", choices=["finetune", "pretrain"], default="finetune", help="adapter structure")
    media.add_argument("--cache", help="retrieval cache folder (imagebind-llm cache build)")
    media.add_argument("--cache-top-k", type=int, default=10, help="neighbours blended")
    media.add_argument("--cache-temperature", type=float, default=20.0, help="softmax temperature on similarities")
    media.add_argument("--cache-weight", type=float, default=0.5, help="weight of the retrieved prototype")


def _wants_multimodal(args: argparse.Namespace) -> bool:
    return any(getattr(args, n) is not None for n in (*_MEDIA_FILES, "text", "adapter", "weights", "cache"))


def _load_multimodal(args: argparse.Namespace):
    """The ImageBind-LLM model, its media inputs and cache options from the shared arguments."""
    from imagebind_llm.model.factory import build_default, from_official, load_pretrained
    from imagebind_llm.model.media import load_media, parse_weights

    dtype = _DTYPES[args.dtype]
    sources = {name: getattr(args, name) for name in (*_MEDIA_FILES, "text") if getattr(args, name) is not None}
    media = load_media(sources, parse_weights(args.weight), dtype=dtype) if sources else None
    if args.adapter:
        args.adapter = fetch(args.adapter)  # a local path, or a registry name such as 7B.pth (downloaded once)
    if args.imagebind:
        args.imagebind = fetch(args.imagebind)
    if args.weights:
        model = load_pretrained(args.weights, args.model, args.imagebind, dtype=dtype, device=args.device)
    elif args.model or args.adapter:
        if not (args.model and args.adapter):
            raise ValueError("--model and --adapter go together (base LLM + official adapter file)")
        model = from_official(args.model, args.adapter, args.imagebind, phase=args.phase, dtype=dtype,
                              device=args.device, imagebind_config=args.imagebind_config)
    else:
        print("note: embedded demo model (untrained gates): media do not influence the answer until trained or "
              "released weights are loaded (--model/--adapter or --weights)", file=sys.stderr)
        model = build_default(dtype=dtype, device=args.device)
    cache = None
    if args.cache:
        from imagebind_llm.cache import FeatureCache

        cache = FeatureCache.load(args.cache)
    cache_options = dict(cache=cache, cache_top_k=args.cache_top_k, cache_temperature=args.cache_temperature,
                         cache_weight=args.cache_weight)
    return model, media, cache_options


def add_ask_command(subparsers: argparse._SubParsersAction) -> None:
    """``imagebind-llm ask --image a.jpg --audio b.wav QUESTION``: one multimodal question."""
    p = subparsers.add_parser(
        "ask", help="ask a question about images, audio, video, text, point clouds, depth, thermal or IMU",
        description="Answer QUESTION about the given media with ImageBind-LLM. Without --model/--adapter/--weights "
                    "it runs the embedded demo (SmolLM2 + a small random ImageBind, gates at zero): the media go "
                    "through the whole pipeline but cannot change the answer until trained or released weights "
                    "are loaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("question")
    p.add_argument("--model", help="base LLM: Meta folder (e.g. llama_dir/7B_chinese), HF folder or .gguf; "
                                   "default: embedded SmolLM2")
    _add_media_args(p)
    _add_generation_args(p, temperature=0.1, top_p=0.75)  # the official ImageBind-LLM defaults
    p.set_defaults(func=run_ask)


def run_ask(args: argparse.Namespace) -> int:
    from imagebind_llm.llm.chat import choose_template

    model, media, options = _load_multimodal(args)
    template = choose_template("alpaca" if args.adapter or args.weights else None, model.tokenizer)
    prompt = template.render([{"role": "user", "content": args.question}])
    options.update(_sampling(args), stop_strings=("### Instruction:",))
    if args.stream:
        for piece in model.stream(prompt, media, **options):
            print(piece, end="", flush=True)
        print(flush=True)
    else:
        print(model.generate([prompt], media, **options)[0].text.strip(), flush=True)
    return 0


def add_merge_delta_command(subparsers: argparse._SubParsersAction) -> None:
    """``imagebind-llm merge-delta``: LLaMA-7B + Open-Chinese-LLaMA delta -> the base the released 7B.pth needs."""
    p = subparsers.add_parser(
        "merge-delta", help="build Open-Chinese-LLaMA-7B (the base of the released 7B.pth) from LLaMA-7B + delta",
        description="out = fp16(base + delta) for every tensor (rope keys skipped). The released 7B.pth adapter "
                    "was trained on this base and gives meaningless text on vanilla LLaMA-7B.",
    )
    p.add_argument("--base", required=True, help="Meta LLaMA-7B folder (params.json + consolidated.00.pth)")
    p.add_argument("--delta", required=True, help="7B_chinese_delta folder (consolidated.00.pth + params.json)")
    p.add_argument("--out", required=True, help="output folder, e.g. llama_dir/7B_chinese")
    p.set_defaults(func=run_merge_delta)


def run_merge_delta(args: argparse.Namespace) -> int:
    from imagebind_llm.model.factory import merge_delta

    print(f"wrote {merge_delta(args.base, args.delta, args.out)}")
    return 0


def add_weights_command(subparsers: argparse._SubParsersAction) -> None:
    """``imagebind-llm weights list|fetch``: the official files, downloaded with resume and checksums."""
    p = subparsers.add_parser("weights", help="list or download the official ImageBind / ImageBind-LLM files")
    sub = p.add_subparsers(dest="weights_command", required=True)
    sub.add_parser("list", help="the known files, their sizes and whether they are cached").set_defaults(
        func=lambda args: print(format_weights_table()) or 0)
    f = sub.add_parser("fetch", help="download a file (registry name or URL) into the cache, resuming if interrupted")
    f.add_argument("source", help="registry name (see `weights list`), URL, or local path")
    f.add_argument("--cache-dir", help="download folder (default $IMAGEBIND_LLM_CACHE or ~/.cache/imagebind_llm)")
    f.add_argument("--sha256", help="expected SHA-256 of the file")
    f.set_defaults(func=run_weights_fetch)


def run_weights_fetch(args: argparse.Namespace) -> int:
    try:
        print(fetch(args.source, args.cache_dir, sha256=args.sha256))
    except DownloadError as e:
        print(f"imagebind-llm weights: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


# One entry per subcommand (or group of subcommands).
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], object]] = [
    add_chat_command, add_ask_command, add_merge_delta_command, add_weights_command, add_cache_subcommands,
    add_train_subcommands,
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
