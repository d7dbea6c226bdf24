"""The bad-input corpus: every case is a command line a user could type with a broken, wrong or hostile input.

Each case asserts what the CLI promises (`imagebind_llm.cli`): exit code 1, one line on stderr
``imagebind-llm CMD: error: ...`` naming the input, no traceback, nothing on stdout, and no existing file in the
case's folder changed. Cases run in-process (``cli.main``) in a fresh folder; most fail before any model is
built, and the few that need one use the small LLaMA fixture. A few more check what one-line errors cannot:
a chat that survives a bad line, a download that gives up on a silent server in seconds, a closed pipe.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from imagebind_llm import hub
from imagebind_llm.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
MEDIA = FIXTURES / "media"
LLAMA = FIXTURES / "adapter" / "llama"
ADAPTER = FIXTURES / "adapter" / "adapter_finetune.pth"
IMAGEBIND = FIXTURES / "imagebind" / "imagebind_small.pth"
TINY_MODEL = ["--model", str(LLAMA / "base"), "--adapter", str(ADAPTER)]  # a model that loads in a second
NOT_UTF8 = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # a Latin-1 argument, as Python decodes argv


class Evil:
    """Unpickling this runs code: a checkpoint must never be unpickled with it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _truncated(path: Path, fraction: float = 0.5) -> bytes:
    data = path.read_bytes()
    return data[: int(len(data) * fraction)]


