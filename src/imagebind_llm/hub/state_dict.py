"""The one reader of state-dict files: ``.pth``/``.pt`` (``weights_only``, memory-mapped) or ``.safetensors``.

Every checkpoint the project reads (adapters, encoders, Meta LLaMA shards, delta weights) goes through
`read_state_dict`, so all of them refuse pickled code and fail with the same one-line errors.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch


class StateDictError(ValueError):
    """A file that is not a readable state dict of tensors."""


def read_state_dict(path: str | Path, *, what: str = "checkpoint", unwrap: bool = True) -> dict[str, torch.Tensor]:
    """Read ``path`` as ``{name: tensor}``; a ``{'model': state_dict}`` wrapper is unwrapped when ``unwrap``.

    Args:
        what: how the error messages name the file (``"adapter checkpoint"``, ``"ImageBind checkpoint"``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StateDictError: the file is corrupt, pickles code, or does not hold tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (official files: `imagebind-llm weights fetch NAME`)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = _torch_load(path)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise StateDictError(f"{what} {path} is not a readable {_kind(path)} of tensors ({_reason(e)})") from e
    if unwrap and isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise StateDictError(f"{path} is not a {what}: expected a state dict of tensors "
                             f"(or {{'model': state_dict}}), got {type(state).__name__}")
    return dict(state)


def _kind(path: Path) -> str:
    return "safetensors file" if path.suffix == ".safetensors" else "PyTorch checkpoint"


def _reason(error: Exception) -> str:
    text = str(error).strip()
    if "Weights only load failed" in text:  # torch's advice to unpickle arbitrary code is never the fix here
        return "it is corrupt, truncated, or pickles objects other than tensors"
    return text.splitlines()[0] if text else type(error).__name__


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be mapped
