"""The demo model's whole recipe, one command (issue #13): world -> towers -> audio and point binding ->
stage 1 -> stage 2 -> evaluation, each step with the project's own commands.

    .venv/bin/python scripts/demo/build.py --out runs/demo              # the full recipe
    .venv/bin/python scripts/demo/build.py --out /tmp/d --scale tiny    # minutes: a smoke run of every step
    .venv/bin/python scripts/demo/build.py --out runs/demo --install    # then make it the package's demo model

Steps (each skipped when its output exists, so an interrupted build continues; ``--from STEP`` redoes that
step and the ones after it):

1. ``world``: ``imagebind-llm world generate`` with counterfactual families (``--variants``) for hard negatives.
2. ``towers``: ``train bind`` joint vision + text, CLIP-style, on (scene, caption), families kept in one batch.
3. ``audio``: ``train bind`` audio tower from scratch against the frozen vision tower, (scene, spoken caption).
4. ``point``: ``train bind`` point tower from scratch against the frozen vision tower, (render, cloud).
   Never audio-text or point-text pairs: ImageBind binds through images.
5. ``encoder``: the towers' encoder with the audio and point towers of steps 3 and 4 (``encoder/``).
6. ``stage1``: ``train stage1`` on SmolLM2 with (scene, caption) and (render, "a 3D torus").
7. ``stage2``: ``train stage2`` on the scenes' questions, each its own one-turn sample (`single_turns`), and the
   renders' "What object is this?".
8. ``evaluate``: MME on the held-out scenes (``eval mme``), and the emergent zero-shot check: the LLM, which
   never saw audio or points, asked about held-out spoken captions and point clouds, with trained and with
   zero gates; writes ``evaluate.json``.
9. ``ship``: ``demo/`` holds the model as a package would ship it (adapter folder + the encoder as float16
   safetensors), ``curves.png`` every training step's loss.

Steps 3, 4 and 6-7 only read the frozen vision tower of step 2, so they may also run side by side, with
``--only`` and ``OMP_NUM_THREADS=1`` each on two cores (two 2-thread trainings on 2 cores ran 4-6x slower than
one alone)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/demo/build.py --out runs/demo --only audio point encoder &
    OMP_NUM_THREADS=1 .venv/bin/python scripts/demo/build.py --out runs/demo --only stage1 stage2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file

from imagebind_llm.encoders.imagebind import read_config
from imagebind_llm.eval.mme_score import score_dir
from imagebind_llm.hub import DEMO_DIR, read_state_dict
from imagebind_llm.world.language import MME_SUFFIX

sys.path.insert(0, str(Path(__file__).resolve().parent))
from towers import TOWERS  # noqa: E402  (the tower sizes live with their measurements and probes)

STEPS = ("world", "towers", "audio", "point", "encoder", "stage1", "stage2", "evaluate", "ship")
TRAINED = ("towers", "audio", "point", "stage1", "stage2")  # the steps whose loss curves go in curves.png
BIND_HIDDEN = 576  # the bind network's SwiGLU width: SmolLM2's own; the official 4 x 576 made a 48 MB adapter
HEAR = "Describe this image in detail."  # asked about a spoken caption: the LLM only ever learned to describe images
WHAT = "What object is this?"  # asked about a point cloud (the renders' stage-2 question)
FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "demo"


@dataclass(frozen=True)
class Scale:
    """How much of everything: scenes, clouds, and per step its epochs and batch."""

    train: int
    heldout: int
    points: int
    variants: int
    tower_epochs: int
    bind_epochs: int  # audio binding; points take point_epochs
    point_epochs: int
    stage1_scenes: int  # scenes (and a fifth as many renders) of stage 1's one epoch; stage 2 likewise
    stage2_scenes: int
    yes_no: int  # stage 2: yes/no questions and open questions asked per scene, each a one-turn sample
    open: int
    batch: int
    llm_batch: int
    inject_layers: int
    zero_shot: int  # held-out audio clips / clouds asked about


SCALES = {
    "full": Scale(train=16000, heldout=500, points=3000, variants=4, tower_epochs=5, bind_epochs=3, point_epochs=3,
                  stage1_scenes=3000, stage2_scenes=1800, yes_no=4, open=2, batch=64, llm_batch=8, inject_layers=8,
                  zero_shot=60),
    # the same world, about half the compute (for a machine at half speed: towers ran 22 pairs/s on 2026-12-02)
    "quick": Scale(train=16000, heldout=500, points=3000, variants=4, tower_epochs=3, bind_epochs=2, point_epochs=2,
                   stage1_scenes=2000, stage2_scenes=1400, yes_no=4, open=2, batch=64, llm_batch=8, inject_layers=8,
                   zero_shot=60),
    "tiny": Scale(train=16, heldout=8, points=12, variants=4, tower_epochs=1, bind_epochs=1, point_epochs=2,
                  stage1_scenes=16, stage2_scenes=16, yes_no=2, open=1, batch=8, llm_batch=2, inject_layers=2,
                  zero_shot=4),
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


def step_towers(out: Path, scale: Scale, towers: dict) -> None:
    """New vision and text towers of the sizes ``towers`` trained against each other on the world's (scene,
    caption) and (render, "a 3D torus") pairs, each family of counterfactual scenes in one batch."""
    world = out / "world"
    (out / "towers.json").write_text(json.dumps(towers, indent=1))
    train_bind(out, "towers", scale, [
        "bind.anchor=null", "bind.modalities=[vision,text]", "bind.mode=joint", f"bind.imagebind_config={out / 'towers.json'}",
        f"data.train=[{world / 'train/pairs_vision_text.jsonl'},{world / 'train/pairs_render_text.jsonl'}]",
        f"data.eval=[{world / 'heldout/pairs_vision_text.jsonl'}]",
        f"data.group_size={scale.variants}", f"train.epochs={scale.tower_epochs}"])


def bind_to_vision(out: Path, scale: Scale, modality: str) -> None:
    world, encoder = out / "world", out / "towers" / "encoder"
    train_bind(out, modality, scale, [
        "bind.anchor=vision", f"bind.modalities=[{modality}]", "bind.mode=scratch",
        f"bind.imagebind={encoder / 'imagebind.pth'}", f"bind.imagebind_config={encoder / 'imagebind_config.json'}",
        f"data.train=[{world / f'train/pairs_vision_{modality}.jsonl'}]",
        f"data.eval=[{world / f'heldout/pairs_vision_{modality}.jsonl'}]",
        f"train.epochs={scale.point_epochs if modality == 'point' else scale.bind_epochs}",
        f"bind.anchor_features={out / f'{modality}_anchor'}"])  # the frozen vision side, encoded once


def step_encoder(out: Path) -> None:
    """One encoder of every tower: the towers' checkpoint with the audio and point towers bound to its vision."""
    state = read_state_dict(out / "towers" / "encoder" / "imagebind.pth", what="ImageBind checkpoint")
    for modality in ("audio", "point"):
        bound = read_state_dict(out / modality / "encoder" / "imagebind.pth", what="ImageBind checkpoint")
        state.update({k: v for k, v in bound.items() if f".{modality}." in k})
    (out / "encoder").mkdir(exist_ok=True)
    torch.save(state, out / "encoder" / "imagebind.pth")
    shutil.copyfile(out / "towers" / "encoder" / "imagebind_config.json", out / "encoder" / "imagebind_config.json")


