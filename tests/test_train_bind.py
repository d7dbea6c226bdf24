"""`train bind` on tiny towers: the contrastive recipe learns a generated task, exports an encoder the loaders read
back exactly, resumes exactly, reads its manifests and cached anchor features, and two processes equal one."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.encoders import ImageBind, ImageBindConfig, load_official, to_official
from imagebind_llm.model.peft import LoRALinear
from imagebind_llm.preprocess import load_images, tokenize
from imagebind_llm.train import ConfigError, bind, load_config
from imagebind_llm.train.contrastive import gather, info_nce
from imagebind_llm.train.pairs import read_pairs
from imagebind_llm.train.recipes.bind import merged_state_dict

TINY = {  # every tower tiny; vision patches of 56 px (16 per image)
    "out_embed_dim": 32, "kernel_size": [2, 56, 56], "vision_embed_dim": 32, "vision_num_blocks": 1,
    "vision_num_heads": 2, "text_embed_dim": 32, "text_num_blocks": 1, "text_num_heads": 2, "audio_embed_dim": 16,
    "audio_num_blocks": 1, "audio_num_heads": 2, "audio_drop_path": 0.0, "depth_embed_dim": 16,
    "depth_num_blocks": 1, "depth_num_heads": 2, "thermal_embed_dim": 16, "thermal_num_blocks": 1,
    "thermal_num_heads": 2, "imu_embed_dim": 16, "imu_num_blocks": 1, "imu_num_heads": 2, "imu_drop_path": 0.0,
    "with_point": False,
}
TOY = "imagebind_llm.train.pairs:toy_pairs"
TINY_LLAMA = Path(__file__).parent / "fixtures" / "adapter" / "llama" / "base"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny config JSON and a random tiny encoder saved in the official layout (a 'pretrained' checkpoint).

    Random towers map every input close to one point; random patch positions and a zero [CLS] position spread
    the anchor enough for its 16 toy classes to be told apart (a perfect text tower reaches R@1 = 1)."""
    root = tmp_path_factory.mktemp("bind_tiny")
    (root / "tiny.json").write_text(json.dumps({"ImageBindModel_kwargs": TINY}))
    torch.manual_seed(123)
    encoder = ImageBind(ImageBindConfig.from_dict(TINY))
    for tower in encoder.towers.values():
        torch.nn.init.normal_(tower.pos_embed, std=0.2)
        tower.pos_embed.data[:, 0] = 0
    torch.save(to_official(encoder), root / "tiny.pth")
    return {"config": root / "tiny.json", "weights": root / "tiny.pth"}


def overrides(tiny: dict[str, Path], out: Path, **extra) -> list[str]:
    settings = {"bind.anchor": "vision", "bind.modalities": "[text]", "bind.imagebind_config": tiny["config"],
                "data.generator": TOY, "data.generator_train": 64, "data.generator_eval": 16,
                "data.num_workers": 0, "train.batch_size": 16, "train.epochs": 10, "train.device": "cpu",
                "train.progress": "false", "train.output_dir": out, "optim.lr": 1e-2, "optim.warmup_epochs": 1,
                **extra}
    return [f"{k}={v}" for k, v in settings.items()]


def embed(encoder, inputs):
    with torch.inference_mode():
        return encoder.eval()(inputs)


def toy_inputs() -> dict[str, torch.Tensor]:
    return {"vision": torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5)),
            "text": tokenize(["a red square", "a blue square at the top left", "hello"])}


# -------------------------------------------------------------------- the objective
def test_info_nce_is_symmetric_cross_entropy_and_gather_is_identity_alone():
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    logits = 10.0 * a @ b.T
    expected = sum(-torch.log_softmax(x, dim=1).diagonal().mean() for x in (logits, logits.T)) / 2
    torch.testing.assert_close(info_nce(a, b, torch.tensor(10.0)), expected)
    assert gather(a) is a


