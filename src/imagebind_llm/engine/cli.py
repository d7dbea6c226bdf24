"""``imagebind-llm ask`` and ``imagebind-llm chat``: one question, or a conversation, through the engine.

The model comes from `model_spec(args)` (the one mapping of command-line options to a `ModelSpec`), the
answer from an `Engine` with the sampling and blend options of the command line.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from typing import Any


from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.engine.chat import ChatSession
from imagebind_llm.engine.engine import Engine
from imagebind_llm.engine.request import Request
from imagebind_llm.hub import DEMO_NOTE, MODELS
from imagebind_llm.llm.generate import SamplingOptions
from imagebind_llm.llm.weights import QUANT_TYPES
from imagebind_llm.model.config import DTYPES, ModelSpec
from imagebind_llm.model.factory import create_model
from imagebind_llm.model.media import MODALITIES, load_media, parse_weights

_EXIT_COMMANDS = ("/exit", "/quit")


def add_chat_command(subparsers: argparse._SubParsersAction) -> None:
    """``imagebind-llm chat [PROMPT]``: answer one prompt, or chat interactively when none is given."""
    p = subparsers.add_parser(
        "chat", help="chat with an LLM, about media or not (default: the embedded SmolLM2-135M-Instruct)",
        description="Answer PROMPT, or, without PROMPT, chat turn by turn reading lines from stdin "
                    "(/exit or end of input quits, /reset forgets the conversation).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", help="the message; omit it for an interactive session")
    add_model_args(p)
    p.add_argument("--template", choices=["model", "alpaca", "chatml", "llama2"],
                   help="prompt template (default: the model's own chat template, else alpaca)")
    p.add_argument("--system", help="system message")
    add_media_args(p)
    _add_sampling_args(p, SamplingOptions(temperature=0.0, top_p=None))
    p.set_defaults(func=run_chat)


def add_ask_command(subparsers: argparse._SubParsersAction) -> None:
    """``imagebind-llm ask --image a.jpg --audio b.wav QUESTION``: one multimodal question."""
    p = subparsers.add_parser(
        "ask", help="ask a question about images, audio, video, text, point clouds, depth, thermal or IMU",
        description="Answer QUESTION about the given media with ImageBind-LLM. Without --model/--adapter/--weights/"
                    "--name it runs the embedded demo (SmolLM2 + a small random ImageBind, gates at zero): the media "
                    "go through the whole pipeline but cannot change the answer until trained or released weights "
                    "are loaded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("question")
    add_model_args(p)
    add_media_args(p)
    _add_sampling_args(p, SamplingOptions())  # the official ImageBind-LLM defaults
    p.add_argument("--json-schema", metavar="FILE", help="answer with JSON valid against the JSON schema in FILE "
                                                         "(constrained decoding; needs imagebind-llm[structured])")
    p.set_defaults(func=run_ask, template=None, system=None)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options that choose a model (`model_spec` reads them): --name --model --adapter --weights ..."""
    g = p.add_argument_group("model")
    g.add_argument("--name", choices=sorted(MODELS), help="a named model (its parts can be overridden below)")
    g.add_argument("--model", help="base LLM: Meta folder (e.g. llama_dir/7B_chinese), Hugging Face folder or .gguf; "
                                   "default: embedded SmolLM2")
    g.add_argument("--adapter", help="official adapter for --model: a path, or a registry name (7B.pth, "
                                     "7B-pretrained.pth, 7B-beta.pth; see `weights list`)")
    g.add_argument("--weights", help="a folder saved by imagebind-llm (config.json + adapter.safetensors)")
    g.add_argument("--imagebind", help="official ImageBind checkpoint: a path or a registry name "
                                       "(imagebind_w3D.pth, imagebind_huge.pth)")
    g.add_argument("--imagebind-config", help="JSON file of ImageBindModel arguments for --imagebind "
                                              "(default: huge); the point branch follows the checkpoint unless given")
    g.add_argument("--phase", choices=["finetune", "pretrain"], help="adapter structure (default: the adapter's)")
    g.add_argument("--dtype", choices=list(DTYPES), default="float32", help="parameter dtype")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--quantize", choices=QUANT_TYPES, help="quantise the base LLM's projections, embedding and LM head "
                                                           "while loading it (llama.cpp's Q8_0 / Q4_1 / Q4_K; "
                                                           "float32 on the CPU)")


