"""The demo model's recipe (`scripts/demo/build.py`) end to end at its tiny scale: every step runs through the
project's commands, binding keeps the anchor frozen (the vision tower leaves every later step unchanged, the audio
tower leaves point binding unchanged), the evaluation writes MME scores and the zero-shot shares, and a rerun
skips the steps that are done."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imagebind_llm import create_model
from imagebind_llm.encoders import to_official

from imagebind_llm.hub import read_state_dict
from imagebind_llm.world import espeak_missing
from imagebind_llm.world import scene as scene_module

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo" / "build.py"
MISSING = espeak_missing() or next((f"font {name} missing in {scene_module.FONT_DIR}" for name in scene_module.FONTS
                                    if not (scene_module.FONT_DIR / name).is_file()), None)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the world's speech and signs need espeak-ng and "
                                f"fonts-dejavu-core: {MISSING}")


def tower(out: Path, step: str, name: str) -> dict[str, torch.Tensor]:
    """Tower ``name``'s tensors in the encoder that build step ``step`` exported."""
    state = read_state_dict(out / (step if step == "encoder" else f"{step}/encoder") / "imagebind.pth")
    return {k: v for k, v in state.items() if f".{name}." in k}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The build folder of one tiny run of the whole recipe."""
    out = tmp_path_factory.mktemp("build") / "demo"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--scale", "tiny"], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return out


def test_the_tiny_recipe_runs_every_step_and_binds_through_the_frozen_vision_tower(built):
    out = built
    report = json.loads((out / "evaluate.json").read_text())
    assert set(report["mme"]) == {"total", "existence", "count", "position", "color", "OCR"}
    assert 0 <= report["mme"]["total"] <= 1000 and report["mme"]["total"] == sum(
        v for k, v in report["mme"].items() if k != "total")
    assert set(report["zero_shot"]) == {"audio", "point"}
    assert all(set(v) == {"trained", "zero"} for v in report["zero_shot"].values())
    vision = tower(out, "towers", "vision")
    for step in ("audio", "point", "encoder"):
        assert vision and all(torch.equal(vision[k], v) for k, v in tower(out, step, "vision").items())
    for modality in ("audio", "point"):  # trained in its own step, then carried into the whole encoder
        bound = tower(out, modality, modality)
        assert bound and all(torch.equal(bound[k], v) for k, v in tower(out, "encoder", modality).items())
        assert not all(torch.equal(bound[k], v) for k, v in tower(out, "towers", modality).items())
    pretrained = json.loads((out / "stage2" / "pretrained" / "config.json").read_text())
    assert pretrained["adapter"]["phase"] == "finetune"
    assert pretrained["adapter"]["lora_layers"] == pretrained["adapter"]["inject_layers"]  # tunes the injected layers
    again = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--scale", "tiny"], capture_output=True,
                           text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.count(": done (") == 9


def test_the_shipped_folder_loads_as_the_model_that_was_trained(built):
    """``ship`` writes what a package would ship: the stage-2 adapter and the whole encoder as float16
    safetensors, which `create_model` loads into the trained model; and one loss panel per training step."""
    out = built
    model = create_model(adapter=str(out / "demo"), imagebind=str(out / "demo" / "imagebind.safetensors"))
    encoder = read_state_dict(out / "encoder" / "imagebind.pth")
    assert encoder.keys() == to_official(model.encoder).keys()
    assert all(torch.equal(v, encoder[k].half().float()) for k, v in to_official(model.encoder).items())  # float16
    trained = load_file(str(out / "stage2" / "pretrained" / "adapter.safetensors"))
    assert any(g.any() for g in model.gates) and all(
        torch.equal(model.gates[i], trained[f"gates.{i}"].half().float()) for i in range(len(model.gates)))
    assert model.bind.blocks[0].w1.weight.shape[0] == model.llm.config.dim  # the small bind network (BIND_HIDDEN)
    with Image.open(out / "curves.png") as curves:
        assert curves.format == "PNG" and curves.width == 5 * 360
