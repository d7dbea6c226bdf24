"""Training configuration: the packaged YAML defaults of a stage, a user YAML on top, ``--set`` on top.

A config is a plain nested dict with the sections ``model``, ``data``, ``optim`` and ``train`` (see
``configs/stage1.yaml``). Every key of a user file or an override must exist in the stage's defaults, so
a typo fails with the list of valid keys instead of being silently ignored.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = (1, 2)


class ConfigError(ValueError):
    """An invalid training configuration (unknown key, bad value or override syntax)."""


def default_config(stage: int) -> dict[str, Any]:
    """The packaged defaults of ``stage`` (1 or 2): the official hyper-parameters."""
    if stage not in STAGES:
        raise ConfigError(f"stage must be 1 or 2, got {stage!r}")
    return yaml.safe_load((CONFIG_DIR / f"stage{stage}.yaml").read_text())


def load_config(stage: int, path: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Defaults of ``stage``, updated by the YAML file ``path`` and then by ``key.sub=value`` overrides.

    Override values are parsed as YAML (``optim.lr=1e-3`` is a float, ``data.train=[a.json,b.json]`` a
    list, ``model.adapter=null`` None).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: unknown keys, a malformed override, or a file for the other stage.
    """
    config = default_config(stage)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training config {path} does not exist")
        user = yaml.safe_load(path.read_text()) or {}
        if not isinstance(user, Mapping):
            raise ConfigError(f"{path} must hold a mapping of sections (model, data, optim, train)")
        if user.get("stage", stage) != stage:
            raise ConfigError(f"{path} is a stage-{user['stage']} config; run `train stage{user['stage']}`")
        _merge(config, user, str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
        _merge(config, _nest(key.strip().split("."), parse_value(value)), f"--set {item}")
    validate(config)
    return config


def parse_value(text: str) -> Any:
    """YAML scalar/list parsing, plus the floats YAML 1.1 leaves as strings (``1e-3``, ``5E4``)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _nest(keys: list[str], value: Any) -> dict[str, Any]:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nest(keys[1:], value)}


def _merge(base: dict[str, Any], update: Mapping[str, Any], where: str, prefix: str = "") -> None:
    for key, value in update.items():
        if key not in base:
            raise ConfigError(f"{where}: unknown config key {prefix + str(key)!r}; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: {prefix + key!r} is a section; set its keys, e.g. {prefix + key}.x=...")
            _merge(base[key], value, where, prefix + key + ".")
        else:
            base[key] = copy.deepcopy(value)


def validate(config: dict[str, Any]) -> None:
    """Check value ranges and choices; raises `ConfigError` naming the key."""
    data, optim, train = config["data"], config["optim"], config["train"]
    if isinstance(data["train"], str):
        data["train"] = [data["train"]]
    choices = {("data", "text_only"): ("no_injection", "zero_image"), ("train", "precision"): ("bf16", "fp32"),
               ("train", "distributed"): ("ddp", "fsdp"), ("train", "device"): ("auto", "cpu", "cuda")}
    for (section, key), allowed in choices.items():
        if config[section][key] not in allowed:
            raise ConfigError(f"{section}.{key}={config[section][key]!r}; choose one of {allowed}")
    positive = {("train", "batch_size"), ("train", "epochs"), ("optim", "accum_iter"), ("data", "max_words"),
                ("train", "save_every"), ("train", "log_every")}
    for section, key in positive:
        if not isinstance(config[section][key], (int, float)) or config[section][key] <= 0:
            raise ConfigError(f"{section}.{key} must be a positive number, got {config[section][key]!r}")
    if not isinstance(train["epochs"], int):
        raise ConfigError(f"train.epochs must be a whole number of passes, got {train['epochs']!r}")
    if optim["warmup_epochs"] < 0 or optim["warmup_epochs"] > train["epochs"]:
        raise ConfigError(f"optim.warmup_epochs={optim['warmup_epochs']} must be in "
                          f"[0, train.epochs={train['epochs']}]")
    if len(optim["betas"]) != 2:
        raise ConfigError(f"optim.betas must be two numbers, got {optim['betas']!r}")
    if train["max_steps"] is not None and train["max_steps"] < 0:
        raise ConfigError(f"train.max_steps must be >= 0 or null, got {train['max_steps']!r}")
