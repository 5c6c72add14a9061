"""Data-parallel runs with torchrun, through Avalanche's DistributedHelper.

    torchrun --nproc_per_node N -m avl_peft run study.yaml --out runs/study

Every process runs the same study. Avalanche's data loaders shard each experience's data across the
processes (DistributedSampler); :class:`GradientAverage` averages the trainable parameters' gradients
before every optimizer step — what DDP does, but without wrapping the model, so adapters can still be
injected and merged between experiences. The per-process batch is ``batch_size / N``: the global batch,
learning rate and schedule are those of the single-process run. Evaluation is sharded too and the
accuracy counts are summed across processes. Only rank 0 writes the output folder; the others write to a
throw-away folder. gloo on CPU, nccl on GPU.

How close to a single-process run: identical up to floating-point summation order when every batch
splits evenly across processes and the sample order does not matter (full-batch steps); otherwise the
DistributedSampler's shuffling and its padding of uneven shards change which samples meet in a batch,
so results agree statistically, not bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from avalanche.core import SupervisedPlugin
from avalanche.distributed import DistributedHelper


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init_from_env(seed: int, device: str) -> bool:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1). True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return world_size() > 1
    use_cuda = device != "cpu" and torch.cuda.is_available()
    DistributedHelper.init_distributed(random_seed=seed, backend="nccl" if use_cuda else "gloo", use_cuda=use_cuda)
    return True


def all_reduce_sum(values: list[float]) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GradientAverage(SupervisedPlugin, supports_distributed=True):
    """Average gradients of the trainable parameters over all processes before each optimizer step."""

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        # A single process shuffles with RandomSampler, which draws one int64 seed from the global torch
        # RNG per epoch; DistributedSampler draws none. Draw it here too so later random initialisations
        # (a growing classifier head) are the single-process ones.
        if world_size() > 1:
            torch.empty((), dtype=torch.int64).random_()

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        n = world_size()
        if n == 1:
            return
        params = [p for _, p in sorted(strategy.model.named_parameters()) if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective per step, fixed order by name
        dist.all_reduce(flat)
        flat /= n
        offset = 0
        for p, g in zip(params, grads):
            size = g.numel()
            p.grad = flat[offset : offset + size].view_as(p).clone()
            offset += size
