"""Benchmark: this project's MEGNet against its peers, side by side on one machine, in one run, one thread each.

    python benchmarks/bench_peers.py [--matgl4 PYTHON] [--upstream PYTHON] [--before DIR] [--rounds 3] [--train-epoch]

Each peer runs ``benchmarks/peer_worker.py`` in its own virtual environment,
named by the interpreter of that environment (or $MATGL4_PYTHON, $UPSTREAM_PYTHON):

    matgl4    matgl 4.1.2, its PyG MEGNet (light):
              python -m venv matgl4 && matgl4/bin/pip install torch==2.13.0 matgl==4.1.2
    upstream  upstream ParAIsite's stack, matgl 1.2.1 + DGL 2.1 on torch 2.2 (about 5 GB):
              python -m venv upstream && upstream/bin/pip install torch==2.2.0 dgl==2.1.0 matgl==1.2.1 "numpy<2" "pymatgen<2025"

A peer not given is left out; the project needs neither. ``--before DIR``
adds this project at another commit (a ``git worktree`` folder, timed by its own peer_worker.py), for a
before/after in the same run. Every round runs
each implementation in turn (ours, then the peers) on the same AFLOW
structures and batches: graph building from parsed structures, batched
inference, and the training step at batch 8 (``peer_worker.py`` says what
each does). Medians over rounds are printed with the ratios ours (with ``--fast-step``:
ours with the fast step) / peer taken round by round (above 1: ours is faster; median and range). A split-epoch is projected as steps x step time
(2615 training structures, 327 steps); ``--train-epoch`` also times a real
``train.py`` AFLOW epoch of ours (validation and saving included).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paraisite.data.datasets import dataset_folder, read_labels  # noqa: E402
from paraisite.data.splits import split_indices  # noqa: E402
from paraisite.training.loop import epoch_generator  # noqa: E402

BATCH = 8


def work_file(tmp: Path, n: int, steps: int, warmup: int) -> tuple[Path, int]:
    """The structures and batches every implementation gets; and the steps of a split-epoch."""
    folder = dataset_folder("aflow_agl")
    ids, _, ltc = read_labels(folder / "labels.csv")
    train, _ = split_indices(len(ids), 1)
    order = train[torch.randperm(len(train), generator=epoch_generator(42, 1, 1)).numpy()][:n]
    rng = np.random.default_rng(0)
    batches = [rng.choice(n, BATCH, replace=False).tolist() for _ in range(warmup + steps)]
    work = {"cifs": [str(folder / "cif" / f"{ids[i]}.cif") for i in order], "labels": [float(ltc[i]) for i in order],
            "n_graphs": n, "n_infer": n, "batches": batches, "warmup": warmup}
    path = tmp / "work.json"
    path.write_text(json.dumps(work))
    return path, -(-len(train) // BATCH)


def run_worker(python: str, impl: str, work: Path, tree: Path = ROOT) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if impl.startswith("ours"):
        env["PYTHONPATH"] = str(tree)
    worker = (tree if impl.startswith("ours") else ROOT) / "benchmarks" / "peer_worker.py"  # ours at a commit: its own worker
    proc = subprocess.run([python, str(worker), impl, str(work)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{python} ({impl}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def train_epoch_seconds(tmp: Path) -> float:
    """One real AFLOW epoch of train.py (split 1, validation and saving included), from its curve.csv."""
    run = tmp / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--init", "rw", "--dataset", "aflow_agl", "--epochs", "2",
                    "--splits", "1,", "--processes", "1", "--no-progress", "--run-dir", str(run)], cwd=tmp, env=env,
                   check=True, capture_output=True)
    rows = list(csv.DictReader(open(run / "split1" / "curve.csv")))
    return float(rows[-1]["seconds"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matgl4", default=os.environ.get("MATGL4_PYTHON"), help="python of a venv with matgl 4 (PyG)")
    p.add_argument("--upstream", default=os.environ.get("UPSTREAM_PYTHON"), help="python of a venv with matgl 1.2.1 + DGL")
    p.add_argument("--before", type=Path, default=None, help="this project at another commit (a worktree), timed too")
    p.add_argument("--fast-step", action="store_true", help="also time ours with the fast step (megnet_pt.fast)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--structures", type=int, default=1024, help="AFLOW structures in the work (default %(default)s)")
    p.add_argument("--steps", type=int, default=60, help="timed training steps per round (default %(default)s)")
    p.add_argument("--train-epoch", action="store_true", help="also time a real train.py AFLOW epoch of ours")
    args = p.parse_args()
    impls = [("ours", sys.executable, "ours", ROOT)]
    if args.fast_step:
        impls.append(("fast", sys.executable, "ours-fast", ROOT))
    if args.before:
        impls.append(("before", sys.executable, "ours", args.before.resolve()))
    impls += [(label, py, "matgl", ROOT) for label, py in (("matgl4", args.matgl4), ("upstream", args.upstream)) if py]
    with tempfile.TemporaryDirectory() as tmp:
        work, steps_per_epoch = work_file(Path(tmp), args.structures, args.steps, warmup=10)
        results: dict[str, list[dict]] = {label: [] for label, _, _, _ in impls}
        epochs = []
        for r in range(args.rounds):
            for label, python, impl, tree in impls:
                results[label].append(run_worker(python, impl, work, tree))
                print(f"round {r + 1}: {label}: {results[label][-1]}", file=sys.stderr)
            if args.train_epoch:
                epochs.append(train_epoch_seconds(Path(tmp)))
    median = {label: {k: statistics.median(x[k] for x in rows) for k in ("graphs_per_s", "infer_per_s", "step_ms")}
              for label, rows in results.items()}
    base = "fast" if args.fast_step else "ours"  # the ratios are of this row against each other
    print(f"\nOne thread each, {args.rounds} rounds (medians), batch {BATCH}, {args.structures} AFLOW structures; "
          f"split-epoch = {steps_per_epoch} steps x step\n")
    print("| implementation | graphs from structures (structures/s) | inference, batch 256 (structures/s) "
          f"| training step (ms) | AFLOW split-epoch, projected (s) | {results[base][0]['name']} faster by "
          "(graphs / inference / step) |")
    print("|---|---|---|---|---|---|")
    def paired(label: str, key: str) -> str:
        """base / other round by round (the rounds ran back to back), median and range: steadier than the medians' ratio."""
        r = [(a[key] / b[key]) if key != "step_ms" else (b[key] / a[key]) for a, b in zip(results[base], results[label])]
        return f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"

    for label, _, _, tree in impls:
        m, name = median[label], results[label][0]["name"] + (f" at {tree}" if label == "before" else "")
        ratios = "" if label == base else " / ".join(paired(label, k) for k in ("graphs_per_s", "infer_per_s", "step_ms"))
        print(f"| {name} | {m['graphs_per_s']:.0f} | {m['infer_per_s']:.0f} | {m['step_ms']:.1f} | "
              f"{steps_per_epoch * m['step_ms'] / 1000:.1f} | {ratios} |")
    if epochs:
        print(f"\ntrain.py AFLOW epoch of ours (validation and saving included): {statistics.median(epochs):.1f} s "
              f"(rounds: {', '.join(f'{e:.1f}' for e in epochs)})")


if __name__ == "__main__":
    main()
