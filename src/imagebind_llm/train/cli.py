"""``imagebind-llm train stage1|stage2|bind|extract-features``: argparse wiring for the training recipes.

The main CLI calls `add_train_subcommands(subparsers)`; each leaf parser sets ``func`` (parsed arguments
-> exit code). Launch multi-GPU / multi-node runs with ``torchrun ... -m imagebind_llm train stage1 ...``.
"""

from __future__ import annotations

import argparse
import json
import logging

import yaml

from imagebind_llm.cache.cli import add_shard_args
from imagebind_llm.cache.shards import extract_image_features
from imagebind_llm.train import distributed
from imagebind_llm.train.config import BIND, load_config
from imagebind_llm.train.data import image_sources, read_examples
from imagebind_llm.train.recipes import bind, stage1, stage2

RECIPES = {"stage1": (1, stage1, "image-text alignment: bind network, prefix and gates"),
           "stage2": (2, stage2, "instruction tuning: LoRA, biases and norms"),
           "bind": (BIND, bind, "bind a modality's encoder tower to ImageBind's space (contrastive)")}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file over the recipe's defaults (configs/base.yaml + stageN.yaml, or "
                   "configs/bind.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set optim.lr=1e-3 --set data.train=[a.tsv,b.tar]")


def add_train_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``train`` with ``stage1``, ``stage2``, ``bind`` and ``extract-features`` to a CLI."""
    train = subparsers.add_parser("train", help="train ImageBind-LLM (stage 1 alignment, stage 2 instruction "
                                  "tuning) or bind an encoder tower")
    sub = train.add_subparsers(dest="train_command", required=True)
    for name, (stage, _, summary) in RECIPES.items():
        title = "Bind" if stage == BIND else f"Stage {stage}"
        p = sub.add_parser(name, help=summary, description=f"{title}: {summary}. Every config value can be "
                           "overridden with --set; run under torchrun for several processes.")
        _add_config_args(p)
        p.add_argument("--resume", metavar="DIR", help="continue from a run folder (its latest checkpoint) or a "
                       "checkpoints/step-*.pt file")
        p.add_argument("--overwrite", action="store_true", help="start a new run in a train.output_dir that holds "
                       "another run: its checkpoints are removed, its exports stay until the new run's replace them")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=_run_stage, stage=stage, recipe=name)
    e = sub.add_parser("extract-features", help="`cache extract` for the images of a stage-1 config",
                       description="`imagebind-llm cache extract` with its inputs taken from a stage-1 config: the "
                       "images of data.train (image_root applied, in example order), encoded with model.imagebind "
                       "and model.imagebind_config into --out; then train stage 1 with --set data.features=OUT. "
                       "Re-running resumes; under torchrun each process encodes its share of the shards.")
    _add_config_args(e)
    e.add_argument("--out", required=True, help="feature store folder")
    e.add_argument("--device", default="cpu", help="torch device of the encoder, e.g. cuda")
    add_shard_args(e)
    e.set_defaults(func=_extract)
    return train


def _run_stage(args: argparse.Namespace) -> int:
    config = load_config(args.stage, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    for handler in logging.getLogger().handlers:
        handler.addFilter(distributed.RankZeroFilter())
    try:
        result = RECIPES[args.recipe][1].run(config, resume=args.resume, overwrite=args.overwrite)
    finally:
        distributed.teardown()
    if distributed.is_main():
        print(json.dumps(result.summary(), indent=2))
    return 0


def _extract(args: argparse.Namespace) -> int:
    config = load_config(1, args.config, args.overrides)
    sources = image_sources(read_examples(config.data.train, config.data.image_root))
    done = extract_image_features(sources, args.out, imagebind=config.model.imagebind,
                                  config=config.model.imagebind_config, device=args.device,
                                  shard_size=args.shard_size, batch_size=args.batch_size,
                                  progress=not args.no_progress, skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(json.dumps({"images": len(sources), "shards_encoded": done, "out": args.out}))
    return 0
