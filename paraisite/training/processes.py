"""Several processes on one job (``torchrun --nproc-per-node N train.py|scan.py ...``): ranks, devices, barriers,
and the launcher ``train.py`` uses on a CPU, whose processes stop together."""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta

import torch

from megnet_pt.cache.workers import cpu_cores
from megnet_pt.interrupt import Interrupted, die_with_parent, stop_on_signals  # noqa: F401 (train.py imports them here)
from megnet_pt.predict import resolve_device

SPAWNED = "PARAISITE_SPAWNED"  # set in the processes spawn() starts


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def barrier(world: int) -> None:
    """Wait for every process of the job; a clear error, not gloo's, when one of them stopped first."""
    if world > 1:
        try:
            torch.distributed.barrier()
        except RuntimeError as exc:  # gloo raises a plain RuntimeError ("Connection closed by peer")
            rank = os.environ.get("RANK", "?")
            raise RuntimeError(f"process {int(rank) + 1 if rank.isdigit() else rank} of {world}: another process of "
                               "this job stopped before it got here; its error, above, says why") from exc


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


def spawned() -> bool:
    """True in a process started by :func:`spawn` (its launcher speaks for it)."""
    return os.environ.get(SPAWNED) == "1"


def resume_command(argv: list[str]) -> str:
    return shlex.join(["python", os.path.basename(sys.argv[0]) or "train.py", *argv])


def spawn(script: str, argv: list[str], processes: int, threads: int) -> int:
    """Run ``script argv`` as ``processes`` ranks of one job on this machine, as torchrun would; 0, or the exit code
    of the first rank that failed.

    Every rank gets ``threads`` threads (OMP_NUM_THREADS). The ranks stop together: when one fails the others are
    stopped; a SIGINT, SIGTERM or SIGHUP to this process is passed to every rank, which saves nothing more than
    its last finished epoch (state files are written whole), and then raises :class:`Interrupted` here; and if
    this process dies unannounced (SIGKILL) the kernel stops them (:func:`die_with_parent`).
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(processes),
                LOCAL_WORLD_SIZE=str(processes), OMP_NUM_THREADS=str(threads), **{SPAWNED: "1"})
    children: list[subprocess.Popen] = []
    try:
        with stop_on_signals():
            for r in range(processes):
                children.append(subprocess.Popen([sys.executable, script, *argv], preexec_fn=die_with_parent,
                                                 env=base | {"RANK": str(r), "LOCAL_RANK": str(r)}))
            return _wait(children)
    except Interrupted:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # a Ctrl-C reached them already; SIGTERM is the same to them
        for child in children:
            child.wait()
        raise


def _wait(children: list[subprocess.Popen]) -> int:
    failed = 0  # the exit code of the first rank that failed (not of those stopped because of it)
    while True:
        codes = [child.poll() for child in children]
        if not failed and any(c not in (None, 0) for c in codes):  # the others would wait for it at a barrier
            rank, failed = next((r, c) for r, c in enumerate(codes) if c not in (None, 0))
            if failed < 0:  # killed by a signal: it could say nothing itself
                print(f"error: process {rank + 1} of {len(children)} was killed ({signal.Signals(-failed).name}); "
                      "the others are stopped, every finished epoch is kept: run the same command to resume",
                      file=sys.stderr)
                failed = 128 - failed
            for child, c in zip(children, codes):
                if c is None:
                    child.terminate()  # what each saved (state files are written whole) stays
        if all(c is not None for c in codes):
            return failed
        time.sleep(0.2)
