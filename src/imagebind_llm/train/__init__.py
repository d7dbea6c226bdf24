"""Training ImageBind-LLM: the two official stages, on one CPU up to many GPUs (``torchrun``).

Entry points: ``imagebind-llm train stage1|stage2 --config FILE [--set key=value ...] [--resume DIR]``,
or from Python::

    from imagebind_llm.train import load_config, stage1
    result = stage1.run(load_config(1, "my_stage1.yaml", ["optim.lr=1e-3"]))

Pieces: `config` (YAML + overrides), `data` (formats, tokenization, batching order), `features`
(frozen-encoder feature store), `optim` (AdamW groups), `schedule` (warm-up + half-cosine), `loop`
(the step and the loop), `checkpoint` (atomic resumable checkpoints, exports), `distributed`
(DDP / FSDP2), `logging` (progress and JSONL).
"""

from imagebind_llm.train.config import ConfigError, default_config, load_config
from imagebind_llm.train.recipes import stage1, stage2

__all__ = ["ConfigError", "default_config", "load_config", "stage1", "stage2"]
