"""End-to-end training recipes on a tiny LLaMA (tests/fixtures/adapter) and the small ImageBind, on CPU.

The fixture base LLM has random weights, so a module fixture first teaches it the captions and answers as
plain language (no image): it then knows *what* to say, and the recipes must teach it *which* caption
belongs to which image (stage 1) and how to follow the instructions (stage 2).
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imagebind_llm.llm.templates import alpaca_prompt
from imagebind_llm.llm.weights import load_llm
from imagebind_llm.model.convert import official_adapter_state_dict
from imagebind_llm.model.factory import load_pretrained
from imagebind_llm.preprocess import load_images
from imagebind_llm.train import ConfigError, TrainConfig, load_config, stage1, stage2
from imagebind_llm.train.checkpoint import find_checkpoint
from imagebind_llm.train.data import CAPTION_PROMPT, encode_segments
from imagebind_llm.train.loop import lm_loss

FIXTURES = Path(__file__).parent / "fixtures"
ADAPTER = FIXTURES / "adapter"
IMAGEBIND = FIXTURES / "imagebind"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
CAPTIONS = {"red": "a red apple", "green": "green grass", "blue": "the blue sky", "yellow": "a yellow banana"}
QA = {"Name a fruit.": "an apple", "What is two plus two?": "four", "Say hello.": "hello there"}
COLOR_QUESTION = "What color is it?"


def tiny_overrides(data: list[Path], out: Path, llm: Path, **extra) -> list[str]:
    settings = {
        "model.llm": llm, "model.imagebind": IMAGEBIND / "imagebind_small.pth",
        "model.imagebind_config": IMAGEBIND / "imagebind_small.json", "data.train": f"[{','.join(map(str, data))}]",
        "data.max_words": 200, "data.num_workers": 0, "train.device": "cpu", "train.progress": "false",
        "train.output_dir": out, "train.batch_size": 4, "optim.warmup_epochs": 1, **extra,
    }
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Eight noisy solid-colour images with captions (TSV), an instruction set, and a language-trained base."""
    root = tmp_path_factory.mktemp("train_data")
    rng = np.random.default_rng(0)
    rows = ["url\tcaption"]
    for name, rgb in COLORS.items():
        for k in range(2):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 10, (64, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"{name}{k}.png")
            rows.append(f"{name}{k}.png\t{json.dumps([CAPTIONS[name]]) if k else CAPTIONS[name]}")
    (root / "captions.tsv").write_text("\n".join(rows) + "\n")
    items = [{"instruction": q, "input": "", "output": a} for q, a in QA.items()]
    items += [{"image": f"{name}0.png", "conversations": [
        {"from": "human", "value": f"<image>\n{COLOR_QUESTION}"}, {"from": "gpt", "value": name}]}
        for name in COLORS]
    (root / "instruct.json").write_text(json.dumps(items))
    root_base = root / "base"
    texts = [(alpaca_prompt(CAPTION_PROMPT), c) for c in CAPTIONS.values()]
    texts += [(alpaca_prompt(COLOR_QUESTION), n) for n in COLORS]  # the QA answers are left to stage 2
    language_pretrain(texts, root_base)
    return {"root": root, "captions": root / "captions.tsv", "instruct": root / "instruct.json", "base": root_base}


