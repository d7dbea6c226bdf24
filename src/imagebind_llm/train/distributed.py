"""Process-group setup for ``torchrun`` (single node or many), model wrapping and rank-zero helpers.

Without ``WORLD_SIZE`` > 1 in the environment everything degrades to a single process: no process group,
no wrapper, collectives become identities. Under ``torchrun`` the backend is NCCL on CUDA and gloo on CPU.

Two wrapping strategies:

* ``ddp``: `DistributedDataParallel` over the training module (frozen weights replicated, as official);
* ``fsdp``: FSDP2 ``fully_shard`` on groups of decoder modules and then on the root, so the frozen base
  is sharded across processes instead of replicated; gradients of the trainable weights are
  reduce-scattered and the optimizer works on the shards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str = "auto") -> torch.device:
    """Join the ``torchrun`` process group when launched by it; returns this process's device.

    Args:
        device: ``auto`` (CUDA when available), ``cuda`` or ``cpu``.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.info("joined process group: rank %d of %d", rank(), world_size())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def teardown() -> None:
    """Leave the process group (call it in a ``finally``). After a success the ranks first meet at a barrier:
    a rank that destroyed the group while a peer still used it died with "terminate called without an active
    exception"; after a failure no barrier, as the other ranks may never get there."""
    if is_distributed():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all processes (for logging)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world_size()


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(module: nn.Module, strategy: str, device: torch.device, *,
         blocks: Sequence[nn.Module | list[nn.Module]] | None = None,
         replicated: nn.Module | None = None, find_unused_parameters: bool = False,
         param_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap the training module for data parallelism (identity in a single process).

    Args:
        strategy: ``ddp`` or ``fsdp``.
        blocks: the submodules (or lists of submodules forming one group) ``fsdp`` shards one by one before
            the root; each is gathered only around its own forward/backward.
        replicated: a frozen submodule ``fsdp`` leaves whole on every process (the ImageBind encoder).
        find_unused_parameters: DDP option, needed when some batches leave trainable weights unused.
        param_dtype: FSDP all-gather dtype (e.g. bf16) when training under bf16.
    """
    if not is_distributed():
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused_parameters)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in blocks or []:
            fully_shard(block, mp_policy=policy)
        ignored = set(replicated.parameters()) if replicated is not None else None
        return fully_shard(module, mp_policy=policy, ignored_params=ignored)
    raise ValueError(f"unknown distributed strategy {strategy!r}; use ddp or fsdp")


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Within the block, FSDP2-sharded parameters are gathered in full on every process (collective)."""
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in sharded:
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()


class RankZeroFilter(logging.Filter):
    """Drops log records on every process but rank 0 (install on handlers in launch scripts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return is_main()
