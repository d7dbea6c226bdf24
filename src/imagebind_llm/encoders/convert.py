"""Official ImageBind / ImageBind-LLM checkpoint layout <-> our module names.

The official key names (``modality_preprocessors.*``, ``modality_trunks.*``, ``modality_heads.*``,
``modality_postprocessors.*``, ``point_trunk.*``) live only here. ``official_key`` maps one of our
keys to its official name; the inverse is built by enumerating the model's keys, so the two can
never disagree. The official text tower also stores its causal mask (``modality_preprocessors.text.mask``,
``[77, 77]``); we use ``is_causal`` instead, so that key is checked and dropped on load.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .config import TEXT_CONTEXT

TEXT_MASK_KEY = "modality_preprocessors.text.mask"
_STEM = {"vision": "rgbt_stem", "audio": "rgbt_stem", "thermal": "rgbt_stem", "depth": "depth_stem", "imu": "imu_stem"}
_HEAD_NORM = {"text": "proj.0"}
_HEAD_PROJ = {"text": "proj.1", "imu": "3"}
_BLOCK_RENAMES = (("attn.qkv.weight", "attn.in_proj_weight"), ("attn.qkv.bias", "attn.in_proj_bias"),
                  ("attn.proj.", "attn.out_proj."), ("norm1.", "norm_1."), ("norm2.", "norm_2."))


def _tower_key(m: str, rest: str) -> str:
    P, T = f"modality_preprocessors.{m}", f"modality_trunks.{m}"
    if rest.startswith("head_norm."):
        return f"modality_heads.{m}.{_HEAD_NORM.get(m, '0')}.{rest.removeprefix('head_norm.')}"
    if rest == "head_proj.weight":
        return f"modality_heads.{m}.{_HEAD_PROJ.get(m, '2')}.weight"
    if rest == "log_logit_scale":
        return f"modality_postprocessors.{m}.1.log_logit_scale"
    if rest == "trunk.pc_projection":
        return "point_trunk.pc_projection"
    if rest.startswith("trunk.point_encoder."):
        return "point_trunk." + re.sub(r"^point_encoder\.blocks\.", "point_encoder.blocks.blocks.",
                                       rest.removeprefix("trunk."))
    if rest.startswith("blocks."):
        for ours, theirs in _BLOCK_RENAMES:
            rest = rest.replace(ours, theirs)
        return f"{T}.{rest}"
    if rest.startswith("pre_norm."):
        return f"{T}.pre_transformer_layer.0.{rest.removeprefix('pre_norm.')}"
    if rest in ("cls_token", "token_embedding.weight"):
        return f"{P}.{rest}"
    if rest == "pos_embed":
        return f"{P}.pos_embed" if m in ("text", "imu") else f"{P}.pos_embedding_helper.pos_embed"
    if rest == "stem.proj.weight":
        return f"{P}.{_STEM[m]}.proj.{'1.' if m == 'vision' else ''}weight"
    if rest.startswith("stem.convs."):  # our vision_conv_stem: no official counterpart
        return f"{P}.{_STEM[m]}.conv_stem.{rest.removeprefix('stem.convs.')}"
    if rest.startswith("stem.norm."):
        return f"{P}.{_STEM[m]}.norm_layer.{rest.removeprefix('stem.norm.')}"
    raise KeyError(f"no official name for {m!r} tensor {rest!r}")


def official_key(key: str) -> str:
    """Official name of one of our state-dict keys (``towers.<modality>.<rest>``)."""
    prefix, m, rest = key.split(".", 2)
    if prefix != "towers":
        raise KeyError(f"not an ImageBind key: {key!r}")
    return _tower_key(m, rest)


def official_shapes(model: nn.Module) -> dict[str, list[int]]:
    """Official key -> shape for ``model`` (works on the meta device), including the text mask buffer."""
    shapes = {official_key(k): list(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if "towers.text.pos_embed" in model.state_dict(keep_vars=True):
        shapes[TEXT_MASK_KEY] = [TEXT_CONTEXT, TEXT_CONTEXT]
    return shapes


def has_point_branch(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("point_trunk.") for k in state)


def from_official(state: Mapping[str, torch.Tensor], model: nn.Module, *, strict: bool = True
                  ) -> dict[str, torch.Tensor]:
    """Rename an official state dict to ``model``'s keys, checking names and shapes.

    Raises:
        ValueError: listing missing keys, unexpected keys (both only when ``strict``) and shape mismatches.
    """
    ours = model.state_dict(keep_vars=True)
    name_map = {official_key(k): k for k in ours}
    state = dict(state)
    mask = state.pop(TEXT_MASK_KEY, None)
    if mask is not None and tuple(mask.shape) != (TEXT_CONTEXT, TEXT_CONTEXT):
        raise ValueError(f"{TEXT_MASK_KEY}: expected shape [{TEXT_CONTEXT}, {TEXT_CONTEXT}], got {list(mask.shape)}")
    missing = sorted(set(name_map) - set(state))
    unexpected = sorted(set(state) - set(name_map))
    mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(ours[name_map[k]].shape)}"
                  for k in state if k in name_map and state[k].shape != ours[name_map[k]].shape]
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_abbrev(missing)}")
    if strict and unexpected:
        point = any(k.startswith("point_trunk.") for k in unexpected)
        hint = " (a point branch: build with with_point=True)" if point else ""
        problems.append(f"unexpected keys ({len(unexpected)}){hint}: {_abbrev(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_abbrev(mismatched)}")
    if problems:
        raise ValueError("checkpoint does not match the ImageBind config:\n  " + "\n  ".join(problems))
    return {name_map[k]: v for k, v in state.items() if k in name_map}


def to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the official names (plus the text causal mask), e.g. for export."""
    state = {official_key(k): v for k, v in model.state_dict().items()}
    if "towers.text.pos_embed" in model.state_dict():
        ref = model.state_dict()["towers.text.pos_embed"]
        state[TEXT_MASK_KEY] = torch.full((TEXT_CONTEXT, TEXT_CONTEXT), float("-inf"),
                                          device=ref.device).triu(1)
    return state


def _abbrev(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")
