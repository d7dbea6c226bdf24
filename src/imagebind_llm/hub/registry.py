"""What can be named instead of a path: the official files, and named models composed of them.

`REGISTRY` lists downloadable files (`fetch` resolves their names); `MODELS` lists complete models, each
a recipe of base LLM, delta, adapter, encoder and preprocessing, so that one name builds the whole model
(`imagebind_llm.create_model("imagebind-llm-7b")`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

# The demo model shipped in the package: an adapter folder (config.json + adapter.safetensors) and its small
# ImageBind (imagebind.safetensors), trained on synthetic scenes by `scripts/demo/build.py --install`. Until
# it is installed, "demo" is the blind "tiny-random".
DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"
DEMO_INSTALLED = (DEMO_DIR / "imagebind.safetensors").is_file()
DEMO_NOTE = ("the embedded demo model, trained on synthetic scenes (coloured shapes, signs, digits, spoken captions, "
             "3D primitives): for real photos load the released weights (--name imagebind-llm-7b)" if DEMO_INSTALLED
             else "the embedded demo model (small random ImageBind, zero gates): media do not influence the answer "
                  "until trained or released weights are loaded (--model/--adapter, --weights or --name)")


@dataclass(frozen=True)
class WeightFile:
    """One downloadable file.

    Attributes:
        name: registry name and file name in the cache.
        url: source URL.
        description: what the file is and what loads it.
        approx_size: size in bytes as listed by the host (rounded; for display, never verified).
        size: exact size in bytes when known (verified).
        sha256: hex digest when known (verified); ``None`` means not published anywhere we could read.
    """

    name: str
    url: str
    description: str
    approx_size: int | None = None
    size: int | None = None
    sha256: str | None = None


_HF_IBLLM = "https://huggingface.co/Cxxs/ImageBind-LLM/resolve/main"
REGISTRY: dict[str, WeightFile] = {f.name: f for f in (
    WeightFile("imagebind_huge.pth", "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth",
               "Meta's ImageBind-huge encoder (no point branch); ImageBindConfig.huge(with_point=False)",
               approx_size=4_800_000_000),
    WeightFile("imagebind_w3D.pth",
               "https://huggingface.co/ZiyuG/ImageBind_w3D/resolve/e9206a10f118b0790c730264e7b3aa5c324c35cb/"
               "imagebind_w3D.pth",
               "ImageBind-LLM's encoder: ImageBind-huge + Point-BERT branch; ImageBindConfig.huge()",
               approx_size=4_890_000_000),
    WeightFile("7B.pth", f"{_HF_IBLLM}/7B.pth",
               "ImageBind-LLM adapter after stage 2 (bind network, prefix, gates, norms, bias/LoRA)",
               approx_size=2_600_000_000),
    WeightFile("7B-pretrained.pth", f"{_HF_IBLLM}/7B-pretrained.pth",
               "ImageBind-LLM adapter after stage 1 (bind network, prefix, gates)", approx_size=2_430_000_000),
    WeightFile("7B-beta.pth", f"{_HF_IBLLM}/7B-beta.pth",
               "legacy ImageBind-LLM adapter (LayerNorm + bias bind network)", approx_size=2_600_000_000),
    WeightFile("7B_chinese_delta.pth", "https://huggingface.co/Cxxs/Open-Chinese-LLaMA/resolve/main/7B_chinese_delta/"
               "consolidated.00.pth", "Open-Chinese-LLaMA-7B delta over Meta's LLaMA-7B (merge-delta --delta)",
               approx_size=13_500_000_000),
    WeightFile("7B_chinese_params.json", "https://huggingface.co/Cxxs/Open-Chinese-LLaMA/resolve/main/7B_chinese_delta/"
               "params.json", "params.json of Open-Chinese-LLaMA-7B", approx_size=100),
    WeightFile("knn.index", "https://huggingface.co/csuhan/knn/resolve/main/knn.index",
               "FAISS flat inner-product index of ~3.2M CC3M ImageBind image embeddings (retrieval cache)",
               approx_size=13_300_000_000),
)}


def list_weights() -> list[WeightFile]:
    """All registry entries, in registry order."""
    return list(REGISTRY.values())


@dataclass(frozen=True)
class NamedModel:
    """A complete model under one name: which base, delta, adapter and encoder make it up.

    Attributes:
        name: the registry name (``create_model(name)``).
        description: one line for ``imagebind-llm weights list``.
        base: ``None`` for the embedded SmolLM2-135M-Instruct, ``"llama-7b"`` for Meta's LLaMA-7B, which
            cannot be downloaded (Meta's licence): the user passes its folder as ``llm=``.
        delta: registry names of the delta weights and their ``params.json`` added to the base
            (``merge-delta``), or None.
        adapter: registry name of the official adapter file, a path (our folder), or None.
        imagebind: registry name or path of the ImageBind checkpoint; None with ``demo_encoder`` or without media.
        demo_encoder: a small randomly initialised ImageBind (the embedded demo).
        phase: adapter structure, ``"finetune"`` (stage 2) or ``"pretrain"`` (stage 1).
        template: the prompt format the adapter was trained with.
    """

    name: str
    description: str
    base: str | None = None
    delta: tuple[str, str] | None = None
    adapter: str | None = None
    imagebind: str | None = None
    demo_encoder: bool = False
    phase: str = "finetune"
    template: str = "alpaca"


_TINY_RANDOM = NamedModel("tiny-random", "embedded SmolLM2-135M-Instruct + a small random ImageBind (zero gates: "
                          "blind); for smoke runs and tests", demo_encoder=True, template="model")
MODELS: dict[str, NamedModel] = {m.name: m for m in (
    NamedModel("imagebind-llm-7b", "the released chat model: LLaMA-7B + Open-Chinese delta + 7B.pth + "
               "imagebind_w3D.pth (pass llm=LLaMA-7B folder)", base="llama-7b",
               delta=("7B_chinese_delta.pth", "7B_chinese_params.json"), adapter="7B.pth",
               imagebind="imagebind_w3D.pth"),
    NamedModel("imagebind-llm-7b-pretrained", "stage-1 release: Open-Chinese-LLaMA-7B + 7B-pretrained.pth",
               base="llama-7b", delta=("7B_chinese_delta.pth", "7B_chinese_params.json"),
               adapter="7B-pretrained.pth", imagebind="imagebind_w3D.pth", phase="pretrain"),
    NamedModel("imagebind-llm-7b-beta", "legacy release on vanilla LLaMA-7B: 7B-beta.pth + imagebind_huge.pth",
               base="llama-7b", adapter="7B-beta.pth", imagebind="imagebind_huge.pth"),
    NamedModel("demo", "embedded SmolLM2-135M-Instruct + an adapter and a small ImageBind trained here on "
               "synthetic scenes", adapter=str(DEMO_DIR), imagebind=str(DEMO_DIR / "imagebind.safetensors"))
    if DEMO_INSTALLED else replace(_TINY_RANDOM, name="demo", description="the same as tiny-random (blind): no "
                                   "trained demo installed (scripts/demo/build.py --install)"),
    _TINY_RANDOM,
)}
