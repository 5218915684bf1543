"""The built-in loop under torch.distributed (torchrun): shard the data, wrap in DDP, keep every
rank's method state identical, write files from rank 0 only.

Semantics: each rank trains on its shard of the training set (DistributedSampler), with the
train_loader's batch size per rank, so the global batch is ``world_size x batch_size``; DDP
averages gradients, so the run matches one process with that global batch (BatchNorm still
normalizes per rank, as under any DDP, unless you convert the model to SyncBatchNorm).
Method decisions (masks) are computed from identical weights on every rank and, as a safety
net, rank 0's buffers (where masks live) are broadcast after every method step.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from graphprune.errors import TrainingError


def active() -> bool:
    """True when this process is one rank of an initialized process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): nccl on
    CUDA, gloo otherwise. For the command line; scripts call init_process_group themselves."""
    import os

    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return active()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shard_loader(loader: object) -> DataLoader:
    """The same DataLoader with a DistributedSampler in place of its sampler (shuffled iff the
    original was, seeded identically on every rank); a loader already sharded is kept."""
    if not isinstance(loader, DataLoader):
        raise TrainingError(
            f"under torch.distributed the built-in loop shards train_loader with a "
            f"DistributedSampler, which needs a torch DataLoader, not a {type(loader).__name__}: "
            "pass DataLoader(dataset, batch_size=..., shuffle=...) or shard it yourself"
        )
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise TrainingError(
            "under torch.distributed an IterableDataset cannot be sharded by graphprune: make "
            "it yield each rank's share itself (torch.distributed.get_rank()) and pass a "
            "DataLoader whose sampler is a DistributedSampler, or use a map-style dataset"
        )
    custom_batches = type(loader.batch_sampler) is not BatchSampler
    if custom_batches or not isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        raise TrainingError(
            f"under torch.distributed graphprune cannot shard a DataLoader with a custom "
            f"{type(loader.sampler).__name__}/{type(loader.batch_sampler).__name__}: give it a "
            "DistributedSampler yourself, or use shuffle=True/False"
        )
    gen = loader.generator
    sampler = DistributedSampler(
        loader.dataset,
        num_replicas=world_size(),
        rank=rank(),
        shuffle=isinstance(loader.sampler, RandomSampler),
        seed=gen.initial_seed() if gen is not None else 0,
        drop_last=loader.drop_last,
    )
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=gen,
        persistent_workers=loader.persistent_workers,
        **extra,
    )


def set_epoch(loader: object, epoch: int) -> None:
    """DistributedSampler reshuffles per epoch only when told the epoch."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


def wrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around ``model`` (on its device). Buffers are synchronized by
    ``sync_buffers`` after each step, not by DDP before each forward."""
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=ids, **{no_sync: False})


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (masks, norm statistics): one broadcast per dtype and
    device, not one per buffer."""
    if not active():
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_kind.setdefault((b.dtype, b.device), []).append(b)
    for buffers in by_kind.values():
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def gather(obj: object) -> list[object]:
    """``obj`` (plain Python values, no tensors) from every rank, in rank order."""
    if not active():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def from_main(obj: object) -> object:
    """Rank 0's ``obj`` (plain Python values, no tensors) on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
