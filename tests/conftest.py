"""Shared fixtures: the embedded SmolLM2 GGUF, our model and transformers' model loaded from it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never try the network in tests

DEVICE_ENV = "IMAGEBIND_LLM_TEST_DEVICE"  # e.g. "cpu": run the `device`-marked tests there, with tiny shapes


def device_under_test() -> tuple[torch.device | None, str]:
    """``(device, "")`` for the `device`-marked tests: ``$IMAGEBIND_LLM_TEST_DEVICE``, else CUDA when present;
    ``(None, reason)`` when they must skip."""
    if os.environ.get(DEVICE_ENV):
        return torch.device(os.environ[DEVICE_ENV]), ""
    if torch.cuda.is_available():
        return torch.device("cuda"), ""
    return None, f"needs a CUDA GPU: torch.cuda.is_available() is False ({DEVICE_ENV}=cpu runs it on the CPU)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device, reason = device_under_test()
    if device is None:
        for item in items:
            if item.get_closest_marker("device"):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def target_device() -> torch.device:
    """Where a `device`-marked test runs (it is skipped when there is none)."""
    device, reason = device_under_test()
    if device is None:
        pytest.skip(reason)
    return device


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from imagebind_llm.llm.weights.gguf import find_default_gguf

    return find_default_gguf()


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2_gguf):
    """``(model, metadata)``: our fp32 SmolLM2 from the GGUF."""
    from imagebind_llm.llm.weights.gguf import load_gguf

    return load_gguf(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="session")
def smollm2(smollm2_loaded):
    """Our SmolLM2 as loaded by default: Q4_1/Q8_0 projections kept quantised when the kernels build."""
    return smollm2_loaded[0]


@pytest.fixture(scope="session")
def smollm2_dense(smollm2_gguf):
    """Our SmolLM2 with every tensor dequantised to float32 parameters."""
    from imagebind_llm.llm.weights.gguf import load_gguf

    return load_gguf(smollm2_gguf, dtype=torch.float32, quantized=False)[0]


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_loaded):
    """The GGUF's byte-level BPE tokenizer."""
    from imagebind_llm.llm.tokenizer import HFTokenizer

    return HFTokenizer.from_gguf_metadata(smollm2_loaded[1])


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own LlamaForCausalLM loaded from the same GGUF (its own dequantisation and layout)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def seeing_demo():
    """The tiny random model (SmolLM2 + a small random ImageBind) with its gates at 0.5, so that media change
    the answers (512-token context).

    One engine at a time may use it (an engine owns the model's KV cache)."""
    import imagebind_llm as ibl

    model = ibl.create_model("tiny-random", max_seq_len=512)
    with torch.no_grad():
        for gate in model.gates:
            gate.fill_(0.5)
    return model


class LiveServer:
    """A server of ours running on 127.0.0.1 in a thread: ``url`` (``http://127.0.0.1:PORT``), ``service``."""

    def __init__(self, service, port: int, thread, server) -> None:
        self.service, self.port, self._thread, self._server = service, port, thread, server
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.service.close()


@pytest.fixture
def start_server(seeing_demo):
    """``start_server(engine=None, **ServeConfig fields) -> LiveServer``: the API (and UI) of `seeing_demo` (or of
    ``engine``) on a free port; stopped after the test."""
    import socket
    import threading
    import time

    import uvicorn

    from imagebind_llm.engine import Engine
    from imagebind_llm.serve.app import create_app
    from imagebind_llm.serve.config import ServeConfig
    from imagebind_llm.serve.service import Service

    started = []

    def start(engine=None, **config) -> LiveServer:
        engine = engine or Engine(seeing_demo, max_batch=8, max_context=512)
        service = Service(ServeConfig(**{"ui": False, **config}), engine=engine)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        started.append(LiveServer(service, port, thread, server))
        return started[-1]

    yield start
    for live in started:
        live.stop()


@pytest.fixture
def free_port() -> int:
    """A free TCP port on the loopback interface (the rendezvous of a ``torchrun`` test)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantised_weights(model: torch.nn.Module) -> dict:
    from imagebind_llm.llm.quantized import QuantizedEmbedding, QuantizedLinear

    return {name: m.quantized for name, m in model.named_modules()
            if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def _same_weights(a, b) -> bool:
    buffers = [dict(w.named_buffers()) for w in (a, b)]
    return a.fmt == b.fmt and buffers[0].keys() == buffers[1].keys() and all(
        torch.equal(buffers[0][k], buffers[1][k]) for k in buffers[0])


@pytest.fixture
def quantised_weights():
    """``quantised_weights(model) -> {module name: QuantizedWeight}``: a decoder's quantised modules' weights."""
    return _quantised_weights


@pytest.fixture
def same_weights():
    """``same_weights(a, b)``: two `QuantizedWeight`s hold the same format, blocks, scales and offsets."""
    return _same_weights
