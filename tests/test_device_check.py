"""bench/device_check.sh --dry-run runs end to end on the CPU (so the GPU check cannot rot between GPU runs), as
on the bare GPU machine: the packages that machine lacks are hidden and replaced by stand-ins."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BARE_MACHINE_LACKS = "av,soundfile,plyfile,ftfy,gguf,faiss"  # /work/.library/device/KINDS.md's package list


@pytest.mark.slow  # five fresh processes import torch, and one compiles a decode step: 20-40 s on 2 cores
def test_dry_run_prints_and_writes_the_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IMAGEBIND_LLM_TEST_DEVICE"}
    run = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry-run", "--hide", BARE_MACHINE_LACKS],
                         env={**env, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| name | value | unit | status | note |" in run.stdout and "0 failed" in run.stdout
    summary = json.loads((tmp_path / "device_check.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert summary["dry_run"] and summary["failed"] == 0
    assert rows["python packages"]["status"] == "ok"
    assert all(name in rows["python packages"]["note"] for name in BARE_MACHINE_LACKS.split(","))

    tests = [r for name, r in rows.items() if name.startswith("test_")]
    assert len(tests) == 7 and all(r["status"] == "skip" for r in tests)
    assert all(r["note"].startswith("needs a CUDA GPU: torch.cuda.is_available() is False") for r in tests)

    benches = ["copy bandwidth", "bf16 matmul", "tiny bf16 decode bound", "tiny bf16 decode b1 eager",
               "tiny bf16 decode b1 compiled", "ImageBind-demo vision bf16 b1", "ImageBind-demo vision bf16 b2",
               "engine multimodal requests", "engine generated tokens",
               *(f"train stage {s} b2, {f} features" for s in (1, 2) for f in ("encoder", "cache"))]
    for name in benches:
        assert rows[name]["status"] == "ok" and rows[name]["value"] > 0, rows.get(name)
    assert (tmp_path / "device_check.md").read_text().count("\n| ") == len(rows) + 1  # header + one line a row
    assert (tmp_path / "device_check.log").is_file()