def add_media_args(p: argparse.ArgumentParser) -> None:
    media = p.add_argument_group("media (ImageBind-LLM)")
    for entry in MODALITIES.values():
        if entry.is_file:
            media.add_argument(f"--{entry.name}", metavar="FILE", help=f"{entry.name} input file")
        else:
            media.add_argument(f"--{entry.name}", metavar="STRING", help="a text input embedded by ImageBind "
                                                                        "(not the question)")
    media.add_argument("--weight", help="modality weights, e.g. image=0.4,audio=0.6 (default 1 each; normalised)")
    media.add_argument("--cache", help="retrieval cache folder (imagebind-llm cache build)")
    media.add_argument("--cache-top-k", type=int, help="neighbours blended (default: the cache's, officially 10)")
    media.add_argument("--cache-temperature", type=float, help="softmax temperature on similarities (default: the "
                                                               "cache's, officially 20)")
    media.add_argument("--cache-weight", type=float, help="weight of the retrieved prototype (default: the cache's, "
                                                          "officially 0.5)")


def _add_sampling_args(p: argparse.ArgumentParser, defaults: SamplingOptions) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="answer length limit in tokens")
    g.add_argument("--temperature", type=float, default=defaults.temperature, help="sampling temperature; 0 is greedy")
    g.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling probability mass")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL repetition penalty (1 disables it)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--stream", action="store_true", help="print the answer as it is generated")


def _media(args: argparse.Namespace) -> dict[str, str]:
    """The media options given: file paths, and texts (checked to be UTF-8)."""
    return {name: value if MODALITIES[name].is_file else utf8_text(value, f"--{name}")
            for name in MODALITIES if (value := getattr(args, name, None)) is not None}


def utf8_text(text: str, what: str) -> str:
    """``text`` itself, unless it holds bytes that are not UTF-8 (which Python decodes from the command line and
    from stdin as lone surrogates).

    Raises:
        ValueError: naming ``what`` and the first bad byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not UTF-8 text (byte 0x{ord(text[e.start]) & 0xFF:02x} at character "
                         f"{e.start + 1})") from None
    return text


def loaded_media(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, float]]:
    """The media files loaded (bad files fail here, before any model is built) and their weights."""
    loaded = load_media(_media(args), parse_weights(args.weight), dtype=DTYPES[args.dtype])
    return {name: tensor for name, (tensor, _) in loaded.items()}, {name: w for name, (_, w) in loaded.items()}


def uses_demo(args: argparse.Namespace, note: str | None = DEMO_NOTE, name: str = "demo") -> bool:
    """When no model option is given, choose the embedded model ``name`` (it has an ImageBind encoder, so
    media work), printing ``note`` on stderr; returns whether it did."""
    if args.name or args.model or args.adapter or args.weights:
        return False
    if note:
        print(f"note: {note}", file=sys.stderr)
    args.name = name
    return True


def default_template(args: argparse.Namespace) -> str | None:
    """The prompt format of the weights: the named model's, Alpaca (ImageBind-LLM's format) for other
    ImageBind-LLM weights, else None: the model's own chat template."""
    if args.adapter or args.weights:
        return "alpaca"
    template = MODELS[args.name].template if args.name in MODELS else None
    return None if template == "model" else template


