"""The demo model's whole recipe, one command (issue #13): world -> towers -> audio and point binding ->
stage 1 -> stage 2 -> evaluation, each step with the project's own commands.

    .venv/bin/python scripts/demo/build.py --out runs/demo              # the full recipe
    .venv/bin/python scripts/demo/build.py --out /tmp/d --scale tiny    # minutes: a smoke run of every step

Steps (each skipped when its output exists, so an interrupted build continues; ``--from STEP`` redoes that
step and the ones after it):

1. ``world``: ``imagebind-llm world generate`` with counterfactual families (``--variants``) for hard negatives.
2. ``towers``: ``train bind`` joint vision + text, CLIP-style, on (scene, caption), families kept in one batch.
3. ``audio``: ``train bind`` audio tower from scratch against the frozen vision tower, (scene, spoken caption).
4. ``point``: ``train bind`` point tower from scratch against the frozen vision tower, (render, cloud).
   Never audio-text or point-text pairs: ImageBind binds through images.
5. ``stage1``: ``train stage1`` on SmolLM2 with (scene, caption) and (render, "a 3D torus").
6. ``stage2``: ``train stage2`` on the scenes' questions and the renders' "What object is this?".
7. ``evaluate``: MME on the held-out scenes (``eval mme``), and the emergent zero-shot check: the LLM, which
   never saw audio or points, asked about held-out spoken captions and point clouds, with trained and with
   zero gates; writes ``evaluate.json``.

The final encoder is ``point/encoder`` (every tower), the adapter ``stage2/pretrained``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from imagebind_llm.eval.mme_score import score_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from towers import TOWERS, tower_settings  # noqa: E402  (the tower sizes live with their measurements)

STEPS = ("world", "towers", "audio", "point", "stage1", "stage2", "evaluate")
HEAR = "Describe this image in detail."  # asked about a spoken caption: the LLM only ever learned to describe images
WHAT = "What object is this?"  # asked about a point cloud (the renders' stage-2 question)


@dataclass(frozen=True)
class Scale:
    """How much of everything: scenes, clouds, and per step its epochs and batch."""

    train: int
    heldout: int
    points: int
    variants: int
    tower_epochs: int
    bind_epochs: int
    stage1_epochs: int
    stage2_epochs: int
    batch: int
    llm_batch: int
    inject_layers: int
    zero_shot: int  # held-out audio clips / clouds asked about


SCALES = {
    "full": Scale(train=16000, heldout=500, points=3000, variants=4, tower_epochs=3, bind_epochs=6, stage1_epochs=1,
                  stage2_epochs=1, batch=64, llm_batch=8, inject_layers=8, zero_shot=60),
    "tiny": Scale(train=16, heldout=8, points=12, variants=4, tower_epochs=1, bind_epochs=1, stage1_epochs=1,
                  stage2_epochs=1, batch=8, llm_batch=2, inject_layers=2, zero_shot=4),
}


def cli(*args: str, log: Path) -> None:
    """Run ``imagebind-llm args`` with its output in ``log``; a failure stops the build, naming the log."""
    command = [sys.executable, "-m", "imagebind_llm", *args]
    with open(log, "w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"error: {args[0]} {args[1]} failed (exit {code}); see {log}: {' '.join(tail)}")


def set_args(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``."""
    return [a for override in overrides for a in ("--set", override)]


def train_bind(out: Path, name: str, scale: Scale, sets: list[str]) -> None:
    run = out / name
    common = [f"train.output_dir={run}", f"train.batch_size={scale.batch}", "optim.lr=1e-3", "optim.clip_grad=1.0",
              "optim.warmup_epochs=0.3", "data.num_workers=0", "train.progress=false", "train.save_every=100000"]
    cli("train", "bind", "--overwrite", *set_args(common + sets), log=out / f"{name}.log")


def step_world(out: Path, scale: Scale, seed: int) -> None:
    cli("world", "generate", "--out", str(out / "world"), "--seed", str(seed), "--train", str(scale.train),
        "--heldout", str(scale.heldout), "--points", str(scale.points), "--variants", str(scale.variants),
        "--no-progress", "--overwrite", log=out / "world.log")


def step_towers(out: Path, scale: Scale) -> None:
    (out / "towers.json").write_text(json.dumps(TOWERS, indent=1))
    train_bind(out, "towers", scale, [*tower_settings(out / "world", out / "towers.json"),
                                      f"data.group_size={scale.variants}", f"train.epochs={scale.tower_epochs}"])


def bind_to_vision(out: Path, scale: Scale, modality: str, start: str) -> None:
    world, encoder = out / "world", out / start / "encoder"
    train_bind(out, modality, scale, [
        "bind.anchor=vision", f"bind.modalities=[{modality}]", "bind.mode=scratch",
        f"bind.imagebind={encoder / 'imagebind.pth'}", f"bind.imagebind_config={encoder / 'imagebind_config.json'}",
        f"data.train=[{world / f'train/pairs_vision_{modality}.jsonl'}]",
        f"data.eval=[{world / f'heldout/pairs_vision_{modality}.jsonl'}]", f"train.epochs={scale.bind_epochs}"])