# -------------------------------------------------------------------- learning, export
def test_binds_text_to_a_frozen_vision_tower_far_above_chance(tiny, tmp_path):
    extra = {"bind.imagebind": tiny["weights"], "data.generator_train": 48, "train.epochs": 12,
             "data.eval_every": 18}
    result = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path, **extra)))
    chance = 1 / 16
    metrics = result.metrics
    assert metrics["step"] == 36 and result.losses[-1] < result.losses[0] - 1.0
    for direction in ("vision_to_text", "text_to_vision"):
        assert metrics[f"{direction}_R@1"] >= 4 * chance, metrics
        assert metrics[f"{direction}_R@5"] >= 0.8, metrics
    evals = [r for r in result.records if "vision_to_text_R@1" in r]
    assert [r["step"] for r in evals] == [18, 36]  # every eval_every steps, in log.jsonl too
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert evals[-1] in logged

    exported = load_official(result.exports["weights"], result.exports["config"])
    inputs = toy_inputs()
    ours, theirs = embed(result.model, inputs), embed(exported, inputs)
    for name in inputs:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)
    initial = embed(load_official(tiny["weights"], tiny["config"]), inputs)
    torch.testing.assert_close(initial["vision"], ours["vision"], rtol=0, atol=0)  # the anchor stayed frozen
    assert not torch.allclose(initial["text"], ours["text"])


def test_lora_trains_only_lora_and_exports_merged_weights(tiny, tmp_path):
    extra = {"bind.mode": "lora", "bind.imagebind": tiny["weights"], "bind.lora_rank": 4,
             "bind.learn_temperature": "false", "train.epochs": 1, "data.generator_train": 32, "data.generator_eval": 0}
    result = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path, **extra)))
    encoder = result.model
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and n.startswith("towers.text.") for n in trainable)
    loras = [m for m in encoder.towers["text"].modules() if isinstance(m, LoRALinear)]
    assert len(loras) == 4 * TINY["text_num_blocks"] and all(m.lora_b.weight.abs().sum() > 0 for m in loras)
    assert not any(isinstance(m, LoRALinear) for m in encoder.towers["vision"].modules())
    assert result.metrics == {}

    base = load_official(tiny["weights"], tiny["config"])
    exported = load_official(result.exports["weights"], result.exports["config"])
    inputs = toy_inputs()
    ours, theirs = embed(encoder, inputs), embed(exported, inputs)
    torch.testing.assert_close(theirs["text"], ours["text"], rtol=1e-5, atol=1e-5)  # merged == unmerged
    torch.testing.assert_close(theirs["vision"], embed(base, inputs)["vision"], rtol=0, atol=0)
    assert not torch.allclose(theirs["text"], embed(base, inputs)["text"])
    assert not any(".lora_" in k for k in merged_state_dict(encoder))

    from imagebind_llm.model import create_model

    model = create_model(None, llm=str(TINY_LLAMA), imagebind=str(result.exports["weights"]),
                         imagebind_config=str(result.exports["config"]))
    torch.testing.assert_close(embed(model.encoder, inputs)["text"], theirs["text"], rtol=0, atol=0)


def test_a_vision_tower_with_a_conv_stem_trains_from_scratch_and_exports(tiny, tmp_path):
    """A new vision tower with ``vision_conv_stem`` bound to a frozen text tower: it learns (chance R@1 is
    1/16), its BatchNorm statistics are trained, and the export reproduces it exactly in eval mode."""
    extra = {"bind.mode": "scratch", "bind.anchor": "text", "bind.modalities": "[vision]",
             "bind.imagebind": tiny["weights"], "bind.tower": "{vision_conv_stem: [4, 8]}",
             "data.generator_train": 48, "train.epochs": 30, "optim.lr": 1e-3, "data.eval_every": 1000}
    result = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path, **extra)))
    assert result.model.config.vision_conv_stem == (4, 8)
    assert result.losses[-1] < result.losses[0] - 0.4
    assert min(result.metrics[f"{d}_R@1"] for d in ("vision_to_text", "text_to_vision")) >= 8 / 16, result.metrics
    norms = [m for m in result.model.towers["vision"].stem.convs if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 and all(m.num_batches_tracked == 90 and m.running_mean.abs().sum() > 0 for m in norms)

    exported = load_official(result.exports["weights"], result.exports["config"])
    assert exported.config.vision_conv_stem == (4, 8)
    inputs = toy_inputs()
    ours, theirs = embed(result.model, inputs), embed(exported, inputs)
    for name in inputs:
        torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=0)


