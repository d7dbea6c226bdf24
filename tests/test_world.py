"""The synthetic world: same seed, same bytes; held-out pairs never in training; every answer right by an
independent reading of the scene graph; files that the training data reader, the MME reader and scorer and the
zero-shot manifests accept; real sklearn digits; point clouds as the Point-BERT preprocessing loads them;
espeak-ng speech at 16 kHz (skipped, saying why, without espeak-ng); the command's one-line errors."""

import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagebind_llm.cli import main
from imagebind_llm.encoders.config import MODALITIES
from imagebind_llm.eval.mme import load_mme
from imagebind_llm.eval.mme_score import score_lines
from imagebind_llm.eval.zero_shot import labelled_set, read_manifest
from imagebind_llm.preprocess import load_audio, load_points
from imagebind_llm.train.data import read_examples
from imagebind_llm.world import (COLOURS, MME_SUBTASKS, POSITIONS, PRIMITIVES, SAMPLE_RATE, SHAPES, WORDS, Scene,
                                 WorldError, digit_scans, espeak_missing, generate, heldout_pairs, make_scene,
                                 point_cloud, render_primitive, render_scene, sample_scene, sample_solid, speak,
                                 surface, write_wav)
from imagebind_llm.world import scene as scene_module
from imagebind_llm.world.language import NUMBER_WORDS

MISSING_FONTS = [name for name in scene_module.FONTS if not (scene_module.FONT_DIR / name).is_file()]
pytestmark = pytest.mark.skipif(bool(MISSING_FONTS), reason=f"signs need Debian's fonts-dejavu-core: "
                                f"{', '.join(MISSING_FONTS)} missing in {scene_module.FONT_DIR}")
NO_ESPEAK = espeak_missing()
needs_espeak = pytest.mark.skipif(bool(NO_ESPEAK), reason=f"needs espeak-ng for speech: {NO_ESPEAK}")
AUDIO = not NO_ESPEAK
SMALL = dict(seed=7, train=8, heldout=8, points=6, heldout_points=6, audio=AUDIO)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("world") / "w", **SMALL)


# ------------------------------------------------------------------------------------------ determinism, splits
def test_same_seed_same_bytes(world, tmp_path):
    again = generate(tmp_path / "again", **SMALL)
    assert _files(again) == _files(world)
    other = generate(tmp_path / "other", **{**SMALL, "seed": 8, "audio": False})
    assert (other / "train/scenes/000000.png").read_bytes() != (world / "train/scenes/000000.png").read_bytes()


def test_heldout_pairs_never_occur_in_training(world):
    info = json.loads((world / "world.json").read_text())
    held = {tuple(p) for p in info["heldout_pairs"]}
    assert held == set(heldout_pairs(np.random.default_rng([7, 2])))
    assert {c for c, _ in held} == set(COLOURS) and len(held) == len(COLOURS)  # one shape per colour
    pairs = sorted(held)

    def named(text: str) -> bool:  # "red star", or "Is the star in this image red?"
        return any(f"{c} {s}" in text or f"{s} in this image {c}" in text for c, s in held)

    for index in range(400):  # far more scenes than the folder holds: make_scene is what writes them
        record = make_scene(7, "train", index, pairs)
        assert not record.scene.pairs & held
        assert not named(" ".join(qa.question for qa in record.qas))  # not even as a yes/no question's wrong answer
    for line in (world / "heldout/scenes.jsonl").read_text().splitlines():
        shapes = json.loads(line)["shapes"]
        assert {(s["colour"], s["shape"]) for s in shapes} & held
    assert not named((world / "train/captions.tsv").read_text() + (world / "train/instructions.json").read_text())


