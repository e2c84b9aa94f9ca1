"""Benchmark: graph building and MEGNet prediction rates on the AFLOW structures.

    python benchmarks/bench_predict.py [--limit N] [--batch-size 256]

Prints structures/s for (1) CIF -> graph, (2) prediction one structure at a
time (what upstream's screening does), (3)
batched prediction, on the CPU and on CUDA when available, and (4) both end to
end, from CIF files to formation energies. Figures on a shared machine are
noisy: compare the ratios (the load average is printed).
"""
from __future__ import annotations

import argparse
import csv
import os
import time

import torch
from torch_geometric.data import Batch

from megnet_pt import load_pretrained, structure_to_graph
from paraisite.data import paths
from megnet_pt.structures import read_structure


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.1f} structures/s ({n} in {seconds:.2f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="use only the first N AFLOW structures")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--single", type=int, default=500, help="structures for the one-at-a-time timing")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    folder = paths.data_dir("aflow_agl")
    ids = [r["id"] for r in csv.DictReader(open(folder / "labels.csv"))][: args.limit]
    print(f"{len(ids)} AFLOW structures from {folder}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    t = time.perf_counter()
    structures = [read_structure(folder / "cif" / f"{i}.cif") for i in ids]
    t_read = time.perf_counter() - t
    t = time.perf_counter()
    graphs = [structure_to_graph(s, id=i) for s, i in zip(structures, ids)]
    t_graph = time.perf_counter() - t
    print(f"read CIF          {rate(len(ids), t_read)}")
    print(f"structure->graph  {rate(len(ids), t_graph)}")
    print(f"CIF->graph total  {rate(len(ids), t_read + t_graph)}")

    model = load_pretrained(published_dir=paths.weights_dir("MEGNet-MP-2018.6.1-Eform"))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        m = model.to(device)
        single = graphs[: args.single]
        with torch.no_grad():
            m(Batch.from_data_list(single[:8]).to(device))  # warm-up
            t = time.perf_counter()
            for g in single:
                m(Batch.from_data_list([g]).to(device)).prediction.cpu()
            t_single = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(0, len(graphs), args.batch_size):
                m(Batch.from_data_list(graphs[i : i + args.batch_size]).to(device)).prediction.cpu()
            t_batch = time.perf_counter() - t
        r_single, r_batch = len(single) / t_single, len(graphs) / t_batch
        print(f"[{device.type}] one at a time    {rate(len(single), t_single)}")
        print(f"[{device.type}] batched ({args.batch_size:4d})  {rate(len(graphs), t_batch)}")
        print(f"[{device.type}] batched / one-at-a-time = {r_batch / r_single:.1f}x (in this run)")
        # End to end, CIF file -> formation energy: the graph is built either way.
        per_graph = (t_read + t_graph) / len(ids)
        e2e_single = 1 / (per_graph + t_single / len(single))
        e2e_batch = len(graphs) / (t_read + t_graph + t_batch)
        print(f"[{device.type}] end to end from CIFs: one at a time {e2e_single:7.1f} structures/s, "
              f"batched {e2e_batch:7.1f} structures/s")


if __name__ == "__main__":
    main()
