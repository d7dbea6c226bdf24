"""The `imagebind-llm` CLI: help, one-shot and interactive chat on the embedded SmolLM2, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagebind_llm.cli import main
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.model import Transformer
from imagebind_llm.llm.weights.hf import save_hf


def test_help_lists_commands_and_chat_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: imagebind-llm" in out and "chat" in out and "cache" in out
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    out = capsys.readouterr().out
    for option in ["--model", "--stream", "--max-new-tokens", "--temperature", "--top-p", "--top-k", "--system",
                   "--template", "/exit"]:
        assert option in out, option


def test_chat_answers_on_the_embedded_model(capsys):
    assert main(["chat", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out


@pytest.mark.slow  # a fresh process loads torch and the model: ~15 s on 2 idle cores
def test_interactive_session_keeps_history_and_streams():
    """Two turns through stdin in a real process: the second answer needs the first turn's context."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    turns = "What is the capital of France?\nAnd of Germany?\n/exit\nnever read\n"
    result = subprocess.run(
        [sys.executable, "-m", "imagebind_llm", "chat", "--stream", "--max-new-tokens", "24"],
        input=turns, capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2, result.stdout
    assert "Paris" in lines[0] and "Berlin" in lines[1]


def error_line(capsys, argv: list[str]) -> str:
    assert main(argv) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert captured.out == ""
    return lines[0]


def test_missing_model_is_one_line(capsys, tmp_path):
    line = error_line(capsys, ["chat", "hi", "--model", str(tmp_path / "missing.gguf")])
    assert line.startswith("imagebind-llm chat: error:") and "missing.gguf does not exist" in line
    assert "expected a .gguf file" in line  # the fix: what to pass instead


def test_unknown_format_is_one_line(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    line = error_line(capsys, ["chat", "hi", "--model", str(tmp_path)])
    assert "holds no supported weights (found: weights.bin)" in line and "params.json" in line


def tiny_hf_model(path: Path) -> None:
    """A random 1-layer model in Hugging Face layout, with the fixture's SentencePiece tokenizer."""
    config = LLMConfig(vocab_size=300, dim=64, n_layers=1, n_heads=4, hidden_dim=96)
    save_hf(path, Transformer(config).state_dict(), config)
    (path / "tokenizer.model").write_bytes((Path(__file__).parent / "fixtures/adapter/llama/tokenizer.model").read_bytes())


def test_mismatched_weights_are_one_line(capsys, tmp_path):
    tiny_hf_model(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32, "head_dim": 8}))
    line = error_line(capsys, ["chat", "hi", "--model", str(tmp_path)])
    assert "(lm_head.weight): tensor 'output.weight' has shape [300, 64] but the config expects [300, 32]" in line


def test_bad_sampling_option_is_one_line(capsys, tmp_path):
    tiny_hf_model(tmp_path)
    line = error_line(capsys, ["chat", "hi", "--model", str(tmp_path), "--temperature", "-1"])
    assert "temperature=-1.0 must be a finite number >= 0" in line
    # ... and the same tiny model answers (Alpaca template, as it ships no chat template).
    assert main(["chat", "hi", "--model", str(tmp_path), "--max-new-tokens", "3", "--temperature", "0.7",
                 "--seed", "0"]) == 0
    assert capsys.readouterr().err == ""