def train_stage(out: Path, scale: Scale, stage: int, files: list[str], sets: list[str]) -> None:
    encoder, run = out / "towers" / "encoder", out / f"stage{stage}"  # only its vision tower is used
    overrides = [
        f"model.imagebind={encoder / 'imagebind.pth'}", f"model.imagebind_config={encoder / 'imagebind_config.json'}",
        f"model.inject_layers={scale.inject_layers}", f"data.train=[{','.join(files)}]",
        f"data.image_root={out / 'world' / 'train'}", f"train.output_dir={run}", f"train.batch_size={scale.llm_batch}",
        f"model.bind_hidden_dim={BIND_HIDDEN}", "data.num_workers=0", "train.progress=false",
        "train.save_every=100000", *sets]
    cli("train", f"stage{stage}", "--overwrite", *set_args(overrides), log=out / f"stage{stage}.log")


def subset(source: Path, out: Path, n: int) -> str:
    """The first ``n`` examples of a captions TSV (header kept) or an instructions JSON, written to ``out``."""
    if source.suffix == ".tsv":
        out.write_text("".join(source.read_text().splitlines(keepends=True)[:n + 1]))
    else:
        out.write_text(json.dumps(json.loads(source.read_text())[:n]))
    return str(out)


def stage_files(out: Path, stage: int, scenes: int, names: tuple[str, str]) -> list[str]:
    """Stage ``stage``'s training files: ``scenes`` scenes and a fifth as many renders, the epoch's size
    chosen for the time budget (the world holds more for the towers)."""
    train, folder = out / "world" / "train", out / f"data{stage}"
    folder.mkdir(exist_ok=True)
    return [subset(train / name, folder / name, n) for name, n in zip(names, (scenes, max(scenes // 5, 1)))]


def step_stage1(out: Path, scale: Scale) -> None:
    files = stage_files(out, 1, scale.stage1_scenes, ("captions.tsv", "render_captions.tsv"))
    train_stage(out, scale, 1, files, ["train.epochs=1", "optim.lr=1e-3", "optim.warmup_epochs=0.05",
                                       "data.max_words=64"])


def single_turns(path: str, yes_no: int, open_: int, seed: int) -> None:
    """Rewrite the conversations of ``path`` as one-turn samples: per scene ``yes_no`` of its MME-form
    questions and ``open_`` of the others, drawn at random. Whole conversations teach a shortcut: a question
    asked after the description or a related question is answered from the text above it, not the image (a
    first run's yes/no answers followed the image, not the question); and each turn repeats the ~40-token
    prompt template, so 200 tokens held only the first four of a scene's ~16 questions."""
    rng, samples = random.Random(seed), []
    for chat in json.loads(Path(path).read_text()):
        turns = chat["conversations"]
        pairs = [(turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
        asked = [qa for qa in pairs if qa[0].endswith(MME_SUFFIX)]
        rest = [qa for qa in pairs if not qa[0].endswith(MME_SUFFIX)]
        for j, (question, answer) in enumerate(rng.sample(asked, min(yes_no, len(asked)))
                                               + rng.sample(rest, min(open_, len(rest)))):
            samples.append({"id": f"{chat['id']}-{j}", "image": chat["image"], "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    Path(path).write_text(json.dumps(samples))


def step_stage2(out: Path, scale: Scale, seed: int) -> None:
    files = stage_files(out, 2, scale.stage2_scenes, ("instructions.json", "render_instructions.json"))
    single_turns(files[0], scale.yes_no, scale.open, seed)
    train_stage(out, scale, 2, files, [f"model.adapter={out / 'stage1' / 'pretrained'}", "train.epochs=1",
                                       f"model.lora_layers={scale.inject_layers}",  # backward stops there
                                       "optim.clip_grad=1.0",  # unclipped, 1400 scenes' run hit a NaN at step 345
                                       "optim.lr=5e-4", "optim.warmup_epochs=0.05", "data.max_words=160"])


def step_evaluate(out: Path, scale: Scale) -> None:
    encoder, weights = out / "encoder", out / "stage2" / "pretrained"
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
    from imagebind_llm import create_model

    encoder, heldout = out / "encoder", out / "world" / "heldout"
    model = create_model(None, adapter=str(out / "stage2" / "pretrained"), imagebind=str(encoder / "imagebind.pth"),
                         imagebind_config=str(encoder / "imagebind_config.json"))
    scores: dict[str, dict[str, float]] = {}
    for modality in ("audio", "point"):
        rows = [json.loads(line) for line in (heldout / f"zeroshot_{modality}.jsonl").read_text().splitlines()]
        for gates in ("trained", "zero"):
            hits = named(model, modality, rows[:scale.zero_shot], heldout, zero_gates=gates == "zero")
            scores.setdefault(modality, {})[gates] = sum(hits) / max(len(hits), 1)
    return scores


@contextlib.contextmanager
def gates_off(model) -> Iterator[None]:
    """Every gate of ``model`` at zero inside the block (no media reaches the LLM); the trained values after."""
    trained = [g.detach().clone() for g in model.gates]
    with torch.no_grad():
        for g in model.gates:
            g.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for g, value in zip(model.gates, trained):
                g.copy_(value)


@torch.inference_mode()
def named(model, modality: str, rows: list[dict[str, str]], root: Path, zero_gates: bool = False) -> list[bool]:
    """Whether the answer about each zero-shot row (``{modality: path under root, "label": ...}``) names its
    label: a clip's colour and shape (asked `HEAR`), a cloud's primitive (asked `WHAT`)."""
    from imagebind_llm import load_media

    question = HEAR if modality == "audio" else WHAT
    with gates_off(model) if zero_gates else contextlib.nullcontext():
        answers = [model.ask(question, load_media({modality: str(root / row[modality])}), temperature=0,
                             max_new_tokens=48).lower() for row in rows]
    return [all(word in answer for word in row["label"].split()) for row, answer in zip(rows, answers)]


def step_ship(out: Path) -> None:
    """The shippable model in ``out/demo``: the adapter folder and the whole encoder with float16 tensors (the
    package ships <= 40 MB; the encoder's text token table alone is 25 MB in float32), which
    ``create_model(adapter=demo, imagebind=demo/imagebind.safetensors)`` loads; and the training curves."""
    ship = out / "demo"
    ship.mkdir(exist_ok=True)
    draw_curves({name: out / name / "log.jsonl" for name in TRAINED}, out / "curves.png")
    config = json.loads((out / "stage2" / "pretrained" / "config.json").read_text())
    config["encoder"] = read_config(out / "encoder" / "imagebind_config.json", with_point=True).to_dict()  # + the bound towers
    (ship / "config.json").write_text(json.dumps(config, indent=2))
    for state, name in ((load_file(str(out / "stage2" / "pretrained" / "adapter.safetensors")), "adapter.safetensors"),
                        (read_state_dict(out / "encoder" / "imagebind.pth", what="ImageBind checkpoint"),
                         "imagebind.safetensors")):  # the encoder last: its file marks the step done
        save_file({k: v.half().contiguous() if v.is_floating_point() else v for k, v in state.items()}, str(ship / name))


def install(out: Path, sample: int = 12) -> None:
    """Make ``out/demo`` the package's demo model, and copy a held-out sample into ``tests/fixtures/demo``
    (what the demo model's tests ask about): the first ``sample`` zero-shot clips and clouds with their
    manifests, and the first ``sample`` images of each MME subtask with their questions."""
    shutil.copytree(out / "demo", DEMO_DIR, dirs_exist_ok=True)
    heldout = out / "world" / "heldout"
    shutil.rmtree(FIXTURES, ignore_errors=True)
    for modality in ("audio", "point"):
        manifest = f"zeroshot_{modality}.jsonl"
        rows = (heldout / manifest).read_text().splitlines()[:sample]
        for row in map(json.loads, rows):
            (FIXTURES / row[modality]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(heldout / row[modality], FIXTURES / row[modality])
        (FIXTURES / manifest).write_text("".join(line + "\n" for line in rows))
    for task in sorted((heldout / "mme").iterdir()):
        for image in sorted((task / "images").iterdir())[:sample]:
            for kind, name in (("images", image.name), ("questions_answers_YN", f"{image.stem}.txt")):
                (FIXTURES / "mme" / task.name / kind).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(task / kind / name, FIXTURES / "mme" / task.name / kind / name)
    print(f"installed {out / 'demo'} as the package's demo model in {DEMO_DIR}; test media in {FIXTURES}")


def draw_curves(logs: dict[str, Path], path: Path, width: int = 360, height: int = 220) -> None:
    """One panel per run: training loss against step, read from its ``log.jsonl``, side by side in ``path``."""
    font = ImageFont.load_default(size=12)
    image = Image.new("RGB", (width * len(logs), height), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, log) in enumerate(logs.items()):
        rows = [json.loads(line) for line in log.read_text().splitlines()]
        points = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        left, top, right, bottom = i * width + 46, 24, (i + 1) * width - 12, height - 28
        draw.rectangle([left, top, right, bottom], outline="#999999")
        draw.text((left, 6), f"{name}: loss", fill="black", font=font)
        if not points:
            continue
        steps, losses = zip(*points)
        lo, hi, last = min(losses), max(losses), max(steps)
        xy = [(left + (right - left) * s / last, bottom - (bottom - top) * (v - lo) / ((hi - lo) or 1))
              for s, v in points]
        draw.line(xy, fill="#1f77b4", width=2)
        for value, y in ((hi, top), (lo, bottom)):
            draw.text((i * width + 4, y - 6), f"{value:.2f}", fill="#555555", font=font)
        draw.text((right - 70, bottom + 6), f"{last} steps", fill="#555555", font=font)
    image.save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="build folder (every step's run and log)")
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--towers", type=Path, help="JSON of ImageBindConfig fields replacing those of TOWERS "
                   "(experiments; towers.py probes the result)")
    p.add_argument("--from", dest="start", choices=STEPS, help="redo this step and every later one")
    p.add_argument("--only", nargs="+", choices=STEPS, default=STEPS, help="run only these steps")
    p.add_argument("--install", action="store_true", help=f"copy the shipped model into {DEMO_DIR} (the default model)")
    args = p.parse_args()
    scale = SCALES[args.scale]
    towers = {**TOWERS, **json.loads(args.towers.read_text())} if args.towers else TOWERS
    args.out.mkdir(parents=True, exist_ok=True)
    done = {"world": "world/world.json", "towers": "towers/encoder/imagebind_config.json",
            "audio": "audio/encoder/imagebind_config.json", "point": "point/encoder/imagebind_config.json", "encoder": "encoder/imagebind_config.json",
            "stage1": "stage1/pretrained/config.json", "stage2": "stage2/pretrained/config.json",
            "evaluate": "evaluate.json", "ship": "demo/imagebind.safetensors"}
    run = {"world": lambda: step_world(args.out, scale, args.seed), "towers": lambda: step_towers(args.out, scale, towers),
           "audio": lambda: bind_to_vision(args.out, scale, "audio"),
           "point": lambda: bind_to_vision(args.out, scale, "point"), "encoder": lambda: step_encoder(args.out),
           "stage1": lambda: step_stage1(args.out, scale), "stage2": lambda: step_stage2(args.out, scale, args.seed),
           "evaluate": lambda: step_evaluate(args.out, scale), "ship": lambda: step_ship(args.out)}
    redo = STEPS[STEPS.index(args.start):] if args.start else ()
    for name in STEPS:
        if name not in args.only:
            continue
        if name not in redo and (args.out / done[name]).exists():
            print(f"{name}: done ({args.out / done[name]})")
            continue
        start = time.time()
        run[name]()
        print(f"{name}: {time.time() - start:.0f} s", flush=True)
    if args.install:
        install(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
