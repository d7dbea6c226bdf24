"""Training configuration: typed sections, the packaged YAML defaults, a user YAML on top, ``--set`` on top.

A `TrainConfig` has the sections ``model``, ``data``, ``optim`` and ``train`` (the dataclasses below
name every key and its type). Defaults live only in YAML: ``configs/base.yaml`` holds what both stages
share, ``configs/stage1.yaml`` / ``stage2.yaml`` only what differs. Every key of a user file or an
override must be a field of its section, so a typo fails with the list of valid keys instead of being
silently ignored; `validate` checks types and ranges in one place, naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imagebind_llm.cache.blend import BlendOptions

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = (1, 2)


class ConfigError(ValueError):
    """An invalid training configuration (unknown key, bad value or override syntax)."""


@dataclass
class ModelSection:
    """Where the model comes from (see `imagebind_llm.model.ModelSpec`) and the optional cache blend."""

    llm: str | None
    tokenizer: str | None
    imagebind: str | None
    imagebind_config: str | None
    adapter: str | None
    max_seq_len: int
    lora_rank: int
    inject_layers: int | None
    cache: str | None
    cache_top_k: int | None
    cache_temperature: float | None
    cache_weight: float | None

    def blend_options(self) -> BlendOptions:
        """The cache blend settings; unset fields fall back to the cache's stored defaults."""
        return BlendOptions(top_k=self.cache_top_k, temperature=self.cache_temperature, weight=self.cache_weight)


@dataclass
class DataSection:
    """Training files and how samples are built (`imagebind_llm.train.data`)."""

    train: list[str]
    image_root: str | None
    max_words: int
    prompt: str
    features: str | None
    text_only: str
    num_workers: int


@dataclass
class OptimSection:
    """AdamW and the warm-up + half-cosine schedule."""

    lr: float | None
    blr: float
    min_lr: float
    weight_decay: float
    betas: list[float]
    eps: float
    warmup_epochs: float
    clip_grad: float | None
    accum_iter: int


@dataclass
class TrainSection:
    """Length, devices, precision, outputs and logging of the run."""

    epochs: int
    batch_size: int
    max_steps: int | None
    seed: int
    device: str
    precision: str
    activation_checkpointing: bool
    distributed: str
    output_dir: str
    save_every: int
    log_every: int
    progress: bool
    tensorboard: bool


@dataclass
class TrainConfig:
    """A complete, validated training configuration (build it with `load_config`)."""

    stage: int
    model: ModelSection
    data: DataSection
    optim: OptimSection
    train: TrainSection

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """From nested mappings with every key of every section."""
        sections = {}
        for name, section in SECTIONS.items():
            values = raw.get(name, {})
            missing = [f.name for f in dataclasses.fields(section) if f.name not in values]
            if missing:
                raise ConfigError(f"no value for {', '.join(f'{name}.{k}' for k in missing)}")
            sections[name] = section(**values)
        return cls(stage=raw.get("stage"), **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
                             "train": TrainSection}


# -------------------------------------------------------------------- loading
def default_config(stage: int) -> TrainConfig:
    """The packaged defaults of ``stage`` (1 or 2): the official hyper-parameters."""
    return load_config(stage)


