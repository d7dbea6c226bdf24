"""The one reader of state-dict files: ``.pth``/``.pt`` (``weights_only``, memory-mapped) or ``.safetensors``.

Every checkpoint the project reads (adapters, encoders, Meta LLaMA shards, delta weights) goes through
`read_state_dict`, so all of them refuse pickled code and fail with the same one-line errors. The format is
told by the first bytes (a zip or pickle from ``torch.save``, a ``safetensors`` header), not by the suffix,
and a file of another kind of checkpoint (an adapter given as ImageBind weights...) is named as such.
"""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError

# What each kind of checkpoint is called (``what=``), the key prefixes that only it has, and where it goes.
CHECKPOINT_KINDS: dict[str, tuple[tuple[str, ...], str]] = {
    "ImageBind checkpoint": (("modality_trunks.", "modality_preprocessors.", "point_trunk."), "--imagebind"),
    "adapter checkpoint": (("image_bind_proj.", "prefix_query."), "--adapter"),
    "LLaMA checkpoint": (("tok_embeddings.", "layers.", "model.embed_tokens.", "model.layers."),
                         "--model (its folder)"),
}
# Errors the deserialisers raise on corrupt bytes: torch.load's zip reader and weights-only unpickler, whose opcodes
# index, pop, unpack, assert and call with whatever the bytes say (bench/fuzz.py finds each of these; a corrupt size
# in a legacy file asks for terabytes), and safetensors' parser. Only the deserialising call is guarded by them.
_CORRUPT = (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError, LookupError, AttributeError, TypeError,
            AssertionError, ArithmeticError, MemoryError, struct.error, zipfile.BadZipFile, SafetensorError)


class StateDictError(ValueError):
    """A file that is not a readable state dict of tensors."""


def read_state_dict(path: str | Path, *, what: str = "checkpoint", unwrap: bool = True) -> dict[str, torch.Tensor]:
    """Read ``path`` as ``{name: tensor}``; a ``{'model': state_dict}`` wrapper is unwrapped when ``unwrap``.

    Args:
        what: how the error messages name the file (``"adapter checkpoint"``, ``"ImageBind checkpoint"``); when it
            is one of `CHECKPOINT_KINDS`, a state dict whose keys are those of another kind is refused.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        StateDictError: the file is no checkpoint, is corrupt, pickles code, holds something other than tensors,
            or is another kind of checkpoint (the message says which, and the option that takes it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (official files: `imagebind-llm weights fetch NAME`)")
    with path.open("rb") as f:
        head = f.read(64)
    fmt = _format(head, path.stat().st_size)
    if fmt is None:
        raise StateDictError(f"{path} is not a checkpoint ({_describe(head)}); pass the {what} as a PyTorch "
                             ".pth/.pt or a .safetensors file")
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = _torch_load(path)
    except _CORRUPT as e:
        raise StateDictError(f"{what} {path} is not a readable {fmt} of tensors ({_reason(e)})") from e
    if unwrap and isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise StateDictError(f"{path} is not {_a(what)}: expected a state dict of tensors "
                             f"(or {{'model': state_dict}}), got {type(state).__name__}")
    kind = checkpoint_kind(state)
    if what in CHECKPOINT_KINDS and kind not in (None, what):
        raise StateDictError(f"{path} is not {_a(what)}: this looks like {_a(kind)}; pass it as "
                             f"{CHECKPOINT_KINDS[kind][1]}")
    return dict(state)


def checkpoint_kind(state: Mapping[str, object]) -> str | None:
    """The `CHECKPOINT_KINDS` entry whose characteristic keys ``state`` has, or None."""
    for kind, (prefixes, _) in CHECKPOINT_KINDS.items():
        if any(key.startswith(prefixes) for key in state):
            return kind
    return None


def _format(head: bytes, size: int) -> str | None:
    """``"PyTorch checkpoint"`` (zip or pickle), ``"safetensors file"`` (u64 header length + JSON), or None."""
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "PyTorch checkpoint"
    if len(head) > 8 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors file"
    return None


def _describe(head: bytes) -> str:
    """What the first bytes of a non-checkpoint look like, for the error message."""
    if not head:
        return "the file is empty"
    text = head.decode("utf-8", "replace")
    if all(c.isprintable() or c.isspace() for c in text[:-1]):
        return f"it is text: {' '.join(text.split())[:40]!r}"
    return f"it starts with the bytes {head[:8].hex(' ')}"


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiouAEIOU" else "a ") + kind


def _reason(error: Exception) -> str:
    if isinstance(error, MemoryError):
        return "it asks for more memory than this machine has: corrupt sizes, or too large"
    text = str(error).strip()
    if "Weights only load failed" in text:  # torch's advice to unpickle arbitrary code is never the fix here
        return "it is corrupt, truncated, or pickles objects other than tensors"
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__  # torch appends advice for its devs


def _torch_load(path: Path) -> object:
    with warnings.catch_warnings():  # torch's notes on odd pickles (protocol, deprecated storages): the load fails
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")  # or succeeds all the same
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) files cannot be mapped