def _differences(a: Scene, b: Scene) -> list[str]:
    """What tells two scenes apart, read from their graphs: ``shape`` per shape whose kind alone differs,
    ``word``, ``digit``, or ``other`` for anything else."""
    found = ["shape" for x, y in zip(a.shapes, b.shapes) if x != y and x.shape != y.shape
             and (x.colour, x.size, x.cell, x.offset) == (y.colour, y.size, y.cell, y.offset)]
    if len(a.shapes) != len(b.shapes) or sum(x != y for x, y in zip(a.shapes, b.shapes)) != len(found):
        found.append("other")
    if a.sign != b.sign:
        same_place = a.sign and b.sign and (a.sign.cell, a.sign.font) == (b.sign.cell, b.sign.font)
        found.append("word" if same_place and a.sign.word != b.sign.word else "other")
    if a.digit != b.digit:
        same_place = a.digit and b.digit and a.digit.cell == b.digit.cell
        found.append("digit" if same_place and a.digit.value != b.digit.value else "other")
    return found + ["other"] * (a.background != b.background)


def test_variants_are_families_of_one_change_that_keep_the_heldout_pairs_out(tmp_path):
    pairs = heldout_pairs(np.random.default_rng(3))
    held, changes = set(pairs), []
    for first in range(0, 4 * 60, 4):
        base = make_scene(3, "train", first, pairs, variants=4)
        assert base == make_scene(3, "train", first, pairs)  # the first of a family is the plain scene
        for index in range(first + 1, first + 4):
            record = make_scene(3, "train", index, pairs, variants=4)
            diff = _differences(base.scene, record.scene)
            assert len(diff) == 1 and diff[0] != "other", (base.scene, record.scene)
            assert not record.scene.pairs & held and record.caption != base.caption
            assert all(qa.answer == _oracle(record.scene, qa.question) for qa in record.qas if qa.kind != "description")
            changes += diff
    assert {"shape", "word", "digit"} <= set(changes)
    out = generate(tmp_path / "v", seed=3, train=8, heldout=2, audio=False, variants=4)
    rows = [json.loads(line) for line in (out / "train/pairs_vision_text.jsonl").read_text().splitlines()]
    info = json.loads((out / "world.json").read_text())
    pairs = [tuple(p) for p in info["heldout_pairs"]]
    assert [r["text"] for r in rows] == [make_scene(3, "train", i, pairs, variants=4).caption for i in range(8)]
    assert info["train_variants"] == 4


# ------------------------------------------------------------------------------------------ answers
def _oracle(scene: Scene, question: str) -> str:
    """The answer to a generated question, read from the scene graph independently of the generator."""
    q = question.removesuffix(" Please answer yes or no.")

    def yes(ok: bool) -> str:
        return "Yes" if ok else "No"

    colours, shapes = "|".join(COLOURS), "|".join(SHAPES)
    phrases = {phrase: cell for cell, (_, phrase) in enumerate(POSITIONS)}
    if m := re.fullmatch(rf"Is there an? ({colours}) ({shapes}) in this image\?", q):
        return yes((m[1], m[2]) in scene.pairs)
    if m := re.fullmatch(r"(?:Is|Are) there exactly (\w+) shapes? in this image\?", q):
        return yes(NUMBER_WORDS.index(m[1]) == len(scene.shapes))
    if m := re.fullmatch(rf"Is the ({colours}) ({shapes}) (.+) of the image\?", q):
        [shape] = [s for s in scene.shapes if s.pair == (m[1], m[2])]
        return yes(phrases[m[3]] == shape.cell)
    if m := re.fullmatch(rf"Is the ({shapes}) in this image ({colours})\?", q):
        [shape] = [s for s in scene.shapes if s.shape == m[1]]
        return yes(shape.colour == m[2])
    if m := re.fullmatch(r'Does the sign say "(\w+)"\?', q):
        return yes(scene.sign.word == m[1])
    if m := re.fullmatch(r"Is the handwritten digit a (\d)\?", q):
        return yes(scene.digit.value == int(m[1]))
    if q == "How many shapes are there in the image?":
        return str(len(scene.shapes))
    if m := re.fullmatch(rf"How many ({colours}) shapes are there in the image\?", q):
        return str(sum(s.colour == m[1] for s in scene.shapes))
    if m := re.fullmatch(rf"Where is the ({colours}) ({shapes}) in the image\?", q):
        [shape] = [s for s in scene.shapes if s.pair == (m[1], m[2])]
        return POSITIONS[shape.cell][0]
    if m := re.fullmatch(rf"What color is the ({shapes})\?", q):
        [shape] = [s for s in scene.shapes if s.shape == m[1]]
        return shape.colour
    if q == "What word is written on the sign?":
        return scene.sign.word
    if q == "Which digit is written on the card?":
        return str(scene.digit.value)
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_answer_matches_the_scene_graph(split):
    pairs = heldout_pairs(np.random.default_rng(0))
    kinds = set()
    for index in range(150):
        record = make_scene(0, split, index, pairs)
        scene = record.scene
        for qa in record.qas:
            kinds.add(qa.kind)
            if qa.kind == "description":
                assert f"The image shows {NUMBER_WORDS[len(scene.shapes)]} shape" in qa.answer
                assert all(f"{s.size} {s.colour} {s.shape}" in qa.answer for s in scene.shapes)
            else:
                assert qa.answer == _oracle(scene, qa.question), qa
        for task, (first, second) in record.mme.items():
            assert (first.answer, second.answer) == ("Yes", "No") and first.kind == second.kind == task
            assert _oracle(scene, first.question) == "Yes" and _oracle(scene, second.question) == "No"
        if split == "heldout":
            assert set(record.mme) == set(MME_SUBTASKS) - (set() if scene.sign or scene.digit else {"OCR"})
            asked = record.mme["existence"][0].question
            assert any(f"{c} {s}" in asked for c, s in scene.pairs & set(pairs))  # about an unseen pair
        for s in scene.shapes:
            assert f"{s.size} {s.colour} {s.shape} {POSITIONS[s.cell][1]}" in record.caption
    assert kinds == {"existence", "count", "position", "color", "OCR", "description"}


