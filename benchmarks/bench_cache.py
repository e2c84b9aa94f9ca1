"""Benchmark: the HDF5 graph cache against building graphs from CIFs.

    PARAISITE_HOME=../shared python benchmarks/bench_cache.py [--repeat 10] [--batch-size 64]

Prints (1) the build rate with 1 and 2 worker processes on the AFLOW set,
(2) bytes per structure, (3) read rates, graphs/s and batches/s, for a cache
held in memory and one streamed from disk, (4) the time to get one batch from
the cache against building the same batch from its CIFs, and (5) peak memory
while streaming a cache of ``repeat`` x 3269 structures (AFLOW ids repeated
with suffixes, built through the ordinary build path), measured in a fresh
process. Figures on a shared machine are noisy: compare the ratios.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from torch_geometric.data import Batch

from common import load_average, repeated_dataset
from paraisite.data import paths
from megnet_pt.cache import GraphCache, build_cache
from megnet_pt.graph import structure_to_graph
from megnet_pt.structures import read_structure

# Run in a fresh process so that its peak memory is the streaming alone.
STREAM_PROBE = r"""
import sys, time
from pathlib import Path
from megnet_pt.cache import GraphCache

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0

path, in_memory, block_bytes, batch_size = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
try:
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
except OSError:
    pass
base = status("VmRSS:")
t = time.perf_counter()
cache = GraphCache(path, in_memory=in_memory, block_bytes=block_bytes)
n = graphs = 0
for batch in cache.iter_batches(batch_size, shuffle=True, seed=0):
    n += 1
    graphs += batch.num_graphs
