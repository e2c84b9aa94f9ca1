"""Benchmark: training seconds per epoch at batch 8, one split at a time vs the nine splits together.

    python benchmarks/bench_train.py [--datasets togo15,aflow_agl] [--threads 1] [--steps 30] [--rounds 3]

For each dataset and device (the CPU, and CUDA when available) it times

(a) the sequential path, ``paraisite.training.steps.PlainStep`` (collate, forward,
    MAPE, backward, fused Adam), split after split;
(b) the ensemble path, ``paraisite.training.steps.StackedStep`` on the M splits'
    batches padded and stacked, one vmapped step for all;
(c) on CUDA, the same stepper replaying each step as a CUDA graph (what
    ``--ensemble`` runs there), batches padded to a few fixed shapes;

on the same batches (the first ``--steps`` of each split's epoch-1 shuffle),
alternating (a) and (b) for ``--rounds`` rounds, plus one validation pass and
one resume-state save per round. A split-epoch is then

    sequential:  steps/epoch * t_step + t_val + t_save          (per split)
    ensemble:   (steps/epoch * t_step + t_val + t_save) / M     (per split, (b) or (c))

printed in wall seconds and, on the CPU, in process CPU seconds (less
sensitive to other jobs on a shared machine; equal to wall time on an idle
one when a single thread is used), and the projected time of the whole AFLOW
stage (9 splits x 300 epochs). Peers (matgl 4, upstream's matgl 1.2.1 + DGL)
are timed side by side in one run by ``bench_peers.py``. Medians over rounds; compare ratios, not absolute figures, on a
shared machine. Saving best.pt (only when validation improves) and writing
curve.csv are left out of both.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from megnet_pt.checkpoint import atomic_save
from paraisite.data.datasets import load_dataset
from paraisite.training.steps import PlainStep, StackedStep
from paraisite.training.loop import TrainConfig, epoch_generator, initial_model
from paraisite.transform import TargetTransform

STAGE_EPOCHS = 300


class Clock:
    """Wall and process CPU seconds of a block (synchronising CUDA first)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Clock":
        self._sync()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def bench(name: str, device: torch.device, args: argparse.Namespace, tmp: Path) -> None:
    data = load_dataset(name)
    config = TrainConfig(init=args.init, dataset=name, batch_size=args.batch_size)
    splits = list(range(1, args.splits + 1))
    M, B = len(splits), args.batch_size
    parts = [data.split(k) for k in splits]
    n_train = len(parts[0][0])
    per_epoch = -(-n_train // B)
    steps = min(args.steps or per_epoch, per_epoch)
    orders = [t[torch.randperm(n_train, generator=epoch_generator(config.seed, k, 1)).numpy()]
              for k, (t, _) in zip(splits, parts)]
    batches = [[o[i * B : (i + 1) * B] for o in orders] for i in range(steps)]  # [step][split]
    transforms = [TargetTransform.fit(data.ltc[t]) for t, _ in parts]
    vals = [v for _, v in parts]

    def stepper(stacked: bool, ks: list[int], cuda_graphs: bool = False) -> PlainStep | StackedStep:
        models = [initial_model(config, k) for k in ks]
        ts = [transforms[splits.index(k)] for k in ks]
        if stacked:
            return StackedStep(models, ts, data, device, config.lr, batch_size=B, cuda_graphs=cuda_graphs)
        return PlainStep(models, ts, data, device, config.lr)

    def save(step: PlainStep | StackedStep, path: Path) -> None:
        members, groups = step.state()
        atomic_save({"members": members, "param_groups": groups}, path)

    # (a) one stepper per split; (b) the M splits as one stacked stepper; (c) the same, as CUDA graphs
    plain = [stepper(False, [k]) for k in splits]
    together = stepper(True, splits)
    graphed = device.type == "cuda"
    replayed = stepper(True, splits, cuda_graphs=True) if graphed else None

    def seq_steps(todo: list[list[np.ndarray]]) -> None:
        for m, step in enumerate(plain):
            for batch in todo:
                step.step([batch[m]]).tolist()

    def seq_val() -> None:
        for step, v in zip(plain, vals):
            step.losses([v])

    def ens_steps(todo: list[list[np.ndarray]], step: StackedStep | None = None) -> None:
        for batch in todo:
            (step or together).step(batch)

    seq_steps(batches[:2])  # warm-up
    ens_steps(batches[:2])
    keys = ("seq", "seq_val", "seq_save", "ens", "ens_val", "ens_save", "graph")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    timed = [("seq", lambda: seq_steps(batches)), ("seq_val", seq_val), ("seq_save", lambda: save(plain[0], tmp / "a.pt")),
             ("ens", lambda: ens_steps(batches)), ("ens_val", lambda: together.losses(vals)),
             ("ens_save", lambda: save(together, tmp / "b.pt"))]
    if graphed:
        ens_steps(batches, replayed)  # records a graph for every shape the timed steps need
        timed.append(("graph", lambda: ens_steps(batches, replayed)))
    for _ in range(args.rounds):
        for key, fn in timed:
            with Clock(device) as c:
                fn()
            times[key].append((c.wall, c.cpu))

    def med(key: str, i: int) -> float:
        return statistics.median(t[i] for t in times[key])

    load = os.getloadavg()[0]
    label = f"{name} [{device.type}{f', {torch.get_num_threads()} thread(s)' if device.type == 'cpu' else ''}]"
    print(f"\n{label}: {M} splits, {n_train} training / {len(parts[0][1])} validation structures per split, "
          f"{per_epoch} steps per epoch ({steps} timed), {args.rounds} rounds; load average now {load:.1f}")
    clocks = [(0, "wall")] + ([(1, "CPU")] if device.type == "cpu" else [])
    for i, clock in clocks:
        seq = per_epoch * med("seq", i) / (M * steps) + (med("seq_val", i) / M) + med("seq_save", i)
        ens = (per_epoch * med("ens", i) / steps + med("ens_val", i) + med("ens_save", i)) / M
        print(f"  {clock:4s} s per split-epoch: sequential {seq:7.3f}, ensemble of {M} {ens:7.3f}; "
              f"ensemble speed-up {seq / ens:4.2f}x")
        graph = None
        if graphed:
            graph = (per_epoch * med("graph", i) / steps + med("ens_val", i) + med("ens_save", i)) / M
            print(f"       CUDA graph ensemble of {M} {graph:7.3f}; speed-up {ens / graph:4.2f}x over the eager ensemble")
        if name == "aflow_agl":
            stage = 9 * STAGE_EPOCHS
            print(f"       whole AFLOW stage (9 splits x {STAGE_EPOCHS} epochs): "
                  f"sequential {seq * stage / 3600:5.2f} h, ensemble {ens * stage / 3600:5.2f} h "
                  f"({ens * stage / 60:.0f} min)" + (f", CUDA graph {graph * stage / 60:.1f} min" if graph else ""))
    step_ms = {k: 1e3 * med(k, 0) for k in ("seq", "ens") + (("graph",) if graphed else ())}
    print(f"  per step (wall): sequential {step_ms['seq'] / (M * steps):.1f} ms per split, "
          f"ensemble {step_ms['ens'] / steps:.1f} ms for {M} splits"
          + (f" ({step_ms['graph'] / steps:.1f} ms as a CUDA graph)" if graphed else "") + "; validation: sequential "
          f"{med('seq_val', 0) / M:.3f} s per split, ensemble {med('ens_val', 0):.3f} s for {M}; resume state: "
          f"sequential {med('seq_save', 0):.3f} s per split, ensemble {med('ens_save', 0):.3f} s for {M}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", default="togo15,aflow_agl")
    parser.add_argument("--devices", default=None, help="comma-separated (default: cpu, and cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--splits", type=int, default=9, help="splits trained together (and one by one)")
    parser.add_argument("--steps", type=int, default=30,
                        help="training steps timed per round, at most one epoch (0: one epoch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--init", default="rw", help="rw or fe (timings do not depend on the weights)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU(s), {torch.get_num_threads()} thread(s)"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
          + f"; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets.split(","):
            for device in devices:
                bench(name, torch.device(device), args, Path(tmp))


if __name__ == "__main__":
    main()
