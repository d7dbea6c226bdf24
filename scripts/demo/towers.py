"""Demo step (a), the vision + text towers trained CLIP-style on the synthetic world: their sizes (``TOWERS``),
what was measured on the way to them, and linear probes of what the frozen vision embedding knows (issue #13).

    .venv/bin/python scripts/demo/build.py --out runs/demo --only world towers     # train them (build.py)
    .venv/bin/python scripts/demo/towers.py --world runs/demo/world --encoder runs/demo/towers/encoder

The probes are logistic regressions fitted on the embeddings of ``--fit`` training scenes and
scored on the held-out scenes (every one holds a colour-shape pair training never shows) and on training
scenes they were not fitted on; ``R@k`` is caption -> scene retrieval among those scenes.

Measured on the shared 2-core CPU machine (2026-12-01; throughput swung 5x with other jobs' load), batch 64,
lr 1e-3, 20k pairs per epoch, probes fitted on 8000 training scenes:
* v192 / p32 / text 128, kernel (2, 32, 32): 68-88 pairs/s when the machine was free (about 4 min an
  epoch), 9-15 when loaded (22.5 min). Kernel (1, 32, 32) with one video frame makes the stem 3.7x cheaper.
* v192 / p16, kernel (1, 16, 16): 37-45 pairs/s; after 6400 pairs R@1/R@5 0.20/0.58, as p32 after 6400.
* p32 after 3 epochs, held-out (seen): R@1 0.56 (0.75), R@5 0.83 (0.99); count 0.81, colour set 0.97,
  colour at cell 0.65; shape set (balanced) 0.50 (0.54), shape at cell 0.11 (0.25), sign word 0.02
  (chance 0.007), digit 0.17 (0.1): captions name shapes, words and digits, yet random batches are
  told apart by colours and places, so the embedding never learns them.
* Hard negatives (2026-12-01, quiet machine): a world with ``--variants 4`` (16k scenes in families of four)
  and ``--set data.group_size=4``, 124 pairs/s. After 750 steps (3 epochs) the loss sits at ln 4 = 1.39:
  families are told apart, their members not. After 3000 steps (12 epochs, 25 min) it falls to 0.94, yet the
  probes still find no shapes (held-out/seen: shape set bal. 0.52/0.55, shape at cell 0.12/0.21, sign word
  0.00/0.01, digit 0.17/0.17; count 0.69, colour set bal. 0.95, occupied cells bal. 0.52): the members are
  told apart by memorising scenes (seen R@5 0.96, held-out 0.78), not by features that generalise.
* Capacity checks, supervised (multi-label "which shapes are present", BCE, batch 64, held-out per-shape
  accuracy; all-absent = 0.724): this ViT (p32) learns nothing in 900 steps at lr 2e-4, 5e-4 or 1e-3, nor at
  p16 in 450; with a 4-layer stride-2 convolutional stem in place of the patchify it starts at step 450
  (0.746). A plain 4-layer CNN with global max-pooling starts at step 200 and reaches 0.898 (whole set right
  0.53) by step 300. The bottleneck is the small ViT trained from scratch, not the captions or negatives.
  Note the position embedding (std 0.05 after training) is ~30x smaller than the patch embeddings, which may
  be why even "which cells are occupied" is not decodable.
* Early convolutions and max pooling (2026-12-02; the same supervised check on 8000 scenes, 400 steps, 50-80
  images/s, balanced held-out accuracy of shape / occupied-cell presence): a ``vision_conv_stem`` of
  [24, 48, 96] with CLS pooling learns neither (0.50 / 0.50), nor with mean pooling; with
  ``vision_pool="max"`` the cells are learned from step 150 (0.996 at 400) and shapes start at step 350 (0.598
  at 400). CLS pooling with positions initialised at std 0.5 instead of 0.02 starts on the cells at step 150.
* Stem [24, 48, 96] with max pooling, ``--variants 4`` world, ``data.group_size=4``, 5 epochs
  = 1250 steps in 37.9 min (35 pairs/s, other jobs on the machine): the loss falls below ln 4 (families are
  told apart inside: 0.9 at the end against 1.39 before), held-out R@1/R@5 0.58/0.89; probes held-out (seen):
  count 0.83 (0.89), colour set bal. 1.00 (1.00), shape set bal. 0.59 (0.67), occupied cells bal. 0.65 (0.66),
  colour at cell 0.64 (0.69), shape at cell 0.28 (0.42), sign word 0.00 (0.01), digit 0.24 (0.09). Better on
  every probe than the ViT without the stem, still far from reading signs or naming every shape.
* ``TOWERS`` (stem [24, 48, 96, 192]: 7x7 tokens of 2x2 cells of the 14x14 map), the same run: 31.8 min (41.9
  pairs/s), held-out R@1/R@5 0.62/0.94 (0.69/1.00 seen); probes held-out (seen): count 0.90 (0.92), colour set
  bal. 0.87 (0.89), shape set bal. 0.73 (0.81), occupied cells bal. 0.70 (0.71), colour at cell 0.50 (0.55),
  shape at cell 0.48 (0.59), sign word 0.00 (0.00), digit 0.17 (0.19). Shapes and counts gain, colours lose:
  the deeper max-pooled features keep less of the colour. Reading (sign words, digits) is not learned at all.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from imagebind_llm.encoders import ImageBind, load_official
from imagebind_llm.preprocess import load_images, tokenize
from imagebind_llm.train.recipes import bind
from imagebind_llm.world import COLOURS, SHAPES

# ImageBindConfig fields of the demo encoder. Vision and text are trained here; the other towers are tiny
# placeholders (audio and point are bound later, depth/thermal/imu are never used).
TOWERS = dict(
    out_embed_dim=256, kernel_size=[1, 32, 32], video_frames=1,  # 49 patches; one frame: Conv3d is slow on CPU
    vision_conv_stem=[24, 48, 96, 192], vision_pool="max",  # see the capacity checks above
    vision_embed_dim=192, vision_num_blocks=4, vision_num_heads=3,
    text_embed_dim=128, text_num_blocks=4, text_num_heads=2,
    audio_embed_dim=128, audio_num_blocks=2, audio_num_heads=2, audio_drop_path=0.0,
    audio_stride=16,  # 96 patches per clip instead of 228: the audio binding ran at 14 pairs/s with stride 10
    depth_embed_dim=32, depth_num_blocks=1, depth_num_heads=1, depth_kernel_size=32,
    thermal_embed_dim=32, thermal_num_blocks=1, thermal_num_heads=1, thermal_kernel_size=32,
    imu_embed_dim=32, imu_num_blocks=1, imu_num_heads=1, imu_drop_path=0.0,
    with_point=True, point_depth=2, point_trans_dim=128, point_heads=2, point_num_group=64, point_group_size=32,
    point_encoder_dims=128, point_proj_dim=256, point_drop_path=0.0,
)
@torch.inference_mode()
def embed(encoder: ImageBind, modality: str, items: list[str], batch: int = 100) -> np.ndarray:
    """Unit-norm embeddings ``[N, out_embed_dim]`` of image paths (vision) or captions (text)."""
    load = load_images if modality == "vision" else tokenize
    parts = [encoder({modality: load(items[i:i + batch])})[modality] for i in range(0, len(items), batch)]
    return torch.nn.functional.normalize(torch.cat(parts), dim=-1).numpy()


def read_scenes(split: Path, limit: int | None = None) -> list[dict]:
    lines = (split / "scenes.jsonl").read_text().splitlines()[:limit]
    return [json.loads(line) for line in lines]


# Each probe: scene -> label (None: the scene does not take part). Sets are scored per member (one binary
# probe each) and reported as the share of scenes whose whole set is right.
def _cell(attr: str, cell: int) -> Callable[[dict], str | None]:
    return lambda s: next((x[attr] for x in s["shapes"] if x["cell"] == cell), None)


SINGLE = {
    "count": lambda s: len(s["shapes"]),
    "sign word": lambda s: s["sign"]["word"] if s["sign"] else None,
    "digit": lambda s: s["digit"]["value"] if s["digit"] else None,
}
SETS = {
    "colour set": (COLOURS, lambda s, c: any(x["colour"] == c for x in s["shapes"])),
    "shape set": (SHAPES, lambda s, c: any(x["shape"] == c for x in s["shapes"])),
    "occupied cells": (range(9), lambda s, c: any(x["cell"] == c for x in s["shapes"])),
}
BOUND = {"colour at cell": "colour", "shape at cell": "shape"}  # what the shape in an occupied cell is


def fit_score(xf: np.ndarray, yf: list, tests: dict[str, tuple[np.ndarray, list]]) -> dict[str, np.ndarray]:
    """Fit a logistic regression on ``(xf, yf)``; per test set ``(x, y)`` the per-row correctness."""
    probe = LogisticRegression(max_iter=500).fit(xf, yf)
    return {k: probe.predict(x) == np.asarray(y) if len(y) else np.zeros(0, bool) for k, (x, y) in tests.items()}


def probe_table(xf: np.ndarray, fit: list[dict], tests: dict[str, tuple[np.ndarray, list[dict]]]
                ) -> dict[str, dict[str, float]]:
    """``{probe: {test set: accuracy}}`` of every probe (``SINGLE``, ``SETS``, ``BOUND``), fitted on the
    embeddings ``xf`` of the scenes ``fit`` and scored on each test set ``(embeddings, scenes)``."""
    scaler = StandardScaler().fit(xf)
    xf, tests = scaler.transform(xf), {k: (scaler.transform(x), s) for k, (x, s) in tests.items()}

    def run(label: Callable[[dict], object]) -> dict[str, np.ndarray]:
        f = [i for i, s in enumerate(fit) if label(s) is not None]
        rows = {k: [i for i, s in enumerate(scenes) if label(s) is not None] for k, (_, scenes) in tests.items()}
        return fit_score(xf[f], [label(fit[i]) for i in f],
                         {k: (x[rows[k]], [label(scenes[i]) for i in rows[k]]) for k, (x, scenes) in tests.items()})

    table = {name: {k: v.mean() for k, v in run(label).items()} for name, label in SINGLE.items()}
    for name, (members, has) in SETS.items():
        right = {k: np.ones(len(scenes), dtype=bool) for k, (_, scenes) in tests.items()}
        balanced: dict[str, list[float]] = {k: [] for k in tests}
        for m in members:
            for k, ok in run(lambda s, m=m: has(s, m)).items():
                right[k] &= ok
                present = np.array([has(s, m) for s in tests[k][1]])
                balanced[k].append((ok[present].mean() + ok[~present].mean()) / 2)
        table[name] = {k: v.mean() for k, v in right.items()}
        table[f"{name}, bal."] = {k: float(np.mean(v)) for k, v in balanced.items()}
    for name, attr in BOUND.items():
        per_cell = [run(_cell(attr, cell)) for cell in range(9)]
        table[name] = {k: np.concatenate([c[k] for c in per_cell]).mean() for k in tests}
    return table


def recalls(image: np.ndarray, text: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Caption -> scene recall@k (the partner of caption ``i`` is scene ``i``)."""
    ranks = (text @ image.T).argsort(axis=1)[:, ::-1]
    hit = ranks == np.arange(len(text))[:, None]
    return {f"text->image R@{k}": hit[:, :k].any(axis=1).mean() for k in ks}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=Path, required=True, help="the world the towers were trained on")
    p.add_argument("--encoder", type=Path, required=True, help="the exported encoder folder of `train bind`")
    p.add_argument("--fit", type=int, default=8000, help="training scenes the probes are fitted on")
    args = p.parse_args()
    torch.set_num_threads(2)
    encoder = load_official(args.encoder / bind.WEIGHTS_FILE, args.encoder / bind.CONFIG_FILE)
    scenes = read_scenes(args.world / "train", args.fit + 500)
    splits = {"fit": scenes[:args.fit], "seen": scenes[args.fit:], "heldout": read_scenes(args.world / "heldout")}
    roots = {"fit": "train", "seen": "train", "heldout": "heldout"}
    start = time.time()
    x = {k: embed(encoder, "vision", [str(args.world / roots[k] / s["image"]) for s in v]) for k, v in splits.items()}
    print(f"embedded {sum(map(len, x.values()))} scenes at {sum(map(len, x.values())) / (time.time() - start):.0f}/s")
    tests = {k: (x[k], splits[k]) for k in ("heldout", "seen")}
    table = probe_table(x["fit"], splits["fit"], tests)
    for k in tests:
        for name, value in recalls(x[k], embed(encoder, "text", [s["caption"] for s in splits[k]])).items():
            table.setdefault(name, {})[k] = value
    print(f"{'probe (accuracy)':20s} {'held-out':>8s} {'seen':>8s}   (held-out: scenes with unseen colour-shape "
          f"pairs; seen: {len(splits['seen'])} training scenes the probes were not fitted on)")
    for name, row in table.items():
        print(f"{name:20s} {row['heldout']:8.3f} {row['seen']:8.3f}")


if __name__ == "__main__":
    main()