def load_config(stage: int, path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Defaults of ``stage``, updated by the YAML file ``path`` and then by ``section.key=value`` overrides.

    Override values are parsed as YAML (``optim.lr=1e-3`` is a float, ``data.train=[a.json,b.json]`` a
    list, ``model.adapter=null`` None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown keys, a bad value (naming its key), a malformed override, or a file for
            the other stage.
    """
    if stage not in STAGES:
        raise ConfigError(f"stage must be 1 or 2, got {stage!r}")
    raw: dict[str, Any] = {}
    for packaged in (CONFIG_DIR / "base.yaml", CONFIG_DIR / f"stage{stage}.yaml"):
        _merge(raw, yaml.safe_load(packaged.read_text()), str(packaged))
    if path is not None:
        _merge(raw, _read_user_file(Path(path), stage), str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
        _merge(raw, _nest(key.strip().split("."), _parse_yaml(value, f"--set {item}")), f"--set {item}")
    if raw["stage"] != stage:
        raise ConfigError(f"stage is {raw['stage']!r} in a stage-{stage} run")
    return TrainConfig.from_dict(raw)


def _read_user_file(path: Path, stage: int) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    user = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(user, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections (model, data, optim, train)")
    if user.get("stage", stage) != stage:
        raise ConfigError(f"{path} is a stage-{user['stage']} config; run `train stage{user['stage']}`")
    return user


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML; a syntax error is a one-line `ConfigError` naming ``where`` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e}{at})") from None


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nest(keys[1:], value)}


def _merge(raw: dict[str, Any], update: Mapping[str, Any], where: str) -> None:
    """Copy ``update`` into ``raw``, refusing keys that are not fields of their section."""
    for name, values in update.items():
        if name == "stage":
            raw["stage"] = values
            continue
        if name not in SECTIONS:
            raise ConfigError(f"{where}: unknown config key {name!r}; valid keys here: {['stage', *SECTIONS]}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: {name!r} is a section; set its keys, e.g. {name}.x=...")
        valid = [f.name for f in dataclasses.fields(SECTIONS[name])]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"{where}: unknown config key {f'{name}.{key}'!r}; valid keys here: {sorted(valid)}")
            raw.setdefault(name, {})[key] = copy.deepcopy(value)


# -------------------------------------------------------------------- validation
_CHOICES = {"data.text_only": ("no_injection", "zero_image"), "train.precision": ("bf16", "fp32"),
            "train.distributed": ("ddp", "fsdp"), "train.device": ("auto", "cpu", "cuda")}
_POSITIVE = ("model.max_seq_len", "model.lora_rank", "model.inject_layers", "data.max_words", "optim.lr",
             "optim.blr", "optim.eps", "optim.clip_grad", "optim.accum_iter", "train.epochs", "train.batch_size",
             "train.max_steps", "train.save_every", "train.log_every")
_NON_NEGATIVE = ("data.num_workers", "optim.min_lr", "optim.weight_decay", "optim.warmup_epochs")


def validate(config: TrainConfig) -> None:
    """Coerce every value to its field's type, then check choices and ranges; the one check of a config.

    Raises:
        ConfigError: naming the key and the expected value.
    """
    if config.stage not in STAGES:
        raise ConfigError(f"stage must be 1 or 2, got {config.stage!r}")
    for name in SECTIONS:
        section = getattr(config, name)
        for key, hint in typing.get_type_hints(type(section)).items():
            setattr(section, key, _coerce(getattr(section, key), hint, f"{name}.{key}"))
    _check_ranges(config)
    _check_cache(config.model)


def _check_ranges(config: TrainConfig) -> None:
    for key, allowed in _CHOICES.items():
        if _get(config, key) not in allowed:
            raise ConfigError(f"{key}={_get(config, key)!r}; choose one of {allowed}")
    for key in _POSITIVE:
        if _get(config, key) is not None and _get(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_get(config, key)!r}")
    for key in _NON_NEGATIVE:
        if _get(config, key) is not None and _get(config, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {_get(config, key)!r}")
    optim = config.optim
    if optim.warmup_epochs > config.train.epochs:
        raise ConfigError(f"optim.warmup_epochs={optim.warmup_epochs} must be in "
                          f"[0, train.epochs={config.train.epochs}]")
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {optim.betas!r}")


def _check_cache(model: ModelSection) -> None:
    blend = {"top_k": model.cache_top_k, "temperature": model.cache_temperature, "weight": model.cache_weight}
    for field, value in blend.items():
        if value is not None and model.cache is None:
            raise ConfigError(f"model.cache_{field} is set but model.cache (a cache folder) is not")
        try:
            BlendOptions(**{field: value})
        except ValueError as e:
            raise ConfigError(f"model.cache_{field}: {e}") from None


def _get(config: TrainConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


_KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}
_KINDS_PLURAL = {bool: "true/false values", int: "whole numbers", float: "finite numbers", str: "strings"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` (``X``, ``X | None`` or ``list[X]``); raises `ConfigError` naming ``key``."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{key} must be a list of {_KINDS_PLURAL[item]}, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(items)]
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and not isinstance(value, bool):
        number = _as_float(value)
        if number is not None and math.isfinite(number):
            return number
    if hint is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    nullable = " or null" if type(None) in args else ""
    raise ConfigError(f"{key} must be {_KINDS[hint]}{nullable}, got {value!r}")


def _as_float(value: Any) -> float | None:
    """A number, or a string YAML 1.1 leaves unparsed (``1e-3``, ``5E4``); None otherwise."""
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None
