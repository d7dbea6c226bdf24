"""Training ImageBind-LLM: the two official stages, on one CPU up to many GPUs (``torchrun``); and binding
an encoder tower to ImageBind's space (``train bind``, `recipes.bind`).

Entry points: ``imagebind-llm train stage1|stage2|bind --config FILE [--set key=value ...] [--resume DIR]``,
or from Python::

    from imagebind_llm.train import bind, load_config, stage1
    result = stage1.run(load_config(1, "my_stage1.yaml", ["optim.lr=1e-3"]))
    result = bind.run(load_config("bind", "my_bind.yaml"))

Pieces: `config` (the typed `TrainConfig`: YAML defaults + user YAML + overrides), `data` (formats,
tokenization, batching order), `optim` (AdamW groups), `schedule` (warm-up + half-cosine), `loop` (the
step, the model and cache blend of a config, the loop), `checkpoint` (atomic resumable checkpoints,
exports), `distributed` (DDP / FSDP2), `logging` (progress and JSONL). Pre-extracted image features
(``data.features``) are the shard store of `imagebind_llm.cache.shards`. `train bind` adds `pairs` (paired
data) and `contrastive` (symmetric InfoNCE over the global batch, recall@k).
"""

from imagebind_llm.train.config import BindConfig, ConfigError, TrainConfig, default_config, load_config
from imagebind_llm.train.recipes import bind, stage1, stage2

__all__ = ["BindConfig", "ConfigError", "TrainConfig", "default_config", "load_config", "bind", "stage1", "stage2"]
