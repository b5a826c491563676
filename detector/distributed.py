"""torch.distributed under torchrun: process group, device, DDP wrapping and gathering.

Run any training entry point under ``torchrun --nproc_per_node N`` (or multi-node torchrun);
without torchrun's environment everything here is a no-op and training runs in one process.
Backends: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes (once) and return this process's device."""
    if not launched_by_torchrun():
        return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A rank that dies makes the others fail in their next collective instead of hanging
        # forever; torchrun then stops the whole job.
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world()[0] == 0


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = False) -> nn.Module:
    """DistributedDataParallel around the model when running distributed; the model itself
    otherwise. SyncBatchNorm needs CUDA (its CPU path is not implemented in PyTorch)."""
    if not dist.is_initialized():
        return model
    if sync_batchnorm:
        if device.type != "cuda":
            raise ValueError(
                "train.sync_batchnorm needs CUDA devices (nccl); PyTorch has no CPU SyncBatchNorm"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average over the processes the gradients of parameters outside the DDP-wrapped model
    (fit's extra parameters: distillation's adapters), so that every process takes the same
    step and their copies stay equal; a no-op in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:  # every process must join every all_reduce
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= dist.get_world_size()


def average_value(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the processes (one all_reduce on ``device``, where the
    backend can reach it); ``value`` itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def gather_to_main(value: object) -> list[object] | None:
    """Every rank's ``value`` on rank 0 (a list in rank order), None on the other ranks; the
    value itself in a list outside torch.distributed."""
    if not dist.is_initialized():
        return [value]
    rank, size = world()
    gathered = [None] * size if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def gather_to_all(value: object) -> list[object]:
    """Every rank's ``value`` on every rank (a list in rank order); ``[value]`` outside
    torch.distributed."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: object) -> object:
    """Rank 0's ``value`` on every rank."""
    if not dist.is_initialized():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def run_on_main(work: Callable[[], T]) -> T:
    """``work()`` on rank 0 only, its result on every rank; an error it raises is raised on
    every rank, so that the others stop with rank 0's message instead of waiting for it in
    their next collective. Also a barrier: no rank goes on before rank 0 has finished. Outside
    torch.distributed it is ``work()``."""
    if not dist.is_initialized():
        return work()
    if dist.get_rank() != 0:
        ok, value = broadcast_from_main(None)
        if not ok:
            raise value
        return value
    try:
        value = work()
    except Exception as error:
        broadcast_from_main((False, _sendable(error)))
        raise
    broadcast_from_main((True, value))
    return value


def _sendable(error: Exception) -> Exception:
    """``error`` when it survives pickling (to reach the other ranks), else a RuntimeError
    with its message."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # an exception holding an open file, a lock, a lambda
        return RuntimeError(f"rank 0: {type(error).__name__}: {error}")
    return error


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