def _pt(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _safetensors(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _zip_with(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(name, data)
    return buffer.getvalue()


def _adapter_folder(config: dict | bytes, tensors: bytes | None = None) -> dict[str, bytes]:
    """An imagebind-llm folder ``w`` (``--weights``) with this config.json."""
    return {"w/config.json": config if isinstance(config, bytes) else json.dumps(config).encode(),
            "w/adapter.safetensors": tensors if tensors is not None else _safetensors({"prefix": torch.zeros(1)})}


def _hf_folder(config: bytes, weights: bytes | None = None) -> dict[str, bytes]:
    """A Hugging Face model folder ``hf`` with this config.json."""
    return {"hf/config.json": config, "hf/model.safetensors": weights or _safetensors({"x": torch.zeros(1)}),
            "hf/tokenizer.model": (LLAMA / "tokenizer.model").read_bytes()}


def _meta_folder(params: bytes, shard: bytes | None = None) -> dict[str, bytes]:
    """A Meta model folder ``meta`` with this params.json (and the fixture's shard unless given)."""
    return {"meta/params.json": params,
            "meta/consolidated.00.pth": shard if shard is not None else (LLAMA / "base" / "consolidated.00.pth").read_bytes(),
            "meta/tokenizer.model": (LLAMA / "tokenizer.model").read_bytes()}


def _cache(folder: Path, dim: int = 48) -> None:
    """A small retrieval cache of ``dim``-wide features in ``folder/cache``, and a 7-wide query ``folder/v.npy``."""
    from imagebind_llm.cache import FeatureCache

    vectors = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    FeatureCache.from_vectors(vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).save(folder / "cache")
    (folder / "v.npy").write_bytes(_npy(np.ones(7, np.float32)))


TEXT = b"hello\nworld\n"
JPEG_HEAD = (MEDIA / "girl.jpg").read_bytes()[:300]
TORCH_ZIP_HEAD = ADAPTER.read_bytes()[:4096]

# (id, files to create: {relative path: bytes} or a function of the folder, argv, what the error line must say)
CASES: list[tuple[str, dict[str, bytes] | Callable[[Path], None], list[str], str]] = [
    # ---------------------------------------------------------------- media
    ("image-missing", {}, ["ask", "--image", "nope.jpg", "hi"], "nope.jpg"),
    ("image-text", {"notes.jpg": TEXT}, ["ask", "--image", "notes.jpg", "hi"], "notes.jpg"),
    ("image-empty", {"empty.jpg": b""}, ["ask", "--image", "empty.jpg", "hi"], "empty.jpg"),
    ("image-truncated", {"cut.jpg": JPEG_HEAD}, ["ask", "--image", "cut.jpg", "hi"], "cut.jpg"),
    ("image-folder", {"pics/a.txt": TEXT}, ["ask", "--image", "pics", "hi"], "pics"),
    ("image-is-audio", {"x.jpg": (MEDIA / "car_audio.wav").read_bytes()}, ["ask", "--image", "x.jpg", "hi"], "x.jpg"),
    ("audio-text", {"notes.wav": TEXT}, ["ask", "--audio", "notes.wav", "hi"], "notes.wav"),
    ("audio-empty", {"empty.wav": b""}, ["ask", "--audio", "empty.wav", "hi"], "empty.wav"),
    ("audio-truncated-header", {"cut.wav": (MEDIA / "car_audio.wav").read_bytes()[:30]},
     ["ask", "--audio", "cut.wav", "hi"], "cut.wav"),
    ("audio-is-image", {"x.wav": JPEG_HEAD}, ["ask", "--audio", "x.wav", "hi"], "x.wav"),
    ("video-text", {"notes.mp4": TEXT}, ["ask", "--video", "notes.mp4", "hi"], "notes.mp4"),
    ("video-truncated", {"cut.mp4": (MEDIA / "synthetic_landscape.mp4").read_bytes()[:2000]},
     ["ask", "--video", "cut.mp4", "hi"], "cut.mp4"),
    ("point-text", {"cloud.ply": TEXT}, ["ask", "--point", "cloud.ply", "hi"], "cloud.ply"),
    ("point-wrong-shape", {"cloud.npy": _npy(np.zeros((10, 2), np.float32))}, ["ask", "--point", "cloud.npy", "hi"],
     "cloud.npy"),
    ("point-pickle", {"cloud.pt": pickle.dumps(Evil(), protocol=2)},
     ["ask", "--point", "cloud.pt", "hi"], "cloud.pt"),
    ("point-empty-npy", {"cloud.npy": _npy(np.zeros((0, 3), np.float32))}, ["ask", "--point", "cloud.npy", "hi"],
     "cloud.npy"),
    ("depth-text", {"d.png": TEXT}, ["ask", "--depth", "d.png", "hi"], "d.png"),
    ("thermal-text", {"t.png": TEXT}, ["ask", "--thermal", "t.png", "hi"], "t.png"),
    ("imu-text", {"imu.npy": TEXT}, ["ask", "--imu", "imu.npy", "hi"], "imu.npy"),
    ("imu-wrong-shape", {"imu.npy": _npy(np.zeros((3, 10), np.float32))}, ["ask", "--imu", "imu.npy", "hi"], "imu.npy"),
    ("text-not-utf8", {}, ["ask", "--text", NOT_UTF8, "hi"], "--text is not UTF-8"),
    ("question-not-utf8", {}, ["ask", NOT_UTF8], "the question is not UTF-8"),
    ("chat-prompt-not-utf8", {}, ["chat", NOT_UTF8], "the prompt is not UTF-8"),
    ("chat-system-not-utf8", {}, ["chat", "hi", "--system", NOT_UTF8], "--system is not UTF-8"),
    # ---------------------------------------------------------------- options
    ("weight-syntax", {}, ["ask", "--image", str(MEDIA / "girl.jpg"), "--weight", "image", "hi"], "image"),
    ("weight-unknown-modality", {}, ["ask", "--image", str(MEDIA / "girl.jpg"), "--weight", "smell=1", "hi"], "smell"),
    ("weight-not-a-number", {}, ["ask", "--image", str(MEDIA / "girl.jpg"), "--weight", "image=lots", "hi"], "lots"),
    ("device-unknown", {}, ["ask", "--device", "banana", "hi"], "--device 'banana' is not a torch device"),
    ("device-missing-gpu", {}, ["chat", "--device", "cuda:99", "hi"], "--device cuda:99: not available"),
    ("device-serve", {}, ["serve", "--device", "gpu", "--no-ui"], "--device 'gpu'"),
    ("device-cache-query", {}, ["cache", "query", "c", "--vector", "v.npy", "--device", "tpu0"], "--device 'tpu0'"),
    ("temperature-negative", {}, ["chat", "hi", "--temperature", "-1"], "temperature"),
    ("top-p-above-one", {}, ["chat", "hi", "--top-p", "2"], "top_p"),
    ("max-new-tokens-zero", {}, ["chat", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    ("adapter-and-weights", {}, ["ask", "--adapter", "a.pth", "--weights", "w", "hi"], "--weights"),
    ("model-without-adapter", {}, ["ask", "--model", str(LLAMA / "base"), "--image", str(MEDIA / "girl.jpg"), "hi"],
     "--adapter"),
    ("fetch-timeout-zero", {}, ["weights", "fetch", "7B.pth", "--timeout", "0"], "--timeout"),
    ("fetch-sha256-not-hex", {"f.bin": b"x"}, ["weights", "fetch", "f.bin", "--sha256", "WRONG"], "'WRONG'"),
    # ---------------------------------------------------------------- checkpoints
    ("adapter-text", {"notes.txt": TEXT}, ["ask", *TINY_MODEL[:2], "--adapter", "notes.txt", "hi"],
     "notes.txt is not a checkpoint (it is text: 'hello world')"),
    ("adapter-empty", {"a.pth": b""}, ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"],
     "a.pth is not a checkpoint (the file is empty)"),
    ("adapter-random-bytes", {"a.pth": bytes(range(7, 250))}, ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"],
     "a.pth is not a checkpoint (it starts with the bytes"),
    ("adapter-truncated-zip", {"a.pth": _truncated(ADAPTER)}, ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"],
     "a.pth is not a readable PyTorch checkpoint"),
    ("adapter-zip-of-text", {"a.pth": _zip_with("notes.txt", TEXT)},
     ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"], "a.pth is not a readable PyTorch checkpoint"),
    ("adapter-pickled-code", {"a.pth": pickle.dumps(Evil(), protocol=2)},
     ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"], "a.pth is not a readable PyTorch checkpoint"),
    ("adapter-pickle-protocol-4", {"a.pth": pickle.dumps({"prefix_query.weight": 1}, protocol=4)},
     ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"], "a.pth is not a readable PyTorch checkpoint"),
    ("adapter-torch-pickled-code", {"a.pth": _pt({"model": Evil()})},
     ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"], "pickles objects other than tensors"),
    ("adapter-list", {"a.pth": _pt([torch.zeros(1)])}, ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"],
     "a.pth is not an adapter checkpoint: expected a state dict of tensors"),
    ("adapter-int-keys", {"a.pth": _pt({1: torch.zeros(1)})}, ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"],
     "expected a state dict of tensors"),
    ("adapter-bad-safetensors", {"a.safetensors": struct.pack("<Q", 26) + b"{not json at all, not json"},
     ["ask", *TINY_MODEL[:2], "--adapter", "a.safetensors", "hi"], "a.safetensors is not a readable safetensors file"),
    ("adapter-is-imagebind", {}, ["ask", *TINY_MODEL[:2], "--adapter", str(IMAGEBIND), "hi"],
     "this looks like an ImageBind checkpoint; pass it as --imagebind"),
    ("adapter-is-llama", {}, ["ask", *TINY_MODEL[:2], "--adapter", str(LLAMA / "base" / "consolidated.00.pth"), "hi"],
     "this looks like a LLaMA checkpoint; pass it as --model"),
    ("adapter-unknown-keys", {"a.pth": _pt({"foo.weight": torch.zeros(1)})},
     ["ask", *TINY_MODEL[:2], "--adapter", "a.pth", "hi"], "foo.weight"),
    ("adapter-missing", {}, ["ask", *TINY_MODEL[:2], "--adapter", "nope.pth", "hi"], "nope.pth"),
    ("imagebind-text", {"notes.txt": TEXT}, ["ask", *TINY_MODEL, "--imagebind", "notes.txt", "hi"],
     "notes.txt is not a checkpoint"),
    ("imagebind-is-adapter", {}, ["ask", *TINY_MODEL, "--imagebind", str(ADAPTER), "hi"],
     "this looks like an adapter checkpoint; pass it as --adapter"),
    ("imagebind-truncated", {"ib.pth": TORCH_ZIP_HEAD}, ["ask", *TINY_MODEL, "--imagebind", "ib.pth", "hi"],
     "ib.pth is not a readable PyTorch checkpoint"),
    ("imagebind-config-bad-json", {"c.json": b"{bad"},
     ["ask", *TINY_MODEL, "--imagebind", str(IMAGEBIND), "--imagebind-config", "c.json", "hi"],
     "ImageBind config c.json is not valid JSON"),
    ("imagebind-config-not-utf8", {"c.json": b"\xff\xfe{}"},
     ["ask", *TINY_MODEL, "--imagebind", str(IMAGEBIND), "--imagebind-config", "c.json", "hi"],
     "ImageBind config c.json is not valid JSON"),
    ("imagebind-config-list", {"c.json": b"[1, 2]"},
     ["ask", *TINY_MODEL, "--imagebind", str(IMAGEBIND), "--imagebind-config", "c.json", "hi"],
     "c.json must hold a JSON object"),
    ("imagebind-config-unknown-field", {"c.json": b'{"width": 3}'},
     ["ask", *TINY_MODEL, "--imagebind", str(IMAGEBIND), "--imagebind-config", "c.json", "hi"],
     "ImageBind config c.json: unknown ImageBindConfig fields ['width']"),
    ("weights-empty-folder", {"w/.keep": b""}, ["ask", "--weights", "w", "hi"], "w is not an imagebind-llm folder"),
    ("weights-bad-config", _adapter_folder(b"{"), ["ask", "--weights", "w", "hi"], "w/config.json is not valid JSON"),
    ("weights-old-format", _adapter_folder({"format_version": 0}), ["ask", "--weights", "w", "hi"], "format_version"),
    ("model-missing", {}, ["chat", "hi", "--model", "nope.gguf"], "nope.gguf does not exist"),
    ("model-text-file", {"m.gguf": TEXT}, ["chat", "hi", "--model", "m.gguf"], "m.gguf is a file but not a GGUF"),
    ("model-bad-gguf", {"m.gguf": b"GGUF" + bytes(60)}, ["chat", "hi", "--model", "m.gguf"], "m.gguf"),
    ("model-empty-folder", {"m/notes.txt": TEXT}, ["chat", "hi", "--model", "m"], "m holds no supported weights"),
    ("model-hf-bad-config", _hf_folder(b"{oops"), ["chat", "hi", "--model", "hf"], "hf/config.json is not valid JSON"),
    ("model-hf-config-list", _hf_folder(b"[]"), ["chat", "hi", "--model", "hf"], "hf/config.json holds a JSON list"),
    ("model-hf-config-incomplete", _hf_folder(b'{"model_type": "llama"}'), ["chat", "hi", "--model", "hf"],
     "hf/config.json: missing required fields"),
    ("model-meta-bad-params", _meta_folder(b"\xff\xfe"), ["chat", "hi", "--model", "meta"],
     "meta/params.json is not valid JSON"),
    ("model-meta-text-shard", _meta_folder(b'{"dim": 64, "n_layers": 1, "n_heads": 4}', TEXT),
     ["chat", "hi", "--model", "meta"], "meta/consolidated.00.pth is not a checkpoint"),
    ("merge-delta-text-base", {**_meta_folder(b"{}", TEXT), "delta.pth": TEXT},
     ["merge-delta", "--base", "meta", "--delta", "delta.pth", "--out", "out"], "consolidated.00.pth is not a checkpoint"),
    # ---------------------------------------------------------------- cache
    ("cache-info-not-a-cache", {"notes.txt": TEXT}, ["cache", "info", "notes.txt"], "notes.txt"),
    ("cache-info-bad-meta", {"c/meta.json": b"{"}, ["cache", "info", "c"], "meta.json"),
    ("ask-cache-missing", {}, ["ask", *TINY_MODEL, "--cache", "nocache", "hi"], "nocache"),
    ("ask-cache-wrong-dim", _cache, ["ask", *TINY_MODEL, "--cache", "cache", "hi"],
     "--cache cache holds 'imagebind_huge' features of dim 48, but the model's encoder gives dim"),
    ("cache-query-wrong-dim", _cache, ["cache", "query", "cache", "--vector", "v.npy"], "[B, 48]"),
    ("cache-build-text-features", {"f.npy": TEXT}, ["cache", "build", "--features", "f.npy", "--out", "c"], "f.npy"),
    ("cache-build-no-images", {"imgs/notes.txt": TEXT}, ["cache", "build", "--images", "imgs", "--out", "c"], "imgs"),
    # ---------------------------------------------------------------- training
    ("train-config-missing", {}, ["train", "stage1", "--config", "nope.yaml", "--print-config"], "nope.yaml"),
    ("train-config-unknown-key", {"c.yaml": b"optim:\n  learning_rate: 1\n"},
     ["train", "stage1", "--config", "c.yaml", "--print-config"], "learning_rate"),
    ("train-set-malformed", {}, ["train", "stage1", "--set", "optim.lr", "--print-config"], "optim.lr"),
    ("train-set-unknown-key", {}, ["train", "stage2", "--set", "optim.speed=3", "--print-config"], "speed"),
    # ---------------------------------------------------------------- downloads
    ("fetch-unknown-name", {}, ["weights", "fetch", "no-such-weights"], "no-such-weights"),
    ("fetch-local-wrong-sha256", {"f.bin": b"x"}, ["weights", "fetch", "f.bin", "--sha256", "0" * 64],
     "f.bin: SHA-256 mismatch"),
    # ---------------------------------------------------------------- server
    ("serve-max-batch-zero", {}, ["serve", "--max-batch", "0", "--no-ui"], "--max-batch must be > 0"),
    ("serve-body-negative", {}, ["serve", "--max-body-mb", "-1", "--no-ui"], "--max-body-mb must be > 0"),
    ("serve-fetch-timeout-nan", {}, ["serve", "--fetch-timeout", "nan", "--no-ui"], "--fetch-timeout"),
    ("web-without-ui", {}, ["web", "--no-ui"], "drop --no-ui"),
]


def tree_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(capsys, argv: list[str], folder: Path, expected: str) -> str:
    """Run ``argv`` in-process in ``folder``; check the CLI's promises for bad input; return the error line."""
    before = tree_hashes(folder)
    with warnings.catch_warnings(record=True) as caught:  # a warning would be more lines on stderr
        warnings.simplefilter("always")
        code = main(argv)
    captured = capsys.readouterr()
    assert code == 1, (code, captured.err)
    assert not caught, [str(w.message) for w in caught]
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"imagebind-llm {argv[0]}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert captured.out == ""
    after = tree_hashes(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or removed: {changed}"
    return lines[0]


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """A fresh current folder, with the download cache inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "download-cache"))
    return tmp_path


def _create(folder: Path, files: dict[str, bytes] | Callable[[Path], None]) -> None:
    if callable(files):
        files(folder)
        return
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


@pytest.mark.parametrize("files, argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(capsys, folder, files, argv, expected):
    _create(folder, files)
    assert_one_line_error(capsys, argv, folder, expected)


def test_the_corpus_is_large():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


# ---------------------------------------------------------------- cases that need a server or a real pipe
@pytest.fixture
def refused_url() -> str:
    """A loopback URL on which nothing listens (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A loopback URL whose server accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)  # the kernel completes the handshakes; nobody ever reads or writes
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_404_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_silent_server_fails_within_the_timeout(capsys, folder, silent_url):
    start = time.monotonic()
    line = assert_one_line_error(capsys, ["weights", "fetch", f"{silent_url}/w.pth", "--timeout", "0.5",
                                          "--retries", "1", "--cache-dir", "dl"], folder,
                                 "failed after 2 attempt(s) (no answer within 0.5 s)")
    assert time.monotonic() - start < 5
    assert "pass its local path" in line


def test_refused_download_is_one_line(capsys, folder, refused_url):
    assert_one_line_error(capsys, ["weights", "fetch", f"{refused_url}/w.pth", "--retries", "0", "--cache-dir", "dl"],
                          folder, f"download of {refused_url}/w.pth failed after 1 attempt(s)")


def test_http_404_is_one_line(capsys, folder, http_404_url):
    assert_one_line_error(capsys, ["weights", "fetch", f"{http_404_url}/w.pth", "--cache-dir", "dl"], folder,
                          f"download of {http_404_url}/w.pth failed: HTTP 404")


@pytest.mark.parametrize("flag", ["--adapter", "--imagebind"])
def test_registry_name_offline_says_to_pass_a_local_path(capsys, folder, refused_url, monkeypatch, flag):
    for name in ("7B.pth", "imagebind_huge.pth"):
        monkeypatch.setitem(hub.REGISTRY, name, hub.WeightFile(name, f"{refused_url}/{name}", "offline"))
    name = "7B.pth" if flag == "--adapter" else "imagebind_huge.pth"
    argv = ["ask", *TINY_MODEL, flag, name, "hi"] if flag == "--imagebind" else \
        ["ask", *TINY_MODEL[:2], flag, name, "hi"]
    line = assert_one_line_error(capsys, argv, folder, f"download of {refused_url}/{name} failed")
    assert "pass its local path" in line


def test_chat_reports_a_bad_line_and_goes_on(capsys, folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hi\n\xff\xfe bad\nhi again\n/exit\n"),
                                                       encoding="utf-8"))
    assert main(["chat", *TINY_MODEL, "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == ("imagebind-llm chat: error: input line 2 is not UTF-8 text (byte 0xff at "
                                    "character 1); skipped, the conversation goes on")
    assert len(captured.out.strip().splitlines()) == 2  # both good lines answered


@pytest.mark.slow  # a fresh process imports torch: a few seconds
def test_closed_pipe_exits_quietly(tmp_path):
    """``imagebind-llm weights list | head -0``: the reader is gone before we write; no traceback, exit 141."""
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run([sys.executable, "-m", "imagebind_llm", "weights", "list"], stdout=write,
                            stderr=subprocess.PIPE, text=True, timeout=300,
                            env={**os.environ, hub.CACHE_ENV: str(tmp_path)})
    os.close(write)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
