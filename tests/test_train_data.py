"""Training data formats, the official sample layout, batching order, the typed config, and training from
the shard store of `imagebind_llm.cache.shards` (with and without the cache blend)."""

import argparse
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.cache import FeatureCache
from imagebind_llm.cache.cli import add_cache_subcommands
from imagebind_llm.cache.shards import FeatureStore, extract_image_features
from imagebind_llm.llm.templates import ALPACA_HEADER_WITH_INPUT, alpaca_prompt
from imagebind_llm.llm.tokenizer import load_tokenizer
from imagebind_llm.model.media import MIX_EPS
from imagebind_llm.preprocess import load_images
from imagebind_llm.train import ConfigError, load_config, stage1
from imagebind_llm.train.data import (
    CAPTION_PROMPT, DataFormatError, TrainDataset, batch_order, collate, image_sources, read_examples,
)
from imagebind_llm.train.loop import TrainStep, cache_retrieve, lm_loss
from test_model import official_model, small_encoder

FIXTURES = Path(__file__).parent / "fixtures"
IMAGEBIND = {"imagebind": FIXTURES / "imagebind" / "imagebind_small.pth",
             "config": FIXTURES / "imagebind" / "imagebind_small.json"}
TOKENIZER = load_tokenizer(FIXTURES / "adapter" / "llama" / "tokenizer.model")


def write_image(path: Path, rgb=(200, 40, 40)) -> Path:
    Image.fromarray(np.full((40, 50, 3), rgb, dtype=np.uint8)).save(path)
    return path


def decode_labels(labels: torch.Tensor) -> str:
    return TOKENIZER.decode([int(t) for t in labels if t != 0], skip_special=True)


def test_caption_sample_is_the_official_layout(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "c.tsv").write_text("url\tcaption\na.png\ta red square\n")
    dataset = TrainDataset(read_examples([tmp_path / "c.tsv"], tmp_path), TOKENIZER, max_words=400)
    item = dataset[(0, 0)]
    prompt = alpaca_prompt(CAPTION_PROMPT)
    expected = TOKENIZER.encode(prompt + "a red square", bos=True, eos=True)
    n_prompt = len(TOKENIZER.encode(prompt, bos=True))
    assert item["tokens"].tolist() == expected
    assert item["labels"].tolist() == [0] * n_prompt + expected[n_prompt:]
    assert item["has_media"] and item["image"].shape == (3, 224, 224)
    truncated = TrainDataset(dataset.examples, TOKENIZER, max_words=n_prompt + 2)[(0, 0)]
    assert truncated["tokens"].tolist() == expected[: n_prompt + 2]  # truncation drops EOS, as official


def test_caption_lists_pick_one_per_epoch_reproducibly(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "c.csv").write_text('path,caption\na.png,"[""one cat"", ""two dogs"", ""three birds""]"\n')
    dataset = TrainDataset(read_examples([tmp_path / "c.csv"], tmp_path), TOKENIZER, max_words=400, seed=3)
    picks = [decode_labels(dataset[(epoch, 0)]["labels"]) for epoch in range(12)]
    assert set(picks) == {"one cat", "two dogs", "three birds"}
    again = TrainDataset(dataset.examples, TOKENIZER, max_words=400, seed=3)
    assert picks == [decode_labels(again[(epoch, 0)]["labels"]) for epoch in range(12)]
    torch.testing.assert_close(dataset[(1, 0)]["image"], again[(1, 0)]["image"])