# ------------------------------------------------------------------------------------------ readers of ours
def test_mme_folders_load_and_score(world):
    tasks, missing = load_mme(world / "heldout/mme", MME_SUBTASKS)
    assert missing == [] and set(tasks) == set(MME_SUBTASKS)
    assert len(tasks["existence"]) == 2 * 8 and len(tasks["OCR"]) == 2 * 4  # held-out scenes 1, 3, 5, 7 have text
    for name, questions in tasks.items():
        assert [q.answer for q in questions] == ["Yes", "No"] * (len(questions) // 2)
        lines = [q.line(q.answer) for q in questions]  # a perfect model
        assert score_lines(lines, name).score == 200.0
        assert all(q.image.is_file() and q.image.stat().st_size > 0 for q in questions)


def test_training_files_are_read_by_the_trainer(world):
    for split, n in (("train", 8), ("heldout", 8)):
        folder = world / split
        captions = read_examples([folder / "captions.tsv"], image_root=folder)
        scenes = [json.loads(line) for line in (folder / "scenes.jsonl").read_text().splitlines()]
        assert [ex.captions for ex in captions] == [[s["caption"]] for s in scenes] and len(captions) == n
        chats = read_examples([folder / "instructions.json"], image_root=folder)
        assert len(chats) == n and all(len(ex.turns) >= 10 for ex in chats)
        assert all(Path(ex.image).is_file() for ex in captions + chats)
        assert chats[0].turns[0][0] != "" and "<image>" not in chats[0].turns[0][0]
        image = Image.open(captions[0].image)
        assert image.size == (224, 224) and image.mode == "RGB"


def test_pair_manifests_and_zero_shot_sets(world):
    for split in ("train", "heldout"):
        folder = world / split
        names = ["pairs_vision_text.jsonl", "pairs_vision_point.jsonl", "pairs_render_text.jsonl"] \
            + ["pairs_vision_audio.jsonl"] * AUDIO
        for name in names:
            rows = [json.loads(line) for line in (folder / name).read_text().splitlines()]
            assert rows and all(set(row) <= set(MODALITIES) and "vision" in row for row in rows)
            for row in rows:
                for key, value in row.items():
                    assert key == "text" or (folder / value).is_file(), (name, value)
    heldout = world / "heldout"
    points = labelled_set(read_manifest(heldout / "zeroshot_point.jsonl"), "point", heldout)
    assert points.classes == sorted(PRIMITIVES) and len(points.sources) == 6
    images = labelled_set(read_manifest(heldout / "zeroshot_image.jsonl"), "image", heldout)
    held = {" ".join(p) for p in json.loads((world / "world.json").read_text())["heldout_pairs"]}
    assert images.sources and set(images.classes) <= held  # one-shape held-out scenes show an unseen pair
    if AUDIO:
        audio = labelled_set(read_manifest(heldout / "zeroshot_audio.jsonl"), "audio", heldout)
        assert audio.classes == images.classes and len(audio.sources) == len(images.sources)


def test_render_captions_and_questions_name_each_clouds_primitive(world):
    heldout = world / "heldout"
    labels = [row["label"] for row in map(json.loads, (heldout / "zeroshot_point.jsonl").read_text().splitlines())]
    for split in ("train", "heldout"):
        folder = world / split
        captions = read_examples([folder / "render_captions.tsv"], image_root=folder)
        chats = read_examples([folder / "render_instructions.json"], image_root=folder)
        pairs = [json.loads(line) for line in (folder / "pairs_vision_point.jsonl").read_text().splitlines()]
        texts = [json.loads(line) for line in (folder / "pairs_render_text.jsonl").read_text().splitlines()]
        assert [Path(ex.image) for ex in captions] == [Path(ex.image) for ex in chats] \
            == [folder / row["vision"] for row in pairs] == [folder / row["vision"] for row in texts]
        assert [row["text"] for row in texts] == [ex.captions[0] for ex in captions]
        names = [ex.captions[0].removeprefix("a 3D ") for ex in captions]
        assert set(names) <= set(PRIMITIVES) and [ex.turns[0][1] for ex in chats] == [f"A {n}." for n in names]
        if split == "heldout":
            assert names == labels


# ------------------------------------------------------------------------------------------ pieces
def test_digits_are_real_sklearn_scans():
    from sklearn.datasets import load_digits

    digits = load_digits()
    for seed, heldout in ((0, False), (1, True)):
        scene = sample_scene(np.random.default_rng(seed), n_shapes=1, text="digit", heldout=heldout)
        digit = scene.digit
        assert digit.value == digits.target[digit.index] and (digit.index % 5 == 0) == heldout
        assert np.array_equal(digit_scans()[0][digit.index], digits.images[digit.index])
        x, y = scene_module.cell_centre(digit.cell)
        card = np.asarray(render_scene(scene).convert("L"), dtype=np.float64)
        ink = 255 - card[int(y) - 21:int(y) + 21, int(x) - 21:int(x) + 21]  # the scan's area on the 56-pixel card
        small = np.asarray(Image.fromarray(np.uint8(ink)).resize((8, 8), Image.Resampling.BOX), dtype=np.float64)
        assert np.corrcoef(small.ravel(), digits.images[digit.index].ravel())[0, 1] > 0.9


def test_signs_render_their_word_and_fit_the_cell():
    scene = sample_scene(np.random.default_rng(3), n_shapes=1, text="sign")
    assert scene.sign.word in WORDS and len(set(WORDS)) == len(WORDS) >= 100
    image = np.asarray(render_scene(scene))
    x, y = scene_module.cell_centre(scene.sign.cell)
    patch = image[int(y) - 8:int(y) + 8, int(x) - 30:int(x) + 30]
    assert (patch.max(axis=2) < 80).mean() > 0.05  # dark letters on the light sign


def test_point_clouds_and_renders():
    rng = np.random.default_rng(0)
    for primitive in PRIMITIVES:
        p, normal = surface(primitive, 2000, rng)
        assert p.shape == normal.shape == (2000, 3)
        np.testing.assert_allclose(np.linalg.norm(normal, axis=1), 1, atol=1e-9)
        solid = sample_solid(rng, primitive)
        cloud = point_cloud(solid, rng)
        assert cloud.shape == (8192, 3) and cloud.dtype == np.float32
        np.testing.assert_allclose(cloud.mean(axis=0), 0, atol=1e-5)
        assert abs(np.linalg.norm(cloud, axis=1).max() - 1) < 1e-5
        np.testing.assert_allclose(load_points(cloud)[0].numpy(), cloud, atol=1e-5)  # already as the encoder takes it
        image = render_primitive(solid)
        assert image.size == (224, 224) and np.asarray(image).std() > 10
        assert render_primitive(solid).tobytes() == image.tobytes()
    sphere, _ = surface("sphere", 500, rng)
    np.testing.assert_allclose(np.linalg.norm(sphere, axis=1), 1)
    cube, _ = surface("cube", 500, rng)
    np.testing.assert_allclose(np.abs(cube).max(axis=1), 1 / np.sqrt(3))
    torus, _ = surface("torus", 500, rng)
    np.testing.assert_allclose(np.hypot(np.hypot(torus[:, 0], torus[:, 1]) - 0.7, torus[:, 2]), 0.3)


def test_saved_clouds_load_unchanged(world):
    path = world / "train/points/000000.npy"
    np.testing.assert_allclose(load_points([str(path)])[0].numpy(), np.load(path), atol=1e-5)


@needs_espeak
def test_speech_is_16khz_and_loads_as_audio(tmp_path, world):
    text = "a large red star in the center"
    samples = speak(text, "en-gb", 170)
    assert samples.dtype == np.float32 and 0.8 * SAMPLE_RATE < len(samples) < 4 * SAMPLE_RATE
    assert np.abs(samples).max() > 0.05 and np.array_equal(samples, speak(text, "en-gb", 170))
    assert len(speak(text, "en-gb", 130)) > len(samples)  # slower is longer
    write_wav(tmp_path / "s.wav", samples)
    assert load_audio([str(tmp_path / "s.wav")]).shape == (1, 3, 1, 128, 204)
    with wave.open(str(world / "train/audio/000000.wav")) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (16000, 1, 2)


# ------------------------------------------------------------------------------------------ command line
def _error(capsys, argv: list[str]) -> str:
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err  # one line, no traceback
    return lines[0]


def test_command_errors_are_one_line(capsys, tmp_path):
    base = ["world", "generate", "--no-audio", "--no-progress", "--train", "2", "--heldout", "1"]
    (tmp_path / "file").write_text("x")
    assert "is a file" in _error(capsys, [*base, "--out", str(tmp_path / "file")])
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert "--overwrite" in _error(capsys, [*base, "--out", str(tmp_path / "full")])
    assert "not a world folder" in _error(capsys, [*base, "--out", str(tmp_path / "full"), "--overwrite"])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert "train must be an integer >= 1" in _error(capsys, [*base, "--train", "0", "--out", str(tmp_path / "w")])
    assert "points must be an integer >= 0" in _error(capsys, [*base, "--points", "-1", "--out", str(tmp_path / "w")])
    assert "variants must be an integer >= 1" in _error(capsys, [*base, "--variants", "0", "--out", str(tmp_path / "w")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]  # nothing half-written


def test_command_writes_and_overwrites_a_world(capsys, tmp_path):
    out = tmp_path / "w"
    argv = ["world", "generate", "--out", str(out), "--no-audio", "--no-progress", "--train", "3", "--heldout", "2"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["train"]["scenes"] == 3 and (out / "world.json").is_file()
    assert main([*argv, "--seed", "1"]) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--seed", "1", "--overwrite"]) == 0
    assert json.loads((out / "world.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]


def test_a_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def fail_on_third(scene):
        calls.append(scene)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return Image.new("RGB", (224, 224))

    monkeypatch.setattr("imagebind_llm.world.write.render_scene", fail_on_third)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(tmp_path / "w", train=5, heldout=1, audio=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WorldError, match="seed must be"):
        generate(tmp_path / "w", seed=-1, audio=False)