def test_resume_equals_uninterrupted(tiny, tmp_path):
    extra = {"train.epochs": 2, "train.batch_size": 8, "data.generator_train": 16, "data.generator_eval": 8,
             "data.eval_every": 2}
    whole = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path / "whole", **extra)))
    assert len(whole.losses) == 4
    first = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path / "split", **extra,
                                                             **{"train.max_steps": 2})))
    assert first.exports == {} and first.step == 2
    rest = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path / "split", **extra)),
                    resume=tmp_path / "split")
    assert rest.start_step == 2
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(whole.losses), rtol=0, atol=0)
    assert rest.metrics == whole.metrics and "vision_to_text_R@1" in whole.metrics
    a = torch.load(whole.exports["weights"], weights_only=True)
    b = torch.load(rest.exports["weights"], weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -------------------------------------------------------------------- data
def write_pairs(root: Path, n: int = 12) -> Path:
    """``n`` image-text pairs as JSONL (paths relative to the manifest), TSV and a webdataset tar."""
    (root / "img").mkdir(parents=True)
    rows = []
    rng = np.random.default_rng(0)
    with tarfile.open(root / "pairs.tar", "w") as tar:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
            rows.append({"vision": f"img/{i}.png", "text": f"picture number {i}", "id": i})
            for name, data in ((f"{i:03d}.vision.png", (root / "img" / f"{i}.png").read_bytes()),
                               (f"{i:03d}.txt", f"picture number {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "pairs.tsv").write_text("vision\ttext\n" + "".join(f"img/{i}.png\tpicture number {i}\n" for i in range(n)))
    return root


def test_manifest_formats_read_the_same_pairs(tmp_path):
    root = write_pairs(tmp_path)
    jsonl = read_pairs([root / "pairs.jsonl"], ["vision", "text"])
    assert jsonl == read_pairs([root / "pairs.tsv"], ["vision", "text"])
    assert jsonl[3] == {"vision": str(root / "img" / "3.png"), "text": "picture number 3"}
    tar = read_pairs([root / "pairs.tar"], ["vision", "text"])
    assert [p["text"] for p in tar] == [p["text"] for p in jsonl]
    from imagebind_llm.train.pairs import load_item

    torch.testing.assert_close(load_item("vision", tar[3]["vision"]), load_images(jsonl[3]["vision"])[0])
    with pytest.raises(ValueError, match="has no \\['audio'\\]"):
        read_pairs([root / "pairs.jsonl"], ["vision", "audio"])


def with_conv_stem(tiny: dict[str, Path], root: Path) -> dict[str, Path]:
    """The tiny checkpoint with a vision ``vision_conv_stem`` whose BatchNorm statistics look trained."""
    root.mkdir()
    config = {**TINY, "vision_conv_stem": [4]}
    (root / "tiny.json").write_text(json.dumps({"ImageBindModel_kwargs": config}))
    encoder = ImageBind(ImageBindConfig.from_dict(config))
    ours = encoder.state_dict()
    encoder.load_state_dict({k: v for k, v in load_official(tiny["weights"], tiny["config"]).state_dict().items()
                             if ours[k].shape == v.shape}, strict=False)  # all but the vision stem
    norm = encoder.towers["vision"].stem.convs[1]
    norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.2, 3)
    torch.save(to_official(encoder), root / "tiny.pth")
    return {"config": root / "tiny.json", "weights": root / "tiny.pth"}


@pytest.mark.parametrize("stem", [False, True], ids=["official-stem", "conv-stem"])
def test_cached_anchor_features_train_like_the_live_anchor(tiny, tmp_path, stem):
    """The store is encoded by the anchor in eval mode, as the live anchor runs (BatchNorm statistics)."""
    tiny = with_conv_stem(tiny, tmp_path / "stem") if stem else tiny
    root = write_pairs(tmp_path / "data")
    files = {"data.generator": "null", "data.train": f"[{root / 'pairs.jsonl'}]", "data.eval": f"[{root / 'pairs.tsv'}]",
             "train.epochs": 2, "train.batch_size": 6, "data.eval_every": 100, "bind.imagebind": tiny["weights"]}
    live = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path / "live", **files)))
    cached_cfg = load_config("bind", overrides=overrides(tiny, tmp_path / "cached", **files,
                                                         **{"bind.anchor_features": tmp_path / "feats"}))
    cached = bind.run(cached_cfg)
    assert (tmp_path / "feats" / "train" / "features" / "plan.json").is_file()
    assert (tmp_path / "feats" / "eval" / "features" / "plan.json").is_file()
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(live.losses), rtol=1e-5, atol=1e-6)
    assert cached.metrics.keys() == live.metrics.keys()
    cached_cfg.train.output_dir, cached_cfg.train.max_steps = str(tmp_path / "again"), 1  # the store is reused
    stamp = (tmp_path / "feats" / "train" / "features" / "shard-00000.npy").stat().st_mtime_ns
    bind.run(cached_cfg)
    assert (tmp_path / "feats" / "train" / "features" / "shard-00000.npy").stat().st_mtime_ns == stamp


