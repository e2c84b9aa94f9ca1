"""Several processes on one job (``torchrun --nproc-per-node N train.py|scan.py ...``): ranks, devices, barriers."""
from __future__ import annotations

import os
from datetime import timedelta

import torch

from megnet_pt.cache.workers import cpu_cores
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


def cpu_processes(requested: str, pending_splits: int, cores: int | None = None) -> tuple[int, int]:
    """(processes, threads each) for training on a CPU: ``auto`` is one single-thread process per core, at most
    one per split (on 2 cores, 2 x 1 thread trains 1.5x faster than 1 x 2: docs/performance.md); a number is that."""
    cores = cores or cpu_cores()
    if requested == "auto":
        n = max(1, min(cores, pending_splits))
    else:
        n = int(requested)
    return n, max(1, cores // n)


def spawn(script: str, argv: list[str], processes: int, threads: int) -> int:
    """Run ``script argv`` as ``processes`` ranks of one job on this machine, as torchrun would; 0, or the exit code
    of the first rank that failed.

    Every rank gets ``threads`` threads (OMP_NUM_THREADS). Ctrl-C stops them all;
    each has saved its last finished epoch, and the same command resumes.
    """
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(processes),
                LOCAL_WORLD_SIZE=str(processes), OMP_NUM_THREADS=str(threads))
    children = [subprocess.Popen([sys.executable, script, *argv], env=base | {"RANK": str(r), "LOCAL_RANK": str(r)})
                for r in range(processes)]
    failed = 0  # the exit code of the first rank that failed (not of those stopped because of it)
    try:
        while True:
            codes = [child.poll() for child in children]
            if not failed and any(c not in (None, 0) for c in codes):  # the others would wait for it at a barrier
                failed = next(c for c in codes if c not in (None, 0))
                for child, c in zip(children, codes):
                    if c is None:
                        child.terminate()  # what each saved (state files are written whole) stays
            if all(c is not None for c in codes):
                return failed
            time.sleep(0.2)
    except KeyboardInterrupt:  # the children got the Ctrl-C too, and stop after saving
        for child in children:
            child.wait()
        return 130
