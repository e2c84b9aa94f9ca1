"""Several processes on one job (``torchrun --nproc-per-node N train.py|scan.py ...``): ranks, devices, barriers."""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from megnet_pt.predict import resolve_device


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def process_device(name: str, world: int, local_rank: int) -> torch.device:
    """The device of this process: ``name`` (auto, cpu, cuda), and under torchrun on GPUs its own GPU."""
    device = resolve_device(name)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)  # kernels, streams and CUDA graphs of this process go to its own GPU
    return device