# -------------------------------------------------------------------- config
@pytest.mark.parametrize("setting, message", [
    (["bind.mode=joint"], "two towers"),
    (["bind.anchor=text"], "frozen bind.anchor tower of another modality"),
    (["bind.modalities=[smell]"], "bind.modalities\\[0\\]"),
    (["bind.mode=lora"], "set bind.imagebind"),
    (["bind.mode=full"], "set bind.imagebind"),
    (["optim.accum_iter=2"], "accum_iter=1"),
    (["bind.tower={vision_width: 3}"], "unknown ImageBindConfig fields"),
    (["data.train=[a.jsonl]"], "exactly one of data.train"),
    (["bind.tower=3"], "bind.tower must be a mapping"),
    (["data.group_size=3"], "multiple of data.group_size=3"),
    (["data.group_size=0"], "data.group_size must be > 0"),
])
def test_bad_bind_configs_name_the_key(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config("bind", overrides=["bind.modalities=[text]", f"data.generator={TOY}", *setting])


def test_cli_prints_the_bind_config(tmp_path, capsys):
    from imagebind_llm.cli import main

    config = tmp_path / "bind.yaml"
    config.write_text("stage: bind\nbind: {modalities: [audio], anchor: vision}\n")
    assert main(["train", "bind", "--config", str(config), "--set", "data.train=[x.jsonl]", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "mode: scratch" in out and "- x.jsonl" in out and "stage: bind" in out
    with pytest.raises(ConfigError, match="run `train stage1`"):
        load_config("bind", (config.write_text("stage: 1\n"), config)[1])


# -------------------------------------------------------------------- two processes
WORKER = """
import sys, json
from imagebind_llm.train import bind, distributed, load_config
try:
    result = bind.run(load_config("bind", overrides=json.loads(sys.argv[1])))
finally:
    distributed.teardown()  # as the CLI does: gloo aborts a process that exits with its group alive
if result.exports:
    open(sys.argv[2], "w").write(json.dumps({"losses": result.losses, "metrics": result.metrics}))
"""


def test_two_processes_match_one_process_at_the_same_global_batch(tiny, tmp_path, free_port):
    extra = {"bind.mode": "joint", "bind.anchor": "null", "bind.modalities": "[vision,text]", "train.epochs": 2,
             "data.generator_train": 32, "data.generator_eval": 8, "data.eval_every": 100}
    single = bind.run(load_config("bind", overrides=overrides(tiny, tmp_path / "single", **extra)))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    multi_overrides = overrides(tiny, tmp_path / "multi", **extra, **{"train.batch_size": 8})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port), str(tmp_path / "worker.py"), json.dumps(multi_overrides),
               str(tmp_path / "multi.json")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multi = json.loads((tmp_path / "multi.json").read_text())
    assert len(multi["losses"]) == len(single.losses) == 4
    torch.testing.assert_close(torch.tensor(multi["losses"]), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    a = torch.load(tmp_path / "multi" / "encoder" / "imagebind.pth", weights_only=True)
    b = torch.load(single.exports["weights"], weights_only=True)
    for key, tensor in b.items():
        torch.testing.assert_close(a[key], tensor, rtol=1e-4, atol=1e-5, msg=key)


def test_the_log_line_reports_pairs_per_second_when_no_tokens_are_counted(tmp_path, caplog):
    from imagebind_llm.train.logging import ProgressLogger
    logger = ProgressLogger(tmp_path, 2, log_every=1, progress=False)
    with caplog.at_level("INFO", logger="imagebind_llm.train.logging"):
        logger.step(1, 0.5, 4.0, 1e-3, 64, 0)  # bind: pairs, no tokens
        logger.step(2, 1.0, 3.0, 1e-3, 4, 100)  # the stages: tokens
    logger.close()
    first, second = (r.getMessage() for r in caplog.records if r.getMessage().startswith("step "))
    assert "samples/s" in first and "tok/s" not in first and "tok/s" in second
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert records[0]["tokens_per_s"] == 0 and records[0]["samples_per_s"] > 0