def train_stage(out: Path, scale: Scale, stage: int, files: list[str], sets: list[str]) -> None:
    encoder, run = out / "point" / "encoder", out / f"stage{stage}"
    overrides = [
        f"model.imagebind={encoder / 'imagebind.pth'}", f"model.imagebind_config={encoder / 'imagebind_config.json'}",
        f"model.inject_layers={scale.inject_layers}", f"data.train=[{','.join(files)}]",
        f"data.image_root={out / 'world' / 'train'}", f"train.output_dir={run}", f"train.batch_size={scale.llm_batch}",
        "data.num_workers=0", "train.progress=false", "train.save_every=100000", *sets]
    cli("train", f"stage{stage}", "--overwrite", *set_args(overrides), log=out / f"stage{stage}.log")


def step_stage1(out: Path, scale: Scale) -> None:
    train = out / "world" / "train"
    train_stage(out, scale, 1, [str(train / "captions.tsv"), str(train / "render_captions.tsv")],
                [f"train.epochs={scale.stage1_epochs}", "optim.lr=1e-3", "optim.warmup_epochs=0.05", "data.max_words=64"])


def step_stage2(out: Path, scale: Scale) -> None:
    train = out / "world" / "train"
    train_stage(out, scale, 2, [str(train / "instructions.json"), str(train / "render_instructions.json")],
                [f"model.adapter={out / 'stage1' / 'pretrained'}", f"train.epochs={scale.stage2_epochs}",
                 "optim.lr=5e-4", "optim.warmup_epochs=0.05", "data.max_words=200"])


def step_evaluate(out: Path, scale: Scale) -> None:
    encoder, weights = out / "point" / "encoder", out / "stage2" / "pretrained"
    model_args = ["--weights", str(weights), "--imagebind", str(encoder / "imagebind.pth"),
                  "--imagebind-config", str(encoder / "imagebind_config.json")]
    cli("eval", "mme", *model_args, "--data", str(out / "world" / "heldout" / "mme"), "--out", str(out / "mme"),
        "--mode", "likelihood", log=out / "mme.log")
    scores = score_dir(out / "mme")[0]["perception"]
    report = {"mme": {"total": scores["total"], **{k: v["score"] for k, v in scores["subtasks"].items()}},
              "zero_shot": zero_shot(out, scale)}
    (out / "evaluate.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


@torch.inference_mode()
def zero_shot(out: Path, scale: Scale) -> dict[str, dict[str, float]]:
    """Share of held-out clips whose answer names the right colour and shape, and of clouds whose answer
    names the primitive, with the trained gates and with every gate at zero (no media reaches the LLM)."""
    from imagebind_llm import create_model, load_media

    encoder, heldout = out / "point" / "encoder", out / "world" / "heldout"
    model = create_model(None, adapter=str(out / "stage2" / "pretrained"), imagebind=str(encoder / "imagebind.pth"),
                         imagebind_config=str(encoder / "imagebind_config.json"))
    sets = {"audio": (HEAR, lambda label, answer: all(w in answer for w in label.split())),
            "point": (WHAT, lambda label, answer: label in answer)}
    trained = [g.detach().clone() for g in model.gates]
    scores: dict[str, dict[str, float]] = {}
    for modality, (question, right) in sets.items():
        rows = [json.loads(line) for line in (heldout / f"zeroshot_{modality}.jsonl").read_text().splitlines()]
        rows = rows[:scale.zero_shot]
        for gates in ("trained", "zero"):
            for g, value in zip(model.gates, trained):
                g.copy_(value if gates == "trained" else torch.zeros_like(value))
            answers = [model.ask(question, load_media({modality: str(heldout / row[modality])}), temperature=0,
                                 max_new_tokens=48).lower() for row in rows]
            hits = [right(row["label"], answer) for row, answer in zip(rows, answers)]
            scores.setdefault(modality, {})[gates] = sum(hits) / max(len(hits), 1)
    return scores


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="build folder (every step's run and log)")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from", dest="start", choices=STEPS, help="redo this step and every later one")
    args = p.parse_args()
    scale = SCALES[args.scale]
    args.out.mkdir(parents=True, exist_ok=True)
    done = {"world": "world/world.json", "towers": "towers/encoder/imagebind_config.json",
            "audio": "audio/encoder/imagebind_config.json", "point": "point/encoder/imagebind_config.json",
            "stage1": "stage1/pretrained/config.json", "stage2": "stage2/pretrained/config.json",
            "evaluate": "evaluate.json"}
    run = {"world": lambda: step_world(args.out, scale, args.seed), "towers": lambda: step_towers(args.out, scale),
           "audio": lambda: bind_to_vision(args.out, scale, "audio", "towers"),
           "point": lambda: bind_to_vision(args.out, scale, "point", "audio"),
           "stage1": lambda: step_stage1(args.out, scale), "stage2": lambda: step_stage2(args.out, scale),
           "evaluate": lambda: step_evaluate(args.out, scale)}
    redo = STEPS[STEPS.index(args.start):] if args.start else ()
    for name in STEPS:
        if name not in redo and (args.out / done[name]).exists():
            print(f"{name}: done ({args.out / done[name]})")
            continue
        start = time.time()
        run[name]()
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
