"""``imagebind-llm imagine``: a picture from any weighted mix of media, through Stable unCLIP.

    imagebind-llm imagine --audio rain.wav --image street.jpg --weight audio=0.6,image=0.4 \\
        --imagebind imagebind_w3D.pth "a painting" --out out.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from imagebind_llm.apps.unclip import (DEFAULT_PIPELINE, POINT_SCALE, UnCLIP, _diffusers, image_embedding,
                                      resolve_pipeline)
from imagebind_llm.engine import Request
from imagebind_llm.engine.cli import (add_media_args, add_model_args, blend_options, build_engine, loaded_media,
                                      uses_demo, utf8_text)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_imagine_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "imagine", help="generate an image from images, audio, video, text, point clouds... (Stable unCLIP)",
        description="Mix the ImageBind embeddings of the given media (before normalisation, points scaled by 1/5, "
                    "as the official demo), optionally blend them with a retrieval cache, and draw PROMPT from them "
                    f"with Stable unCLIP ({DEFAULT_PIPELINE}, downloaded on first use). Needs the extra: "
                    "pip install 'imagebind-llm[images]'. Only the ImageBind encoder matters: --imagebind "
                    "imagebind_w3D.pth (or --name) for real pictures; without it a small random "
                    "encoder is used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("prompt", nargs="?", default="", help="text prompt for the picture")
    p.add_argument("--out", default="out.png", help="output image file (PNG, JPEG, ... by extension)")
    add_model_args(p)
    add_media_args(p)
    g = p.add_argument_group("image generation")
    g.add_argument("--unclip", default=DEFAULT_PIPELINE,
                   help="Stable unCLIP pipeline: a local diffusers folder or a Hugging Face repo id (downloaded into "
                        "the weights cache, resumed if interrupted)")
    g.add_argument("--no-download", action="store_true", help="fail instead of downloading the pipeline")
    g.add_argument("--unclip-dtype", choices=list(_DTYPES), help="pipeline dtype (default: float16 on a GPU, else "
                                                                 "float32)")
    g.add_argument("--negative-prompt", help="what the picture should not show")
    g.add_argument("--steps", type=int, default=20, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, default=10.0, help="classifier-free guidance (1 disables it)")
    g.add_argument("--noise-level", type=int, default=0, help="noise added to the image embedding (0..999); higher "
                                                              "follows the inputs more loosely")
    g.add_argument("--height", type=int, help="image height in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--width", type=int, help="image width in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--point-scale", type=float, default=POINT_SCALE, help="point-cloud embeddings are divided by it")
    g.add_argument("--seed", type=int, help="random seed (same seed, same picture)")
    p.set_defaults(func=run_imagine)


def run_imagine(args: argparse.Namespace) -> int:
    utf8_text(args.prompt, "the prompt")
    if args.negative_prompt is not None:
        utf8_text(args.negative_prompt, "--negative-prompt")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {out.parent} does not exist")
    media, weights = loaded_media(args)  # bad files fail before anything is loaded
    if not media:
        raise ValueError("no media: give at least one input (--image, --audio, --video, --text, --point, ...)")
    _diffusers()  # the extra and the pipeline before the model: the clear errors first
    source = resolve_pipeline(args.unclip, download=not args.no_download)
    uses_demo(args, None if args.imagebind else "no --imagebind/--name: a small random ImageBind (the demo's "
                    "synthetic-world encoder has no unCLIP decoder) gives meaningless embeddings; pass --imagebind "
                    "imagebind_w3D.pth for real pictures", name="tiny-random")
    engine = build_engine(args, max_batch=1, background=False)
    request = Request.ask(args.prompt, media, weights, blend=blend_options(args))
    embeds = image_embedding(engine, request, point_scale=args.point_scale)
    on_gpu = torch.device(args.device).type != "cpu"
    dtype = _DTYPES[args.unclip_dtype or ("float16" if on_gpu else "float32")]
    unclip = UnCLIP(source, dtype=dtype, device=args.device, download=False)
    image = unclip.generate(embeds, args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                            noise_level=args.noise_level, height=args.height, width=args.width)[0]
    image.save(out)
    print(out)
    return 0
