"""Official ImageBind-LLM adapter checkpoints (`7B.pth`, `7B-pretrained.pth`, `7B-beta.pth`) <-> our names.

The released adapter files are ``{'model': state_dict}`` holding the bind network, the prefix, the
gates and (after stage 2) the decoder's norms, biases and LoRA weights, with these official names:

    image_bind_proj.{weight,bias}              <-> bind.proj.{weight,bias}
    image_bind_norm_{k}.{weight,bias}          <-> bind.blocks.{k-1}.norm.{weight,bias}
    image_bind_f{1,2,3}_{k}.{weight,bias}      <-> bind.blocks.{k-1}.w{1,2,3}.{weight,bias}
    prefix_query.weight          [L, D]        <-> prefix
    llama.layers.{i}.attention.gate [1,H,1,1]  <-> gates.{j}   [H]   (j-th injected layer, i = first + j)
    llama.layers.{i}.attention.lora_w{q,k,v,o}_l{1,2}.weight  <-> llm.layers.{i}.attention.w{q,k,v,o}.lora_{a,b}.weight
    llama.layers.{i}.feed_forward.lora_w{1,2,3}_l{1,2}.weight <-> llm.layers.{i}.feed_forward.w{1,2,3}.lora_{a,b}.weight
    llama.<anything else>                      <-> llm.<same>   (norms, biases, base weights)

Official key names live only in this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from imagebind_llm.encoders.convert import official_key as official_encoder_key
from imagebind_llm.hub import read_state_dict
from imagebind_llm.llm.weights.common import CheckpointMismatchError

_BIND_RULES = [
    (re.compile(r"^image_bind_proj\.(weight|bias)$"), lambda m: f"bind.proj.{m[1]}"),
    (re.compile(r"^image_bind_norm_(\d+)\.(weight|bias)$"), lambda m: f"bind.blocks.{int(m[1]) - 1}.norm.{m[2]}"),
    (re.compile(r"^image_bind_f([123])_(\d+)\.(weight|bias)$"),
     lambda m: f"bind.blocks.{int(m[2]) - 1}.w{m[1]}.{m[3]}"),
]
_LORA_OFFICIAL = re.compile(r"^llama\.layers\.(\d+)\.(attention|feed_forward)\.lora_(w[qkvo123])_l([12])\.weight$")
_LORA_OURS = re.compile(r"^llm\.layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])\.lora_([ab])\.weight$")
_GATE_OFFICIAL = re.compile(r"^llama\.layers\.(\d+)\.attention\.gate$")
_GATE_OURS = re.compile(r"^gates\.(\d+)$")


def official_to_ours(name: str, first_injected_layer: int) -> str:
    """Map one official ImageBind-LLM parameter name to ours (see module docstring)."""
    for pattern, rename in _BIND_RULES:
        if m := pattern.match(name):
            return rename(m)
    if name == "prefix_query.weight":
        return "prefix"
    if m := _GATE_OFFICIAL.match(name):
        return f"gates.{int(m[1]) - first_injected_layer}"
    if m := _LORA_OFFICIAL.match(name):
        return f"llm.layers.{m[1]}.{m[2]}.{m[3]}.lora_{'a' if m[4] == '1' else 'b'}.weight"
    if name.startswith("llama."):
        return "llm." + name[len("llama."):]
    if name.startswith("image_bind."):
        return "encoder." + name[len("image_bind."):]
    raise CheckpointMismatchError(f"unknown ImageBind-LLM checkpoint key {name!r}")


def ours_to_official(name: str, first_injected_layer: int) -> str:
    """Inverse of `official_to_ours`."""
    if m := re.match(r"^bind\.proj\.(weight|bias)$", name):
        return f"image_bind_proj.{m[1]}"
    if m := re.match(r"^bind\.blocks\.(\d+)\.norm\.(weight|bias)$", name):
        return f"image_bind_norm_{int(m[1]) + 1}.{m[2]}"
    if m := re.match(r"^bind\.blocks\.(\d+)\.w([123])\.(weight|bias)$", name):
        return f"image_bind_f{m[2]}_{int(m[1]) + 1}.{m[3]}"
    if name == "prefix":
        return "prefix_query.weight"
    if m := _GATE_OURS.match(name):
        return f"llama.layers.{int(m[1]) + first_injected_layer}.attention.gate"
    if m := _LORA_OURS.match(name):
        return f"llama.layers.{m[1]}.{m[2]}.lora_{m[3]}_l{'1' if m[4] == 'a' else '2'}.weight"
    if name.startswith("llm."):
        return "llama." + name[len("llm."):]
    if name.startswith("encoder."):
        return "image_bind." + name[len("encoder."):]
    raise CheckpointMismatchError(f"parameter {name!r} has no official ImageBind-LLM name")


def gate_to_official(gate: torch.Tensor) -> torch.Tensor:
    """``[H]`` -> ``[1, H, 1, 1]`` (the official per-head gate shape)."""
    return gate.reshape(1, -1, 1, 1)


def read_adapter_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official adapter file ``{'model': state_dict}`` (or a bare state dict) safely."""
    return read_state_dict(path, what="adapter checkpoint")


def is_legacy_bind(official_state: Mapping[str, torch.Tensor]) -> bool:
    """True for the LayerNorm + bias bind network of the released ``7B-beta.pth``."""
    return "image_bind_norm_1.bias" in official_state or "image_bind_f1_1.bias" in official_state


def official_names(model: nn.Module) -> dict[str, str]:
    """Our parameter name -> official ImageBind-LLM name, for every parameter of an `ImageBindLLM`."""
    names = {}
    for key, _ in model.named_parameters():
        if key.startswith("encoder."):
            names[key] = "image_bind." + official_encoder_key(key[len("encoder."):])
        else:
            names[key] = ours_to_official(key, model.first_injected_layer)
    return names


def official_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """An `ImageBindLLM`'s adapter in the official layout (wrap as ``{'model': ...}`` to write a ``7B.pth``):
    bind net, prefix, gates, decoder norms, biases and LoRA, as the official ``convert_ckpt.py`` keeps."""
    out = {}
    for key, param in model.adapter_params("all").items():
        tensor = param.detach()
        out[ours_to_official(key, model.first_injected_layer)] = gate_to_official(tensor) if key.startswith("gates.") \
            else tensor
    return out


def official_to_ours_state(official: Mapping[str, torch.Tensor], first_injected_layer: int) -> dict[str, torch.Tensor]:
    """An official adapter state dict renamed to our parameter names (gates reshaped to ``[H]``)."""
    ours = {}
    for name, tensor in official.items():
        key = official_to_ours(name, first_injected_layer)
        ours[key] = tensor.reshape(-1) if key.startswith("gates.") else tensor
    return ours
