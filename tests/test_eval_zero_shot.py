"""Zero-shot evaluation: recall maths on hand-computed matrices, datasets, the feature cache, the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from imagebind_llm import preprocess
from imagebind_llm.eval import zero_shot_cli
from imagebind_llm.eval.zero_shot import (FeatureCache, classify, encode, evaluate_classification, evaluate_retrieval,
                                          labelled_set, paired_set, read_folder, read_manifest, recall_at_k,
                                          topk_accuracy, transpose)

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


class ColourEmbedder:
    """A fake encoder whose classes are separable: an image is the one-hot of its strongest channel, a text
    the one-hot of the colour word it contains. Records every call."""

    def __init__(self) -> None:
        self.word_ids = [int(preprocess.tokenize(name)[0, 1]) for name in COLOURS]  # the token after <start>
        self.calls: list[tuple[str, int]] = []

    def embed_modality(self, name: str, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((name, x.shape[0]))
        if name == "image":  # [B, 3, 224, 224], normalised
            return F.one_hot(x.mean(dim=(2, 3)).argmax(dim=1), 3).float()
        hits = torch.stack([(x == i).any(dim=1) for i in self.word_ids], dim=1)  # [B, 77] ids -> [B, 3]
        return hits.float()


def _colour_folder(root: Path, per_class: int = 2) -> Path:
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(max(0, c - 40 * i) for c in rgb)
            Image.new("RGB", (32, 24), shade).save(folder / f"{i}.png")
        (folder / "notes.txt").write_text("not an image")
    return root


# --------------------------------------------------------------------------------------- recall maths
SIMILARITY = torch.tensor([[0.9, 0.1, 0.3, 0.2],
                           [0.8, 0.7, 0.1, 0.0],
                           [0.2, 0.6, 0.5, 0.4],
                           [0.1, 0.3, 0.2, 0.05]])


def test_recall_on_a_hand_computed_matrix_both_ways():
    # rows -> columns: the correct column (the diagonal) ranks 1, 2, 2, 4
    assert [recall_at_k(SIMILARITY, k) for k in (1, 2, 3, 4)] == [0.25, 0.75, 0.75, 1.0]
    # columns -> rows: the correct row ranks 1, 1, 1, 3
    assert [recall_at_k(SIMILARITY.T, k) for k in (1, 2, 3)] == [0.75, 0.75, 1.0]
    assert recall_at_k(SIMILARITY, 10) == 1.0  # k beyond the columns: all of them


def test_recall_with_many_captions_per_item():
    similarity = torch.tensor([[0.1, 0.9, 0.8, 0.0],   # item 0 has captions 0 and 1: caption 1 is first
                               [0.7, 0.2, 0.6, 0.5]])  # item 1 has captions 2 and 3: caption 0 is first
    positives = [frozenset({0, 1}), frozenset({2, 3})]
    assert recall_at_k(similarity, 1, positives) == 0.5
    assert recall_at_k(similarity, 2, positives) == 1.0
    back = transpose(positives, 4)
    assert back == [frozenset({0}), frozenset({0}), frozenset({1}), frozenset({1})]
    # captions -> items: caption 0 picks item 1 (wrong), 1 item 0, 2 item 0 (wrong), 3 item 1
    assert recall_at_k(similarity.T, 1, back) == 0.5
    assert recall_at_k(similarity.T, 2, back) == 1.0


def test_classify_and_topk_accuracy():
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    classes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert classify(features, classes).tolist() == [0, 1, 1]  # the third: 0.6 to class 0, 0.8 to class 1
    similarity, labels = features @ classes.T, torch.tensor([0, 1, 0])
    assert topk_accuracy(similarity, labels, 1) == pytest.approx(2 / 3)
    assert topk_accuracy(similarity, labels, 2) == 1.0


# --------------------------------------------------------------------------------------- datasets
def test_folder_dataset_takes_files_of_the_modality_per_class(tmp_path):
    root = _colour_folder(tmp_path / "data")
    (root / "dark_red").mkdir()
    Image.new("RGB", (8, 8), (120, 0, 0)).save(root / "dark_red" / "a.jpg")
    (root / ".hidden").mkdir()
    data = read_folder(root, "image")
    assert data.classes == ["blue", "dark red", "green", "red"]
    assert len(data.sources) == 7 and all(not s.endswith(".txt") for s in data.sources)
    assert data.labels == [0, 0, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="no audio files"):
        read_folder(root, "audio")


def test_tsv_manifest_pairs_repeated_items(tmp_path):
    (tmp_path / "m.tsv").write_text("image\ttext\na.jpg\ta dog\na.jpg\ta puppy\nsub/b.jpg\ta cat\n")
    data = paired_set(read_manifest(tmp_path / "m.tsv"), "image", "text", tmp_path)
    assert data.queries == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.jpg")]
    assert data.targets == ["a dog", "a puppy", "a cat"]
    assert data.positives == [frozenset({0, 1}), frozenset({2})]


def test_jsonl_manifest_lists_and_labels(tmp_path):
    lines = [{"audio": "x.wav", "text": ["rain", "a storm"], "label": "weather"},
             {"audio": "y.wav", "text": "a dog barking", "label": "animal"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    rows = read_manifest(tmp_path / "m.jsonl")
    pairs = paired_set(rows, "text", "audio", tmp_path)  # either column may be the query
    assert pairs.queries == ["rain", "a storm", "a dog barking"]
    assert pairs.positives == [frozenset({0}), frozenset({0}), frozenset({1})]
    labelled = labelled_set(rows, "audio", tmp_path)
    assert labelled.classes == ["animal", "weather"] and labelled.labels == [1, 0]
    with pytest.raises(ValueError, match="no rows with both"):
        paired_set(rows, "image", "text", tmp_path)


def test_manifest_columns_may_use_the_tower_names(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"vision": "a.png", "text": "a red cube"}) + "\n")
    data = paired_set(read_manifest(tmp_path / "m.jsonl"), "image", "text", tmp_path)
    assert data.queries == [str(tmp_path / "a.png")] and data.targets == ["a red cube"]


# --------------------------------------------------------------------------------------- evaluation
def test_separable_classes_get_accuracy_one(tmp_path):
    data = read_folder(_colour_folder(tmp_path / "data"), "image")
    metrics = evaluate_classification(ColourEmbedder(), data, "image", batch_size=4)
    assert metrics == {"top1": 1.0, "top5": 1.0, "items": 6, "classes": 3}


def test_retrieval_of_separable_pairs_is_perfect_both_ways(tmp_path):
    root = _colour_folder(tmp_path, per_class=1)
    (root / "m.tsv").write_text("image\ttext\n" + "".join(f"{c}/0.png\ta {c} thing\n" for c in COLOURS))
    metrics = evaluate_retrieval(ColourEmbedder(), paired_set(read_manifest(root / "m.tsv"), "image", "text", root),
                                 "image", "text")
    assert metrics["image_to_text_R@1"] == metrics["text_to_image_R@1"] == 1.0
    assert metrics["queries"] == metrics["targets"] == 3


def test_the_feature_cache_skips_encoding_on_a_rerun(tmp_path):
    data = read_folder(_colour_folder(tmp_path / "data"), "image")
    cache = FeatureCache(tmp_path / "features")
    first = ColourEmbedder()
    a = evaluate_classification(first, data, "image", batch_size=4, cache=cache, model_id="fake")
    assert first.calls == [("image", 4), ("image", 2), ("text", 4), ("text", 4), ("text", 4), ("text", 3)]
    again = ColourEmbedder()
    assert evaluate_classification(again, data, "image", batch_size=4, cache=cache, model_id="fake") == a
    assert again.calls == []
    other_model = ColourEmbedder()
    encode(other_model, "image", data.sources, cache=cache, model_id="another")
    assert other_model.calls == [("image", 6)]
    Image.new("RGB", (9, 9), (0, 0, 255)).save(data.sources[0])  # a changed file is encoded again
    changed = ColourEmbedder()
    encode(changed, "image", data.sources, cache=cache, model_id="fake")
    assert changed.calls == [("image", 6)]


# --------------------------------------------------------------------------------------- the command
def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    zero_shot_cli.add_zero_shot_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_command_prints_a_table_or_json(tmp_path, monkeypatch, capsys):
    root = _colour_folder(tmp_path / "data", per_class=1)
    monkeypatch.setattr(zero_shot_cli, "_embedder", lambda args: (ColourEmbedder(), "fake"))
    assert _run(["zero-shot", "--data", str(root), "--no-cache"]) == 0
    assert "3 items, 3 classes" in capsys.readouterr().out
    (root / "m.jsonl").write_text("".join(json.dumps({"image": f"{c}/0.png", "text": f"{c}"}) + "\n" for c in COLOURS))
    assert _run(["zero-shot", "--data", str(root / "m.jsonl"), "--task", "retrieve", "--json", "--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["text_to_image_R@1"] == 1.0
    with pytest.raises(ValueError, match="needs a manifest"):
        _run(["zero-shot", "--data", str(root), "--task", "retrieve"])


def test_command_with_the_demo_encoder_caches_its_features(tmp_path, capsys):
    root = _colour_folder(tmp_path / "data", per_class=1)
    argv = ["zero-shot", "--data", str(root), "--cache-dir", str(tmp_path / "features"), "--templates", "a {}."]
    assert _run(argv) == 0
    assert "top-1" in capsys.readouterr().out
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "features").iterdir())
    assert stored == ["image", "text"]