def language_pretrain(texts: list[tuple[str, str]], out: Path, steps: int = 60) -> None:
    """Fit the random fixture base on prompt+answer texts and save it in Meta's layout."""
    loaded = load_llm(ADAPTER / "llama" / "base")
    llm, tokenizer = loaded.model.train(), loaded.tokenizer
    pairs = [encode_segments(tokenizer, [t], 256) for t in texts]
    length = max(len(t) for t, _ in pairs)
    tokens = torch.stack([torch.nn.functional.pad(t, (0, length - len(t))) for t, _ in pairs])
    labels = torch.stack([torch.nn.functional.pad(lab, (0, length - len(lab))) for _, lab in pairs])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(llm.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        lm_loss(llm(tokens), labels).backward()
        optimizer.step()
    out.mkdir()
    torch.save(llm.state_dict(), out / "consolidated.00.pth")
    shutil.copy(ADAPTER / "llama" / "base" / "params.json", out)
    shutil.copy(ADAPTER / "llama" / "tokenizer.model", out)


def caption_of(model, files, name: str) -> str:
    image = load_images([str(files["root"] / f"{name}0.png")])
    return model.generate([alpaca_prompt(CAPTION_PROMPT)], {"image": (image, 1.0)}, temperature=0,
                          max_new_tokens=24)[0].text


@pytest.fixture(scope="module")
def stage1_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    config = load_config(1, None, tiny_overrides([files["captions"]], out, files["base"], **{
        "data.image_root": files["root"], "train.epochs": 20, "optim.lr": 1e-2}))
    return stage1.run(config), out


def test_stage1_learns_which_caption_belongs_to_which_image(stage1_run, files):
    result, out = stage1_run
    assert len(result.losses) == 40 and result.step == 40
    first, last = np.mean(result.losses[:4]), np.mean(result.losses[-4:])
    assert last < 0.6 * first, result.losses
    model = result.model.eval()
    assert {name: caption_of(model, files, name) for name in COLORS} == CAPTIONS
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 40 and {"loss", "lr", "tokens_per_s", "eta_s"} <= set(records[-1])


def test_a_smaller_bind_network_trains_saves_and_loads_back(files, tmp_path):
    """``model.bind_hidden_dim`` / ``model.bind_blocks`` size a new adapter's bind network (the demo model's
    must fit the package); the folder records them, so loading needs no option."""
    config = load_config(1, None, tiny_overrides([files["captions"]], tmp_path, files["base"], **{
        "data.image_root": files["root"], "train.epochs": 1, "model.bind_hidden_dim": 24, "model.bind_blocks": 1}))
    result = stage1.run(config)
    dim = result.model.llm.config.dim
    shapes = {k: tuple(v.shape) for k, v in result.model.named_parameters() if k.startswith("bind.blocks.")}
    assert shapes == {"bind.blocks.0.norm.weight": (dim,), "bind.blocks.0.w1.weight": (24, dim),
                      "bind.blocks.0.w2.weight": (dim, 24), "bind.blocks.0.w3.weight": (24, dim)}
    reloaded = load_pretrained(tmp_path / "pretrained", files["base"], IMAGEBIND / "imagebind_small.pth")
    for name, tensor in result.model.named_parameters():
        if name.startswith("bind."):
            torch.testing.assert_close(dict(reloaded.named_parameters())[name], tensor, atol=0, rtol=0)
    with pytest.raises(ConfigError, match="model.bind_blocks"):
        load_config(1, None, ["model.bind_blocks=0"])


def test_stage1_exports_load_back_into_both_formats(stage1_run, files):
    result, out = stage1_run
    reloaded = load_pretrained(out / "pretrained", files["base"], IMAGEBIND / "imagebind_small.pth")
    assert caption_of(reloaded, files, "blue") == CAPTIONS["blue"]
    official = torch.load(out / "adapter.pth", weights_only=True)["model"]
    expected = official_adapter_state_dict(result.model)
    assert set(official) == set(expected)
    for name, tensor in official.items():
        torch.testing.assert_close(tensor, expected[name].cpu(), atol=0, rtol=0)


def test_stage2_from_the_stage1_adapter_follows_instructions(stage1_run, files, tmp_path):
    _, stage1_out = stage1_run
    config = load_config(2, None, tiny_overrides([files["instruct"]], tmp_path, files["base"], **{
        "data.image_root": files["root"], "model.adapter": stage1_out / "adapter.pth", "train.epochs": 40,
        "optim.lr": 1e-2, "train.batch_size": 3, "model.lora_rank": 16}))
    result = stage2.run(config)
    answers = {q: result.model.generate([alpaca_prompt(q)], None, temperature=0, max_new_tokens=16)[0].text
               for q in QA}
    assert np.mean(result.losses[-3:]) < 0.6 * np.mean(result.losses[:3]), result.losses
    model = result.model.eval()
    assert answers == QA, (answers, result.losses)
    for name in COLORS:
        image = load_images([str(files["root"] / f"{name}0.png")])
        out = model.generate([alpaca_prompt(COLOR_QUESTION)], {"image": (image, 1.0)}, temperature=0, max_new_tokens=16)
        assert out[0].text == name


def test_interrupted_run_resumes_exactly(files, tmp_path):
    """Stop after 4 of 9 steps (mid-epoch), resume from the run folder: same losses and final weights."""
    def config(out: Path, **extra) -> TrainConfig:
        return load_config(2, None, tiny_overrides([files["instruct"]], out, ADAPTER / "llama" / "base", **{
            "data.image_root": files["root"], "model.adapter": ADAPTER / "adapter_pretrain.pth", "train.epochs": 3,
            "optim.lr": 1e-2, "train.batch_size": 2, "train.save_every": 2, **extra}))

    full = stage2.run(config(tmp_path / "full"))
    first = stage2.run(config(tmp_path / "cut", **{"train.max_steps": 4}))
    assert first.step == 4 and not first.exports
    assert find_checkpoint(tmp_path / "cut").name == "step-0000004.pt"
    rest = stage2.run(config(tmp_path / "cut"), resume=tmp_path / "cut")
    assert rest.start_step == 4 and rest.step == 9 and rest.exports
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(full.losses), rtol=1e-6, atol=0)
    assert first.lrs + rest.lrs == full.lrs
    resumed = dict(rest.model.named_parameters())
    for name, param in full.model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(resumed[name], param, rtol=1e-6, atol=1e-7, msg=name)


def test_a_diverged_run_stops_with_a_one_line_error_naming_the_settings(files, tmp_path, capsys):
    from imagebind_llm.cli import main

    settings = tiny_overrides([files["captions"]], tmp_path / "run", files["base"], **{
        "data.image_root": files["root"], "train.epochs": 20, "optim.lr": 1e9, "optim.warmup_epochs": 0})
    code = main(["train", "stage1", *[a for s in settings for a in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "loss is nan" in err and "optim.clip_grad=1.0" in err and "--resume" in err