def model_spec(args: argparse.Namespace) -> ModelSpec:
    """The `ModelSpec` of the model options; the demo when media are given without any model."""
    if args.model and not (args.adapter or args.weights or args.name) and (_media(args) or args.cache):
        raise ValueError("media need ImageBind-LLM weights: add --adapter (official file) or --weights to --model")
    if args.adapter and args.weights:
        raise ValueError("give --adapter (an official file) or --weights (our folder), not both")
    if _media(args) or getattr(args, "cache", None):
        uses_demo(args)
    return ModelSpec(name=args.name, llm=args.model, adapter=args.adapter or args.weights, imagebind=args.imagebind,
                     imagebind_config=args.imagebind_config, phase=args.phase, dtype=args.dtype, device=args.device,
                     quantize=args.quantize)


def build_engine(args: argparse.Namespace, **options: Any) -> Engine:
    """The engine of the model options (`model_spec`) and ``--cache``; ``options`` go to `Engine`.

    Raises:
        ValueError: the cache holds features of another width than the model's encoder gives.
    """
    cache = None
    if getattr(args, "cache", None):
        from imagebind_llm.cache import FeatureCache

        cache = FeatureCache.load(args.cache)
    model = create_model(model_spec(args))
    if cache is not None and cache.dim != model.config.feature_dim:
        raise ValueError(f"--cache {args.cache} holds {cache.meta.encoder!r} features of dim {cache.dim}, but the "
                         f"model's encoder gives dim {model.config.feature_dim}: build the cache with the model's "
                         "encoder (`imagebind-llm cache build --imagebind ...`)")
    return Engine(model, cache=cache, **options)


def _sampling(args: argparse.Namespace) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def blend_options(args: argparse.Namespace) -> BlendOptions:
    return BlendOptions(top_k=args.cache_top_k, temperature=args.cache_temperature, weight=args.cache_weight)


def run_ask(args: argparse.Namespace) -> int:
    if args.model and not (args.adapter or args.weights or args.name):
        raise ValueError("--model and --adapter go together (base LLM + official adapter file), or use --weights")
    utf8_text(args.question, "the question")
    (media, weights), sampling, blend = loaded_media(args), _sampling(args), blend_options(args)
    constraint = _json_schema(args.json_schema) if args.json_schema else None
    engine = build_engine(args, max_batch=1, background=False,
                          template="alpaca" if args.adapter or args.weights or args.name else None)
    handle = engine.submit(Request.ask(args.question, media, weights, sampling=sampling, blend=blend,
                                       constraint=constraint))
    _print(handle.stream(), args.stream)
    return 0


def _json_schema(path: str) -> Any:
    """The constraint of ``--json-schema FILE``, checked before any model is built."""
    from pathlib import Path

    from imagebind_llm.llm.constrain import Constraint

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema {path}: cannot read it ({e})") from None
    constraint = Constraint.json_schema(text)  # ConstraintError (a ValueError) names the problem
    constraint.check()
    return constraint


def run_chat(args: argparse.Namespace) -> int:
    for text, what in ((args.prompt, "the prompt"), (args.system, "--system")):
        if text is not None:
            utf8_text(text, what)
    (media, weights), sampling, blend = loaded_media(args), _sampling(args), blend_options(args)
    engine = build_engine(args, max_batch=1, background=False, template=args.template)
    session = ChatSession(engine, media or None, weights, system=args.system, blend=blend)
    if args.prompt is not None:
        _print(session.respond(args.prompt, sampling), args.stream)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting; /exit to quit, /reset to start over.")
    sys.stdin.reconfigure(errors="surrogateescape")  # a line that is not UTF-8 is reported below, not fatal
    for number in itertools.count(1):
        try:
            line = utf8_text(input("> " if interactive else ""), f"input line {number}")
        except EOFError:
            return 0
        except ValueError as e:
            print(f"imagebind-llm chat: error: {e}; skipped, the conversation goes on", file=sys.stderr)
            continue
        line = line.strip()
        if line in _EXIT_COMMANDS:
            return 0
        if line == "/reset":
            session.reset()
        elif line:
            _print(session.respond(line, sampling), args.stream)


def _print(pieces, stream: bool) -> None:
    if stream:
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)
    else:
        print("".join(pieces).strip(), flush=True)