seconds = time.perf_counter() - t
print(n, graphs, seconds, base, status("VmHWM:"))
"""



def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the build's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_build(inputs: list[Path], out: Path, workers: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one build."""
    t, cpu = time.perf_counter(), cpu_seconds()
    report = build_cache(inputs, out, workers=workers, progress=False)
    seconds = time.perf_counter() - t
    assert not report.failures, report.failures[:3]
    return seconds, cpu_seconds() - cpu



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of AFLOW in the streaming cache (default 10: 32,690)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="batches for the cache-vs-CIF comparison")
    parser.add_argument("--no-large", action="store_true", help="skip the large streaming cache (the slow part)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write caches (default: a temporary folder)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    folder = paths.data_dir("aflow_agl")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, folder, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work)
    print(f"\nload average at the end: {load_average()}")


def run(args: argparse.Namespace, folder: Path, work: Path) -> None:
    ids = [r["id"] for r in csv.DictReader(open(folder / "labels.csv", newline=""))]
    print(f"AFLOW: {len(ids)} structures from {folder}; {os.cpu_count()} cores, load average {load_average()}")

    # 1. Build rate.
    print("\nbuild (CIF -> graph -> HDF5, cutoff 4 Å)")
    small = work / "aflow.h5"
    for workers in (1, 2):
        seconds, cpu = timed_build([folder], small, workers)
        print(f"  {workers} worker{'s' if workers > 1 else ' '}  {len(ids) / seconds:8.1f} structures/s ({seconds:.1f} s; "
              f"{cpu / len(ids) * 1e3:.2f} CPU ms per structure, all processes)")
    size = small.stat().st_size
    whole = GraphCache(small)
    print(f"  file          {size / 1e6:.2f} MB, {size / len(whole):.0f} bytes per structure "
          f"({whole.nbytes / len(whole):.0f} uncompressed)")

    # 2. Read rates.
    print(f"\nread ({len(whole)} structures, batch size {args.batch_size})")
    streamed = GraphCache(small, in_memory=False)
    rng = np.random.default_rng(0)
    for name, cache in (("in memory", whole), ("streamed ", streamed)):
        picks = rng.integers(0, len(cache), 3000)
        t = time.perf_counter()
        for i in picks:
            cache[int(i)]
        graphs_rate = len(picks) / (time.perf_counter() - t)
        t = time.perf_counter()
        n = sum(1 for _ in cache.iter_batches(args.batch_size, shuffle=True, seed=0))
        batches_rate = n / (time.perf_counter() - t)
        random_batches = [rng.integers(0, len(cache), args.batch_size) for _ in range(100)]
        t = time.perf_counter()
        for b in random_batches:
            cache.batch(b)
        random_rate = len(random_batches) / (time.perf_counter() - t)
        print(f"  {name}  cache[i]: {graphs_rate:8.0f} graphs/s   iter_batches: {batches_rate:7.0f} batches/s "
              f"({batches_rate * args.batch_size:8.0f} graphs/s)   batch(random ids): {random_rate:6.0f} batches/s")
    data_list = [whole[int(i)] for i in rng.integers(0, len(whole), args.batch_size)]
    t = time.perf_counter()
    for _ in range(50):
        Batch.from_data_list(data_list)
    print(f"  for scale: Batch.from_data_list of {args.batch_size} ready Data objects: {50 / (time.perf_counter() - t):.0f} batches/s")

    # 3. One batch: from the cache vs from CIFs.
    batches = [rng.choice(len(ids), args.batch_size, replace=False) for _ in range(args.batches)]
    t = time.perf_counter()
    for b in batches:
        Batch.from_data_list([structure_to_graph(read_structure(folder / "cif" / f"{ids[i]}.cif"), id=ids[i]) for i in b])
    from_cif = (time.perf_counter() - t) / len(batches)
    t = time.perf_counter()
    for b in batches:
        whole.batch(b)
    from_memory = (time.perf_counter() - t) / len(batches)
    cold = GraphCache(small, in_memory=False)
    t = time.perf_counter()
    for b in batches:
        cold.batch(b)
    from_disk = (time.perf_counter() - t) / len(batches)
    print(f"\none batch of {args.batch_size} random structures")
    print(f"  from CIFs (parse, neighbours, collate)  {from_cif * 1e3:8.2f} ms")
    print(f"  from the cache, in memory               {from_memory * 1e3:8.2f} ms   ({from_cif / from_memory:.0f}x faster)")
    print(f"  from the cache, read from disk          {from_disk * 1e3:8.2f} ms   ({from_cif / from_disk:.0f}x faster)")

    if args.no_large:
        return
    # 4. A large cache, streamed with bounded memory.
    big_folder = repeated_dataset(folder, work, args.repeat)
    big = work / f"aflow_x{args.repeat}.h5"
    n_big = len(ids) * args.repeat
    seconds, _ = timed_build([big_folder], big, workers=2)
    print(f"\nlarge cache: {n_big} structures, built with 2 workers at {n_big / seconds:.1f} structures/s ({seconds:.0f} s); "
          f"{big.stat().st_size / 1e6:.1f} MB, {big.stat().st_size / n_big:.0f} bytes per structure; "
          f"{GraphCache(big, in_memory=False).nbytes / 1e6:.0f} MB of arrays uncompressed")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for label, in_memory, block in (("streamed, 8 MB blocks ", 0, 8 << 20), ("streamed, 64 MB blocks", 0, 64 << 20),
                                    ("loaded whole          ", 1, 64 << 20)):
        out = subprocess.run([sys.executable, "-c", STREAM_PROBE, str(big), str(in_memory), str(block), str(args.batch_size)],
                             env=env, capture_output=True, text=True, check=True).stdout.split()
        n, graphs, secs, base, peak = int(out[0]), int(out[1]), float(out[2]), int(out[3]), int(out[4])
        print(f"  {label}  {graphs} graphs in {n} shuffled batches, {n / secs:6.0f} batches/s "
              f"({graphs / secs:7.0f} graphs/s incl. opening); peak memory {(peak - base) / 2**20:6.1f} MiB above the "
              f"{base / 2**20:.0f} MiB of a process that has imported torch")


if __name__ == "__main__":
    main()
