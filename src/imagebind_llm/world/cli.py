"""``imagebind-llm world generate``: argparse wiring for the synthetic world.

The main CLI calls `add_world_command(subparsers)`; the leaf parser sets ``func``, which takes the parsed
arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import time

from .write import generate


def add_world_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``world`` with its ``generate`` subcommand to a CLI."""
    world = subparsers.add_parser("world", help="generate the synthetic multimodal world (scenes, speech, points)")
    sub = world.add_subparsers(dest="world_command", required=True)
    g = sub.add_parser("generate", help="write a world folder: scenes, captions, questions, audio, point clouds",
                       description="Write a world folder deterministically from --seed (same seed, same bytes): "
                       "train/ and heldout/ splits with scene images, stage-1 captions, stage-2 LLaVA "
                       "conversations, bind-training pair manifests, spoken captions, point clouds, the held-out "
                       "MME folders and zero-shot manifests (layout: `imagebind_llm.world`). Written under a "
                       "temporary name and renamed at the end.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("--out", required=True, help="folder to write (must not exist, be empty, or --overwrite)")
    g.add_argument("--seed", type=int, default=0, help="seed of everything")
    g.add_argument("--train", type=int, default=1000, help="training scenes")
    g.add_argument("--heldout", type=int, default=200, help="held-out scenes (each holds an unseen colour-shape pair)")
    g.add_argument("--audio", action=argparse.BooleanOptionalAction, default=True,
                   help="speak every caption with espeak-ng (16 kHz WAV)")
    g.add_argument("--points", type=int, default=0, help="training point clouds with their renders (0: none)")
    g.add_argument("--heldout-points", type=int, help="held-out point clouds (default: max(6, points / 4) with "
                   "--points, else 0)")
    g.add_argument("--variants", type=int, default=1, help="training scenes in families of this many: a scene and "
                   "its counterfactuals (one shape kind, the sign's word or the digit changed), consecutive, as hard "
                   "negatives for `train bind --set data.group_size=N`")
    g.add_argument("--workers", type=int, help="parallel espeak-ng processes (default: the CPU count)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing world folder at --out")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    g.set_defaults(func=run_generate)
    return world


def run_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = generate(args.out, seed=args.seed, train=args.train, heldout=args.heldout, audio=args.audio,
                   points=args.points, heldout_points=args.heldout_points, overwrite=args.overwrite,
                   workers=args.workers, progress=not args.no_progress, variants=args.variants)
    counts = json.loads((out / "world.json").read_text())["counts"]
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - start, 1), "counts": counts}))
    return 0
