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

from imagebind_llm.hub import read_state_dict
from imagebind_llm.world import espeak_missing
from imagebind_llm.world import scene as scene_module

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "demo" / "build.py"
MISSING = espeak_missing() or next((f"font {name} missing in {scene_module.FONT_DIR}" for name in scene_module.FONTS
                                    if not (scene_module.FONT_DIR / name).is_file()), None)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"the world's speech and signs need espeak-ng and "
                                f"fonts-dejavu-core: {MISSING}")


def tower(path: Path, name: str) -> dict[str, torch.Tensor]:
    state = read_state_dict(path / "encoder" / "imagebind.pth")
    return {k: v for k, v in state.items() if f".{name}." in k}


def test_the_tiny_recipe_runs_every_step_and_binds_through_the_frozen_vision_tower(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--scale", "tiny"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((out / "evaluate.json").read_text())
    assert set(report["mme"]) == {"total", "existence", "count", "position", "color", "OCR"}
    assert 0 <= report["mme"]["total"] <= 1000 and report["mme"]["total"] == sum(
        v for k, v in report["mme"].items() if k != "total")
    assert set(report["zero_shot"]) == {"audio", "point"}
    assert all(set(v) == {"trained", "zero"} for v in report["zero_shot"].values())
    vision = tower(out / "towers", "vision")
    assert vision and all(torch.equal(vision[k], v) for k, v in tower(out / "point", "vision").items())
    audio = tower(out / "audio", "audio")
    assert audio and all(torch.equal(audio[k], v) for k, v in tower(out / "point", "audio").items())
    assert not all(torch.equal(audio[k], v) for k, v in tower(out / "towers", "audio").items())  # audio trained
    pretrained = json.loads((out / "stage2" / "pretrained" / "config.json").read_text())
    assert pretrained["adapter"]["phase"] == "finetune"
    again = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--scale", "tiny"], capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": done (") == 7
