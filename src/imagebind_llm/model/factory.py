"""Building ImageBind-LLM models: `create_model(spec)` is the one way, used by the CLI, training, the
cache commands, the engine and the benches. Also our own folder format and the Open-Chinese-LLaMA merge.

Resolution is explicit: every part comes from a `ModelSpec` field or from the named model it starts from
(`imagebind_llm.hub.MODELS`); registry names are accepted wherever a path is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imagebind_llm.encoders import ImageBind, ImageBindConfig, load_official as load_official_encoder
from imagebind_llm.hub import MODELS, NamedModel, default_cache_dir, fetch, read_state_dict
from imagebind_llm.hub.files import atomic_files, make_dir, refuse_overwrite
from imagebind_llm.llm.config import LLMConfig
from imagebind_llm.llm.tokenizer import load_tokenizer
from imagebind_llm.llm.weights import BASE_MARKER, base_marker, load_llm
from imagebind_llm.llm.weights.meta import meta_shards
from imagebind_llm.model.config import DTYPES, AdapterConfig, ModelSpec
from imagebind_llm.model.convert import (
    CheckpointMismatchError, is_legacy_bind, official_to_ours_state, read_adapter_file,
)
from imagebind_llm.model.imagebind_llm import ImageBindLLM

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE, ADAPTER_FILE = "config.json", "adapter.safetensors"  # our folder format

# A small ImageBind (official architecture, reduced widths/depths) for the embedded demo and smoke runs;
# its output width is the released 1024 so the bind network has its real input size.
DEMO_ENCODER = dict(
    out_embed_dim=1024, vision_embed_dim=48, vision_num_blocks=2, vision_num_heads=4,
    audio_embed_dim=32, audio_num_blocks=2, audio_num_heads=4, text_embed_dim=16, text_num_blocks=2,
    text_num_heads=2, depth_embed_dim=24, depth_num_blocks=2, depth_num_heads=4, thermal_embed_dim=32,
    thermal_num_blocks=2, thermal_num_heads=4, imu_embed_dim=32, imu_num_blocks=2, imu_num_heads=4,
    point_depth=2, point_num_group=64,
)



def create_model(spec: ModelSpec | str | None = "demo", **changes) -> ImageBindLLM:
    """Build the model ``spec`` describes (a `ModelSpec`, or a named model such as ``"imagebind-llm-7b"``).

    ``changes`` override fields of the spec: ``create_model("imagebind-llm-7b", llm="llama_dir/7B")``.
    Without arguments: the embedded demo (SmolLM2 + an adapter and a small ImageBind trained on synthetic
    scenes by `scripts/demo/build.py --install`; until one is installed, ``"tiny-random"``: the same LLM with a
    random encoder and zero gates).

    Raises:
        ValueError: an unknown named model, or parts that do not fit together (the message says which).
        FileNotFoundError: a path that does not exist and is no registry name.
    """
    if spec is None or isinstance(spec, str):
        spec = ModelSpec(name=spec)
    spec = _apply_named(spec.replace(**changes))
    dtype = DTYPES[spec.dtype]
    ours = _our_folder(spec.adapter)
    official = None if spec.adapter is None or ours is not None else read_adapter_file(fetch(spec.adapter))
    loaded = load_llm(spec.llm, dtype=dtype, device=spec.device, quantized=spec.quantized, quantize=spec.quantize)
    loaded.model.config.max_seq_len = spec.max_seq_len
    torch.manual_seed(spec.seed)
    encoder = _encoder(spec, ours, dtype)
    config = _adapter_config(spec, ours, official, encoder)
    tokenizer = load_tokenizer(spec.tokenizer) if spec.tokenizer is not None else loaded.tokenizer
    model = ImageBindLLM(loaded.model, encoder, config, tokenizer=tokenizer).to(device=spec.device, dtype=dtype)
    if official is not None:
        _warn_if_vanilla_base(loaded.path, official, loaded.model.config)
        try:
            missing = load_adapter_tensors(model, official, layout="official")
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{spec.adapter}: {e}") from None
        if missing:
            logger.info("adapter file lacks %d tensors (kept at init): %s", len(missing), missing[:5])
    elif ours is not None:
        _check_base(ours, loaded.model.config, loaded.path)
        saved_phase = _read_json(ours / CONFIG_FILE)["adapter"]["phase"]  # a stage-1 folder starting stage 2 lacks LoRA
        load_adapter_tensors(model, load_file(str(ours / ADAPTER_FILE)), layout="ours",
                             allow_missing=config.phase != saved_phase)
    return model.eval()


def _apply_named(spec: ModelSpec) -> ModelSpec:
    """Fill the parts the spec leaves unset from its named model; merge a delta base once into the cache."""
    if spec.name is None:
        return spec
    if spec.name not in MODELS:
        raise ValueError(f"unknown model {spec.name!r}; named models: {sorted(MODELS)}")
    named = MODELS[spec.name]
    llm = spec.llm
    if named.base == "llama-7b":
        if llm is None:
            raise ValueError(f"{named.name} is built on Meta's LLaMA-7B, which cannot be downloaded: pass its folder "
                             "(params.json + consolidated.00.pth), e.g. --model llama_dir/7B")
        if named.delta is not None and base_marker(llm) is None:
            llm = _merged_base(Path(llm), named)
    return spec.replace(
        name=None, llm=llm, adapter=spec.adapter if spec.adapter is not None else named.adapter,
        imagebind=spec.imagebind if spec.imagebind is not None else named.imagebind,
        demo_encoder=spec.demo_encoder or named.demo_encoder, phase=spec.phase or named.phase)


def _merged_base(base: Path, named: NamedModel) -> Path:
    """The Open-Chinese-LLaMA base for ``named``: merged from ``base`` and the delta once, then reused."""
    out = default_cache_dir() / "merged" / f"{named.name}-base"
    if not (out / BASE_MARKER).is_file():
        weights, params = (fetch(name) for name in named.delta)
        logger.warning("building %s's base in %s from %s + delta (once)", named.name, out, base)
        merge_delta(base, weights, out, delta_params=params, overwrite=True)  # no marker: an unfinished merge
    return out


def _our_folder(adapter: str | os.PathLike | None) -> Path | None:
    """``adapter`` as our folder format (config.json + adapter.safetensors), or None for an official file."""
    if adapter is None or not Path(adapter).is_dir():
        return None
    path = Path(adapter)
    if not (path / CONFIG_FILE).is_file() or not (path / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{path} is not an imagebind-llm folder ({CONFIG_FILE} + {ADAPTER_FILE}); pass a "
                                "save_pretrained folder or an official adapter .pth")
    saved = _read_json(path / CONFIG_FILE)
    if saved.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(f"{path}: format_version {saved.get('format_version')} is not {FORMAT_VERSION}")
    return path


def _encoder(spec: ModelSpec, ours: Path | None, dtype: torch.dtype) -> nn.Module | None:
    if not spec.with_encoder:
        return None
    saved = _read_json(ours / CONFIG_FILE).get("encoder") if ours is not None else None
    if spec.imagebind is not None:  # the config: given, else the one our folder recorded, else huge
        config = spec.imagebind_config or (ImageBindConfig.from_dict(saved) if saved else None)
        return load_official_encoder(fetch(spec.imagebind), config, dtype=dtype, device=spec.device)
    if spec.demo_encoder or saved:
        if saved:
            logger.warning("no ImageBind weights given: the encoder is randomly initialised")
        config = ImageBindConfig.from_dict(saved) if saved else ImageBindConfig.huge(**DEMO_ENCODER)
        return ImageBind(config).to(device=spec.device, dtype=dtype).eval()
    return None


def _adapter_config(spec: ModelSpec, ours: Path | None, official: Mapping[str, torch.Tensor] | None,
                    encoder: nn.Module | None) -> AdapterConfig:
    if ours is not None:
        saved = AdapterConfig(**_read_json(ours / CONFIG_FILE)["adapter"])
        changes = {k: v for k, v in (("phase", spec.phase), ("lora_layers", spec.lora_layers)) if v is not None}
        return AdapterConfig(**{**saved.to_dict(), **changes})  # stage 2 from a stage-1 folder: its own LoRA
    feature_dim = spec.feature_dim
    if encoder is not None:
        feature_dim = encoder.config.out_embed_dim
    elif feature_dim is None and official is not None and "image_bind_proj.weight" in official:
        feature_dim = official["image_bind_proj.weight"].shape[1]
    return AdapterConfig(feature_dim=feature_dim or AdapterConfig().feature_dim, phase=spec.phase or "finetune",
                         lora_rank=spec.lora_rank, inject_layers=spec.inject_layers, lora_layers=spec.lora_layers,
                         bind_hidden_dim=spec.bind_hidden_dim, bind_blocks=spec.bind_blocks,
                         legacy_bind=is_legacy_bind(official) if official is not None else False)


def _check_base(ours: Path, llm_config: LLMConfig, llm_path: Path) -> None:
    saved = LLMConfig.from_dict(_read_json(ours / CONFIG_FILE)["llm"])
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
        if getattr(saved, field) != getattr(llm_config, field):
            raise CheckpointMismatchError(f"{ours} was trained on a base with {field}={getattr(saved, field)}, "
                                          f"but {llm_path} has {getattr(llm_config, field)}; pass its base")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); restore it or save the folder again") from None


def _warn_if_vanilla_base(llm_path: Path, adapter: Mapping[str, torch.Tensor], llm_config: LLMConfig) -> None:
    stage2 = any("lora" in k for k in adapter)
    llama_7b = LLMConfig.from_name("llama-7b")
    if stage2 and (llm_config.dim, llm_config.n_layers) == (llama_7b.dim, llama_7b.n_layers) \
            and base_marker(llm_path) is None:
        logger.warning(
            "the released 7B.pth was fine-tuned on Open-Chinese-LLaMA-7B; on vanilla LLaMA-7B it answers with "
            "meaningless text. Build the base with `imagebind-llm merge-delta --base llama_dir/7B "
            "--delta 7B_chinese_delta --out llama_dir/7B_chinese` and load that (%s has no %s marker)",
            llm_path, BASE_MARKER)


# -------------------------------------------------------------------- adapter tensors
def load_adapter_tensors(model: ImageBindLLM, tensors: Mapping[str, torch.Tensor], *, layout: str = "official",
                         allow_missing: bool = True) -> list[str]:
    """Copy adapter tensors into ``model``; the one loader of official files, our folders and training starts.

    Args:
        tensors: official names (``layout="official"``, e.g. a ``7B.pth`` state dict) or ours (``"ours"``).
        allow_missing: tensors the file lacks keep their current values (the official loader's rule:
            a stage-1 file leaves the stage-2 LoRA at its init); False: every adapter tensor is required.

    Returns:
        Our names of the adapter tensors the file did not have.

    Raises:
        CheckpointMismatchError: unexpected names, wrong shapes, a legacy/non-legacy bind network
            mismatch, or (``allow_missing=False``) missing tensors.
    """
    if layout == "official":
        if is_legacy_bind(tensors) != model.config.legacy_bind:
            kind = "a legacy (LayerNorm + bias, 7B-beta)" if is_legacy_bind(tensors) else "an RMSNorm (7B)"
            raise CheckpointMismatchError(f"the adapter has {kind} bind network; build the model with "
                                          f"AdapterConfig(legacy_bind={is_legacy_bind(tensors)})")
        tensors = official_to_ours_state(tensors, model.first_injected_layer)
    elif layout != "ours":
        raise ValueError(f"layout must be 'official' or 'ours', got {layout!r}")
    params = dict(model.named_parameters())
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        hint = ""
        if any("lora" in k for k in unexpected):
            hint = (" (a stage-2 file needs phase='finetune')" if model.config.phase == "pretrain" else
                    f" (the file tunes more layers than lora_layers={model.config.lora_layers})")
        raise CheckpointMismatchError(f"unexpected adapter tensors{hint}: {_abbrev(unexpected)}")
    mismatched = [f"{k}: file {tuple(t.shape)} vs model {tuple(params[k].shape)}" for k, t in tensors.items()
                  if tuple(t.shape) != tuple(params[k].shape)]
    if mismatched:
        raise CheckpointMismatchError(f"adapter shapes do not match the model: {_abbrev(mismatched)}")
    missing = sorted(set(model.adapter_params("all")) - set(tensors))
    if missing and not allow_missing:
        raise CheckpointMismatchError(f"the adapter lacks {len(missing)} tensors: {_abbrev(missing)}")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)
    return missing


def _abbrev(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


# -------------------------------------------------------------------- our own folder format
def save_pretrained(model: ImageBindLLM, path: str | Path) -> Path:
    """Write ``config.json`` (adapter, LLM and encoder configs) and ``adapter.safetensors`` (our names).

    The base LLM and the encoder weights are not copied: they are frozen and loaded from their own files.
    Both files are renamed into place together, ``config.json`` last (`imagebind_llm.hub.files.atomic_files`).
    Load it with ``create_model(ModelSpec(adapter=path, llm=..., imagebind=...))``.
    """
    path = make_dir(path)
    with atomic_files(path / ADAPTER_FILE, path / CONFIG_FILE) as (adapter_file, config_file):
        write_pretrained(model, adapter_file, config_file)
    return path


def write_pretrained(model: ImageBindLLM, adapter_file: Path, config_file: Path) -> None:
    """The two files of `save_pretrained`, written to the given (temporary) paths."""
    tensors = {name: p.detach().contiguous().cpu() for name, p in model.adapter_params("all").items()}
    config = {
        "format_version": FORMAT_VERSION,
        "adapter": model.config.to_dict(),
        "llm": model.llm.config.to_dict(),
        "encoder": model.encoder.config.to_dict() if model.encoder is not None else None,
    }
    save_file(tensors, str(adapter_file))
    config_file.write_text(json.dumps(config, indent=2))


def load_pretrained(path: str | Path, llm_path: str | Path | None = None, imagebind: str | Path | None = None, *,
                    dtype: str = "float32", device: str = "cpu") -> ImageBindLLM:
    """A folder written by `save_pretrained` on its base LLM: ``create_model`` with ``adapter=path``."""
    if _our_folder(path) is None:
        raise FileNotFoundError(f"{path} is not an imagebind-llm folder ({CONFIG_FILE} + {ADAPTER_FILE})")
    return create_model(ModelSpec(llm=llm_path, adapter=path, imagebind=imagebind, dtype=dtype, device=device))


# -------------------------------------------------------------------- Open-Chinese-LLaMA delta
def merge_delta(base: str | Path, delta: str | Path, out: str | Path, *, delta_params: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """``out = fp16(base + delta)`` tensor by tensor, as the official ``get_chinese_llama.py`` (rope keys skipped).

    The released ``7B.pth`` adapter needs this base (``7B_chinese`` = LLaMA-7B + Open-Chinese-LLaMA delta).
    ``delta`` is a folder (``consolidated.00.pth`` + ``params.json``) or the weights file itself, with
    ``delta_params`` its ``params.json``. Writes ``consolidated.00.pth``, ``params.json``, the base's
    ``tokenizer.model`` (from ``base`` or its parent, where Meta keeps it) and a marker file to ``out``, renamed
    into place together, the marker last: a folder with the marker is complete.

    Raises:
        FileExistsError: ``out`` already holds one of these files and ``overwrite`` is False.
    """
    base, delta, out = Path(base), Path(delta), Path(out)
    # Meta keeps tokenizer.model beside the size folders (llama_dir/tokenizer.model): the merged base carries a copy.
    tokenizer = next((p for p in (base / "tokenizer.model", base.parent / "tokenizer.model") if p.is_file()), None)
    copies = [out / "tokenizer.model"] if tokenizer else []
    targets = (out / "consolidated.00.pth", out / "params.json", *copies, out / BASE_MARKER)
    refuse_overwrite(*targets, overwrite=overwrite)
    base_files = meta_shards(base)
    delta_files = meta_shards(delta) if delta.is_dir() else [delta]
    if len(base_files) != 1 or len(delta_files) != 1:
        raise ValueError(f"merge_delta expects single-shard 7B folders; got {len(base_files)} and {len(delta_files)}")
    params = next((p for p in (Path(delta_params) if delta_params else None, delta / "params.json",
                               base / "params.json") if p is not None and p.is_file()), None)
    if params is None:
        raise FileNotFoundError(f"no params.json next to {delta_files[0]} or in {base}; pass the delta's params.json")
    original = read_state_dict(base_files[0], what="LLaMA checkpoint", unwrap=False)
    diff = read_state_dict(delta_files[0], what="delta checkpoint", unwrap=False)
    merged = {}
    for key, tensor in original.items():
        if "rope" in key:
            continue
        if key not in diff or diff[key].shape != tensor.shape:
            raise CheckpointMismatchError(f"delta {delta_files[0]} has no tensor {key!r} of shape {tuple(tensor.shape)}")
        merged[key] = (tensor.float() + diff[key].float()).half()
    make_dir(out)
    with atomic_files(*targets) as (weights_file, params_file, *tokenizer_file, marker_file):
        torch.save(merged, weights_file)
        params_file.write_text(params.read_text())
        if tokenizer:
            tokenizer_file[0].write_bytes(tokenizer.read_bytes())
        marker_file.write_text(json.dumps({"base": str(base), "delta": str(delta)}, indent=2))
    return out
