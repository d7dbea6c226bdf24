"""The README's picture of the image-generation path, made offline: ``docs/images/tiny_unclip.png``.

It runs the whole `imagebind-llm imagine` path with stand-ins for the downloads: the embedded demo model's
small random ImageBind encodes a synthetic picture and the text "rain on a street" (weights 0.4 / 0.6, the
official mix before normalisation), and a **tiny randomly initialised** Stable unCLIP pipeline
(`imagebind_llm.apps.unclip.tiny_pipeline`, built from configs, nothing downloaded) draws "a painting" from
that embedding. The result shows the wiring works, not what SD-2.1-unCLIP draws: its content is noise-like.

    .venv/bin/python bench/tiny_unclip_picture.py [--out docs/images/tiny_unclip.png] [--size 128] [--steps 20]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import imagebind_llm as ibl
from imagebind_llm.apps import UnCLIP, image_embedding, tiny_pipeline
from imagebind_llm.engine import Engine, Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "images" / "tiny_unclip.png"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    y, x = np.mgrid[0:224, 0:224] / 223.0
    picture = torch.from_numpy(np.stack([x, y, 1 - x * y])).float()[None]  # a gradient "street"
    engine = Engine(ibl.create_model("tiny-random"), background=False)
    request = Request.ask("", {"image": picture, "text": "rain on a street"}, {"image": 0.4, "text": 0.6})
    embeds = image_embedding(engine, request)
    image = UnCLIP(tiny_pipeline(embeds.shape[-1], seed=args.seed)).generate(
        embeds, "a painting", seed=args.seed, num_inference_steps=args.steps, height=args.size, width=args.size)[0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, optimize=True)
    print(f"{out}: {image.size[0]}x{image.size[1]}, {out.stat().st_size:,} bytes (tiny random pipeline)")


if __name__ == "__main__":
    main()