def test_jsonl_and_webdataset_shards(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "x.png", "caption": ["a", "b"]}) + "\n")
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(buffer, format="JPEG")
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        for name, data in [("s/000.jpg", buffer.getvalue()), ("s/000.txt", b"first caption"),
                           ("s/001.jpg", buffer.getvalue()), ("s/001.json", b'{"caption": "second"}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    examples = read_examples([tmp_path / "c.jsonl", tmp_path / "shard-0.tar"], image_root="/data")
    assert [ex.image for ex in examples] == ["/data/x.png", f"{tmp_path}/shard-0.tar::s/000.jpg",
                                             f"{tmp_path}/shard-0.tar::s/001.jpg"]
    assert [ex.captions for ex in examples] == [["a", "b"], ["first caption"], ["second"]]
    item = TrainDataset(examples, TOKENIZER, max_words=400)[(0, 2)]
    assert decode_labels(item["labels"]) == "second" and item["image"].shape == (3, 224, 224)


def test_instruction_formats(tmp_path):
    items = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"image": "coco/1.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Brown."}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}]},
    ]
    (tmp_path / "mix.json").write_text(json.dumps(items))
    (tmp_path / "detail.json").write_text(json.dumps({"annotations": [{"image_id": "7", "caption": "A long story."}]}))
    examples = read_examples([tmp_path / "mix.json", tmp_path / "detail.json"], image_root="/img")
    dataset = TrainDataset(examples, TOKENIZER, max_words=1000)
    alpaca, llava, chat, detail = (dataset.examples[i] for i in range(4))
    assert alpaca.image is None and alpaca.input == "2 and 3"
    assert llava.image == "/img/coco/1.jpg" and llava.turns == [("What is shown?", "A dog."),
                                                                ("What colour is it?", "Brown.")]
    assert chat.system == "Be brief." and chat.turns == [("Hi", "Hello")]
    assert detail.image == "/img/7.jpg" and detail.captions == ["A long story."]

    tokens = TrainDataset(examples[:1], TOKENIZER, max_words=1000)[(0, 0)]["tokens"]
    prompt = alpaca_prompt("Add the numbers.", "2 and 3")
    assert prompt.startswith(ALPACA_HEADER_WITH_INPUT)  # the instruction is a string, not the official 1-tuple
    assert tokens.tolist() == TOKENIZER.encode(prompt + "5", bos=True, eos=True)
    write_image(tmp_path / "1.jpg")
    llava.image = str(tmp_path / "1.jpg")
    item = dataset[(0, 1)]
    second = "\n\n### Instruction:\nWhat colour is it?\n\n### Response:Brown."
    assert item["tokens"].tolist() == (TOKENIZER.encode(alpaca_prompt("What is shown?") + "A dog.", bos=True, eos=True)
                                       + TOKENIZER.encode(second, bos=False, eos=True))
    answers = [TOKENIZER.decode(run) for run in _label_runs(item["labels"])]
    assert answers == ["A dog.", "Brown."]  # loss on every assistant turn, each with its EOS
    assert dataset[(0, 2)]["tokens"].tolist() == TOKENIZER.encode(
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:Hello", bos=True, eos=True)


def _label_runs(labels: torch.Tensor) -> list[list[int]]:
    runs, current = [], []
    for t in labels.tolist() + [0]:
        if t:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    assert all(run[-1] == TOKENIZER.eos_id for run in runs)
    return [run[:-1] for run in runs]


@pytest.mark.parametrize("text_only", ["no_injection", "zero_image"])
def test_text_only_samples(tmp_path, text_only):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Hi", "output": "Hello"}]))
    item = TrainDataset(read_examples([tmp_path / "a.json"]), TOKENIZER, 100, text_only=text_only)[(0, 0)]
    if text_only == "no_injection":
        assert not item["has_media"] and "image" not in item
    else:
        assert item["has_media"] and torch.equal(item["image"], torch.zeros(3, 224, 224))


def test_collate_pads_and_keeps_media_rows():
    items = [{"tokens": torch.tensor([1, 5, 6]), "labels": torch.tensor([0, 0, 6]), "has_media": False},
             {"tokens": torch.tensor([1, 7]), "labels": torch.tensor([0, 7]), "has_media": True,
              "image": torch.ones(3, 224, 224)}]
    batch = collate(items)
    assert batch["tokens"].tolist() == [[1, 5, 6], [1, 7, 0]] and batch["labels"].tolist() == [[0, 0, 6], [0, 7, 0]]
    assert batch["has_media"].tolist() == [False, True] and batch["images"].shape == (1, 3, 224, 224)


def test_text_only_rows_get_no_injection():
    model = official_model("finetune", None)
    tokens = torch.tensor([[1, 20, 30, 40], [1, 50, 60, 70]])
    labels = torch.tensor([[0, 0, 30, 40], [0, 0, 60, 70]])
    feature = torch.nn.functional.normalize(torch.randn(1, 32), dim=-1)
    step = TrainStep(model)
    with torch.no_grad():
        mixed = step(tokens, labels, torch.tensor([True, False]), features=feature)
        logits = model.llm(tokens[1:])
    plain = torch.nn.functional.cross_entropy(logits[0, :-1], labels[1, 1:], reduction="none")[1:]
    with torch.no_grad():
        media = model(tokens[:1], model.bind(feature.unsqueeze(1) / (1 + 1e-6)))
    with_media = torch.nn.functional.cross_entropy(media[0, :-1], labels[0, 1:], reduction="none")[1:]
    torch.testing.assert_close(mixed, torch.cat([with_media, plain]).mean(), rtol=1e-5, atol=1e-6)


def test_processes_see_the_chunks_of_one_process_with_accumulation():
    single = list(batch_order(20, batch_size=2, world_size=1, rank=0, accum_iter=2, seed=1, epoch=3))
    ranks = [list(batch_order(20, batch_size=2, world_size=2, rank=r, accum_iter=1, seed=1, epoch=3)) for r in (0, 1)]
    assert single[0::2] == ranks[0] and single[1::2] == ranks[1]
    assert sorted(i for b in single for _, i in b) == list(range(20))
    assert list(batch_order(20, batch_size=2, world_size=1, rank=0, accum_iter=2, seed=1, epoch=3, start_step=3)) \
        == single[6:]
    assert single != list(batch_order(20, batch_size=2, world_size=1, rank=0, accum_iter=2, seed=1, epoch=4))


def test_groups_stay_together_in_one_batch():
    batches = [list(batch_order(23, batch_size=4, world_size=1, rank=0, accum_iter=1, seed=1, epoch=e, group=2))
               for e in (0, 1)]
    for epoch in batches:
        assert len(epoch) == 5  # 11 whole groups of 2 (row 22 is a partial group), 2 per batch
        rows = [[i for _, i in b] for b in epoch]
        assert all(r[k] % 2 == 0 and r[k + 1] == r[k] + 1 for r in rows for k in (0, 2))
        assert len({i for r in rows for i in r}) == 20 and max(i for r in rows for i in r) < 22
    assert batches[0] != batches[1]
    assert list(batch_order(20, batch_size=2, world_size=1, rank=0, accum_iter=1, seed=1, epoch=0, group=1)) \
        == list(batch_order(20, batch_size=2, world_size=1, rank=0, accum_iter=1, seed=1, epoch=0))
    with pytest.raises(ValueError, match="multiple of the group size 3"):
        next(batch_order(20, batch_size=4, world_size=1, rank=0, accum_iter=1, seed=1, epoch=0, group=3))


def test_config_defaults_overrides_and_errors(tmp_path):
    stage1_cfg, stage2_cfg = load_config(1), load_config(2)
    assert (stage1_cfg.optim.blr, stage1_cfg.optim.weight_decay, stage1_cfg.data.max_words) == (1e-4, 0.05, 96)
    assert (stage2_cfg.optim.blr, stage2_cfg.optim.weight_decay, stage2_cfg.data.max_words) == (1e-3, 0.02, 512)
    assert stage1_cfg.optim.betas == [0.9, 0.95] and stage1_cfg.optim.clip_grad is None
    (tmp_path / "my.yaml").write_text("optim:\n  lr: 0.5\ndata:\n  train: a.tsv\n")
    cfg = load_config(1, tmp_path / "my.yaml", ["optim.lr=1e-3", "data.train=[x.tsv,y.tar]", "train.max_steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.data.train == ["x.tsv", "y.tar"] and cfg.train.max_steps == 7
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(1, None, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(2, None, ["data.text_only=grey"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(2, None, ["optim.lr"])
    (tmp_path / "s2.yaml").write_text("stage: 2\n")
    with pytest.raises(ConfigError, match="train stage2"):
        load_config(1, tmp_path / "s2.yaml")


def test_typed_config_parses_overrides_by_field_type(tmp_path):
    (tmp_path / "my.yaml").write_text("optim:\n  lr: 1e-3\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config(2, tmp_path / "my.yaml", [
        "train.progress=false", "optim.warmup_epochs=2", "data.train=one.json", "model.adapter=null",
        f"model.cache={tmp_path}", "model.cache_top_k=5", "model.cache_weight=0.25", "optim.eps=5E-9"])
    assert cfg.optim.lr == 1e-3 and cfg.optim.eps == 5e-9 and cfg.train.progress is False
    assert isinstance(cfg.optim.warmup_epochs, float) and cfg.data.train == ["one.json"] and cfg.model.adapter is None
    options = cfg.model.blend_options()
    assert (options.top_k, options.temperature, options.weight) == (5, None, 0.25)  # None: the cache's default


@pytest.mark.parametrize("overrides, message", [
    (["train.batch_size=four"], "train.batch_size must be a whole number"),
    (["train.epochs=2.5"], "train.epochs must be a whole number"),
    (["optim.lr=fast"], "optim.lr must be a finite number or null"),
    (["train.progress=maybe"], "train.progress must be true or false"),
    (["optim.accum_iter=0"], "optim.accum_iter must be > 0"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers"),
    (["optim.warmup_epochs=9"], "optim.warmup_epochs=9.0 must be in"),
    (["model.cache_top_k=3"], "model.cache_top_k is set but model.cache"),
    (["model.cache=c", "model.cache_weight=1.5"], "model.cache_weight: cache weight must be in [0, 1]"),
    (["stage=2"], "stage is 2 in a stage-1 run"),
])
def test_a_bad_config_value_names_its_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(1, None, overrides)


def test_stage_defaults_differ_only_where_the_stages_differ():
    one, two = load_config(1).to_dict(), load_config(2).to_dict()
    differing = {f"{section}.{key}" for section in ("model", "data", "optim", "train")
                 for key in one[section] if one[section][key] != two[section][key]}
    assert differing == {"data.max_words", "optim.blr", "optim.weight_decay", "optim.warmup_epochs",
                         "train.epochs", "train.output_dir"}


def test_bad_data_is_a_clear_error(tmp_path):
    (tmp_path / "a.tsv").write_text("file\tcaption\nx.png\thi\n")
    with pytest.raises(DataFormatError, match="image column"):
        read_examples([tmp_path / "a.tsv"])
    (tmp_path / "b.json").write_text(json.dumps([{"question": "?"}]))
    with pytest.raises(DataFormatError, match=r"b.json\[0\]: unknown item format"):
        read_examples([tmp_path / "b.json"])
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        read_examples([tmp_path / "missing.tsv"])
    with pytest.raises(DataFormatError, match="unsupported"):
        read_examples([Path(__file__)])


def colour_captions(root: Path) -> list:
    """Four solid-colour images with a caption each (``c.tsv``); returns the examples."""
    rows = ["url\tcaption"]
    for i, rgb in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]):
        write_image(root / f"{i}.png", rgb)
        rows.append(f"{i}.png\tcolour {i}")
    (root / "c.tsv").write_text("\n".join(rows) + "\n")
    return read_examples([root / "c.tsv"], root)


def stage1_from_features(root: Path, features: Path, *extra: str):
    return load_config(1, None, [
        f"model.llm={FIXTURES / 'adapter' / 'llama' / 'base'}", f"data.train=[{root / 'c.tsv'}]",
        f"data.image_root={root}", f"data.features={features}", "data.max_words=400",
        "data.num_workers=0", "train.device=cpu", "train.progress=false", f"train.output_dir={root / 'run'}",
        "train.batch_size=2", "train.epochs=6", "optim.lr=1e-2", "optim.warmup_epochs=1", *extra])


def test_feature_store_trains_stage1_without_the_encoder(tmp_path):
    examples = colour_captions(tmp_path)
    model = official_model("pretrain", small_encoder())
    sources = image_sources(examples)
    assert extract_image_features(sources, tmp_path / "feats", **IMAGEBIND, shard_size=3, batch_size=2,
                                  progress=False) == [0, 1]
    assert extract_image_features(sources, tmp_path / "feats", **IMAGEBIND, shard_size=3, progress=False) == []
    store = FeatureStore(tmp_path / "feats", sources)
    images = load_images(sources)
    with torch.no_grad():
        expected = model.embed_modality("image", images)
    torch.testing.assert_close(torch.from_numpy(np.stack([store[i] for i in range(4)])), expected)

    item = TrainDataset(examples, TOKENIZER, 400, features=store)[(0, 1)]
    batch = collate([item, TrainDataset(examples, TOKENIZER, 400, features=store)[(0, 2)]])
    step = TrainStep(model)
    with torch.no_grad():
        from_features = step(batch["tokens"], batch["labels"], batch["has_media"], features=batch["features"])
        from_images = step(batch["tokens"], batch["labels"], batch["has_media"], images=images[1:3])
    torch.testing.assert_close(from_features, from_images, rtol=1e-5, atol=1e-6)

    result = stage1.run(stage1_from_features(tmp_path, tmp_path / "feats"))
    assert result.model.encoder is None and result.model.config.feature_dim == 32
    assert np.mean(result.losses[-2:]) < np.mean(result.losses[:2])
    with pytest.raises(ValueError, match="other images"):
        FeatureStore(tmp_path / "feats", sources[::-1])


def test_cache_extract_feeds_the_cache_build_and_stage1_training(tmp_path, capsys):
    """One `cache extract` store: `cache build --images` indexes its shards without encoding again, stage 1
    trains from the same rows (`data.features`), and with `model.cache` through the cache blend."""
    examples = colour_captions(tmp_path)
    (tmp_path / "images.txt").write_text("\n".join(image_sources(examples)))
    parser = argparse.ArgumentParser()
    add_cache_subcommands(parser.add_subparsers())
    encoder = ["--imagebind", str(IMAGEBIND["imagebind"]), "--config", str(IMAGEBIND["config"])]
    listing = ["--images", str(tmp_path / "images.txt"), "--out", str(tmp_path / "store"), "--no-progress"]
    args = parser.parse_args(["cache", "extract", *listing, *encoder, "--shard-size", "3"])
    assert args.func(args) == 0 and json.loads(capsys.readouterr().out)["shards_encoded"] == [0, 1]
    args = parser.parse_args(["cache", "build", *listing, "--config", str(IMAGEBIND["config"]), "--shard-size", "3",
                              "--index", "Flat"])  # no --imagebind: the shards are done, nothing is encoded
    assert args.func(args) == 0

    cache, store = FeatureCache.load(tmp_path / "store"), FeatureStore(tmp_path / "store", image_sources(examples))
    rows = np.stack([store[i] for i in range(len(store))])
    np.testing.assert_array_equal(cache.index.reconstruct_n(0, len(cache)), rows)
    assert cache.sources == store.sources and cache.meta.encoder == store.encoder == "imagebind_small"

    config = stage1_from_features(tmp_path, tmp_path / "store", f"model.cache={tmp_path / 'store'}",
                                  "model.cache_top_k=2", "model.cache_weight=0.5")
    model = official_model("pretrain", None)
    retrieve = cache_retrieve(config.model, model, store.encoder)
    features = torch.from_numpy(rows[:2])
    tokens, labels = torch.tensor([[1, 20, 30, 40], [1, 50, 60, 70]]), torch.tensor([[0, 0, 30, 40], [0, 0, 60, 70]])
    blended = cache.blend(features / (1 + MIX_EPS), top_k=2, weight=0.5)
    with torch.no_grad():
        through_step = TrainStep(model, retrieve)(tokens, labels, features=features)
        by_hand = model(tokens, model.bind(blended.unsqueeze(1)))
    torch.testing.assert_close(through_step, lm_loss(by_hand, labels))
    assert not torch.allclose(blended, features)  # the blend moved the features
    result = stage1.run(config)
    assert result.step == 12 and np.isfinite(result.losses).all()


def test_cli_extracts_features_then_trains_stage1_from_them(tmp_path, capsys):
    from imagebind_llm.train.cli import add_train_subcommands

    parser = argparse.ArgumentParser()
    add_train_subcommands(parser.add_subparsers())
    rows = ["url\tcaption"] + [f"{i}.png\tcolour {i}" for i in range(4)]
    for i in range(4):
        write_image(tmp_path / f"{i}.png", (60 * i, 40, 200 - 40 * i))
    (tmp_path / "c.tsv").write_text("\n".join(rows) + "\n")
    (tmp_path / "run.yaml").write_text(
        f"model:\n  llm: {FIXTURES / 'adapter' / 'llama' / 'base'}\n"
        f"  imagebind: {FIXTURES / 'imagebind' / 'imagebind_small.pth'}\n"
        f"  imagebind_config: {FIXTURES / 'imagebind' / 'imagebind_small.json'}\n"
        f"data:\n  train: [{tmp_path / 'c.tsv'}]\n  image_root: {tmp_path}\n  max_words: 400\n  num_workers: 0\n"
        f"train:\n  device: cpu\n  progress: false\n  batch_size: 2\n  epochs: 2\n  output_dir: {tmp_path / 'run'}\n")
    args = parser.parse_args(["train", "extract-features", "--config", str(tmp_path / "run.yaml"),
                              "--out", str(tmp_path / "feats"), "--shard-size", "3", "--no-progress"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["shards_encoded"] == [0, 1]
    args = parser.parse_args(["train", "stage1", "--config", str(tmp_path / "run.yaml"), "--set",
                              f"data.features={tmp_path / 'feats'}", "--set", "optim.lr=1e-3"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and Path(summary["exports"]["official"]).is_file()
    args = parser.parse_args(["train", "stage1", "--config", str(tmp_path / "run.yaml"), "--print-config",
                              "--set", "optim.warmup_epochs=0.5"])
    assert args.func(args) == 0 and "warmup_epochs: 0.5" in capsys.readouterr().out
