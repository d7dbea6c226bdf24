"""Training configuration: typed sections, the packaged YAML defaults, a user YAML on top, ``--set`` on top.

A `TrainConfig` (the stages) has the sections ``model``, ``data``, ``optim`` and ``train``; a `BindConfig`
(``train bind``, contrastive encoder training) has ``bind``, ``data`` (paired data), and the same
``optim`` and ``train`` (the dataclasses below name every key and its type). Defaults live only in YAML:
``configs/base.yaml`` holds what both stages share, ``configs/stage1.yaml`` / ``stage2.yaml`` only what
differs, ``configs/bind.yaml`` the bind recipe's. Every key of a user file or an override must be a field
of its section, so a typo fails with the list of valid keys instead of being silently ignored; `validate`
checks types and ranges in one place, naming the key.
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
from typing import Any, ClassVar, Self

import yaml

from imagebind_llm.cache.blend import BlendOptions
from imagebind_llm.encoders import MODALITIES, ImageBindConfig

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = (1, 2)
BIND = "bind"
PACKAGED = {1: ("base.yaml", "stage1.yaml"), 2: ("base.yaml", "stage2.yaml"), BIND: ("bind.yaml",)}
BIND_MODES = ("scratch", "full", "lora", "joint")


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
    lora_layers: int | None
    bind_hidden_dim: int | None
    bind_blocks: int
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
class BindSection:
    """What `train bind` binds to what: the towers, how they train, the contrastive temperature."""

    anchor: str | None
    modalities: list[str]
    mode: str
    imagebind: str | None
    imagebind_config: str | None
    tower: dict[str, Any]
    lora_rank: int
    temperature: float
    learn_temperature: bool
    anchor_features: str | None


@dataclass
class PairDataSection:
    """Paired training and held-out data of `train bind` (`imagebind_llm.train.pairs`)."""

    train: list[str]
    eval: list[str]
    generator: str | None
    generator_train: int
    generator_eval: int
    eval_every: int
    eval_batch_size: int
    num_workers: int
    group_size: int = 1


class _Sections:
    """From/to nested mappings over the config's ``SECTIONS``; validated on construction."""

    SECTIONS: ClassVar[dict[str, type]]

    def __post_init__(self) -> None:
        validate(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Self:
        """From nested mappings with every key of every section."""
        sections = {}
        for name, section in cls.SECTIONS.items():
            values = raw.get(name, {})
            missing = [f.name for f in dataclasses.fields(section) if f.name not in values]
            if missing:
                raise ConfigError(f"no value for {', '.join(f'{name}.{k}' for k in missing)}")
            sections[name] = section(**values)
        return cls(stage=raw.get("stage"), **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(_Sections):
    """A complete, validated configuration of stage 1 or 2 (build it with `load_config`)."""

    SECTIONS: ClassVar[dict[str, type]] = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
                                           "train": TrainSection}
    stage: int
    model: ModelSection
    data: DataSection
    optim: OptimSection
    train: TrainSection


@dataclass
class BindConfig(_Sections):
    """A complete, validated configuration of `train bind` (build it with ``load_config("bind", ...)``)."""

    SECTIONS: ClassVar[dict[str, type]] = {"bind": BindSection, "data": PairDataSection, "optim": OptimSection,
                                           "train": TrainSection}
    stage: str
    bind: BindSection
    data: PairDataSection
    optim: OptimSection
    train: TrainSection


# -------------------------------------------------------------------- loading
def default_config(stage: int | str) -> TrainConfig | BindConfig:
    """The packaged defaults of ``stage`` (1, 2: the official hyper-parameters; ``"bind"``)."""
    return load_config(stage)


def load_config(stage: int | str, path: str | Path | None = None, overrides: Sequence[str] = ()
                ) -> TrainConfig | BindConfig:
    """Defaults of ``stage`` (1, 2 or ``"bind"``), updated by the YAML file ``path`` and then by
    ``section.key=value`` overrides; a `BindConfig` for ``"bind"``, else a `TrainConfig`.

    Override values are parsed as YAML (``optim.lr=1e-3`` is a float, ``data.train=[a.json,b.json]`` a
    list, ``model.adapter=null`` None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown keys, a bad value (naming its key), a malformed override, or a file for
            another recipe.
    """
    if stage not in PACKAGED:
        raise ConfigError(f"stage must be 1, 2 or {BIND!r}, got {stage!r}")
    cls = BindConfig if stage == BIND else TrainConfig
    raw: dict[str, Any] = {}
    for packaged in (CONFIG_DIR / name for name in PACKAGED[stage]):
        _merge(raw, yaml.safe_load(packaged.read_text()), str(packaged), cls.SECTIONS)
    if path is not None:
        _merge(raw, _read_user_file(Path(path), stage, cls.SECTIONS), str(path), cls.SECTIONS)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
        _merge(raw, _nest(key.strip().split("."), _parse_yaml(value, f"--set {item}")), f"--set {item}",
               cls.SECTIONS)
    if raw["stage"] != stage:
        raise ConfigError(f"stage is {raw['stage']!r} in a {_kind(stage)} run")
    return cls.from_dict(raw)


def _kind(stage: int | str) -> str:
    return BIND if stage == BIND else f"stage-{stage}"


def _command(stage: int | str) -> str:
    return f"train {BIND}" if stage == BIND else f"train stage{stage}"


def _read_user_file(path: Path, stage: int | str, sections: Mapping[str, type]) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist")
    user = _parse_yaml(path.read_text(), str(path)) or {}
    if not isinstance(user, Mapping):
        raise ConfigError(f"{path} must hold a mapping of sections ({', '.join(sections)})")
    if user.get("stage", stage) != stage:
        raise ConfigError(f"{path} is a {_kind(user['stage'])} config; run `{_command(user['stage'])}`")
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


def _merge(raw: dict[str, Any], update: Mapping[str, Any], where: str, sections: Mapping[str, type]) -> None:
    """Copy ``update`` into ``raw``, refusing keys that are not fields of their section."""
    for name, values in update.items():
        if name == "stage":
            raw["stage"] = values
            continue
        if name not in sections:
            raise ConfigError(f"{where}: unknown config key {name!r}; valid keys here: {['stage', *sections]}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{where}: {name!r} is a section; set its keys, e.g. {name}.x=...")
        valid = [f.name for f in dataclasses.fields(sections[name])]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(f"{where}: unknown config key {f'{name}.{key}'!r}; valid keys here: {sorted(valid)}")
            raw.setdefault(name, {})[key] = copy.deepcopy(value)


# -------------------------------------------------------------------- validation
# Keys a config lacks (the stages have no ``bind`` section, `train bind` no ``model``) are skipped.
_CHOICES = {"data.text_only": ("no_injection", "zero_image"), "train.precision": ("bf16", "fp32"),
            "train.distributed": ("ddp", "fsdp"), "train.device": ("auto", "cpu", "cuda"), "bind.mode": BIND_MODES}
_POSITIVE = ("model.max_seq_len", "model.lora_rank", "model.inject_layers", "model.lora_layers", "model.bind_hidden_dim",
             "model.bind_blocks", "data.max_words", "optim.lr", "optim.blr", "optim.eps", "optim.clip_grad",
             "optim.accum_iter", "train.epochs", "train.batch_size", "train.max_steps", "train.save_every",
             "train.log_every", "bind.lora_rank", "bind.temperature", "data.generator_train", "data.eval_every",
             "data.eval_batch_size", "data.group_size")
_NON_NEGATIVE = ("data.num_workers", "optim.min_lr", "optim.weight_decay", "optim.warmup_epochs",
                 "data.generator_eval")


def validate(config: TrainConfig | BindConfig) -> None:
    """Coerce every value to its field's type, then check choices and ranges; the one check of a config.

    Raises:
        ConfigError: naming the key and the expected value.
    """
    expected = (BIND,) if isinstance(config, BindConfig) else STAGES
    if config.stage not in expected:
        raise ConfigError(f"stage must be one of {expected}, got {config.stage!r}")
    for name in config.SECTIONS:
        section = getattr(config, name)
        for key, hint in typing.get_type_hints(type(section)).items():
            setattr(section, key, _coerce(getattr(section, key), hint, f"{name}.{key}"))
    _check_ranges(config)
    if isinstance(config, BindConfig):
        _check_bind(config)
    else:
        _check_cache(config.model)


def _check_ranges(config: TrainConfig | BindConfig) -> None:
    for key, allowed in _CHOICES.items():
        if _has(config, key) and _get(config, key) not in allowed:
            raise ConfigError(f"{key}={_get(config, key)!r}; choose one of {allowed}")
    for key in _POSITIVE:
        if _has(config, key) and _get(config, key) is not None and _get(config, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {_get(config, key)!r}")
    for key in _NON_NEGATIVE:
        if _has(config, key) and _get(config, key) is not None and _get(config, key) < 0:
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


def _check_bind(config: BindConfig) -> None:
    bind, data = config.bind, config.data
    for i, name in enumerate(bind.modalities + [bind.anchor] * (bind.anchor is not None)):
        if name not in MODALITIES:
            key = "bind.anchor" if i == len(bind.modalities) else f"bind.modalities[{i}]"
            raise ConfigError(f"{key}={name!r}; choose one of {MODALITIES}")
    if len(set(bind.modalities)) != len(bind.modalities) or not bind.modalities:
        raise ConfigError(f"bind.modalities must name the trained towers once each, got {bind.modalities}")
    if bind.mode == "joint" and (bind.anchor is not None or len(bind.modalities) != 2):
        raise ConfigError("bind.mode=joint trains two towers against each other: set bind.anchor=null and two "
                          f"bind.modalities (got anchor {bind.anchor!r}, modalities {bind.modalities})")
    if bind.mode != "joint" and (bind.anchor is None or bind.anchor in bind.modalities):
        raise ConfigError(f"bind.mode={bind.mode} trains bind.modalities against a frozen bind.anchor tower of "
                          f"another modality (got anchor {bind.anchor!r}, modalities {bind.modalities})")
    if bind.mode in ("full", "lora") and bind.imagebind is None:
        raise ConfigError(f"bind.mode={bind.mode} tunes pretrained towers: set bind.imagebind to an ImageBind "
                          "checkpoint (or train new towers with bind.mode=scratch)")
    unknown = sorted(set(bind.tower) - {f.name for f in dataclasses.fields(ImageBindConfig)})
    if unknown:
        raise ConfigError(f"bind.tower: unknown ImageBindConfig fields {unknown}")
    if bool(data.train) == bool(data.generator):
        raise ConfigError("set exactly one of data.train (paired manifests) and data.generator (module:function), "
                          f"got data.train={data.train!r}, data.generator={data.generator!r}")
    if bind.anchor_features is not None and (data.generator or bind.mode == "joint"):
        raise ConfigError("bind.anchor_features caches the anchor side of manifest data; it needs bind.anchor and "
                          "data.train (not data.generator)")
    if config.train.batch_size % data.group_size:
        raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of data.group_size="
                          f"{data.group_size}, so that each group of rows shares a batch")
    if config.optim.accum_iter != 1:
        raise ConfigError("train bind needs optim.accum_iter=1: accumulated micro-batches would not see each "
                          "other's negatives; raise train.batch_size or the number of processes instead")
    if config.train.distributed != "ddp" or config.train.activation_checkpointing:
        raise ConfigError("train bind runs with train.distributed=ddp (the towers are replicated, not sharded) and "
                          "without train.activation_checkpointing")


def _has(config: TrainConfig | BindConfig, key: str) -> bool:
    section, name = key.split(".")
    return hasattr(getattr(config, section, None), name)


def _get(config: TrainConfig | BindConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


_KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string",
          dict: "a mapping"}
_KINDS_PLURAL = {bool: "true/false values", int: "whole numbers", float: "finite numbers", str: "strings"}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as the type ``hint`` (``X``, ``X | None`` or ``list[X]``); raises `ConfigError` naming ``key``."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key} must be a mapping of names to values, got {value!r}")
        return dict(value)
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
