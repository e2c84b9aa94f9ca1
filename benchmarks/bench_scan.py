"""Benchmark: screening a 30k-structure graph cache with 1 and 9 ParAIsite models.

    PARAISITE_HOME=../shared python benchmarks/bench_scan.py [--repeat 10] [--workdir DIR] [--quick 3000] [--fast]

Builds (or reuses, in ``--workdir``) a graph cache of the AFLOW set repeated
``repeat`` times (ids suffixed ``__r<k>``; 10 x 3269 = 32,690 structures,
through the ordinary build path), makes nine random ParAIsite models saved as
a run folder, and times ``paraisite.screening.scan.run_scan``, the path of
``scan.py``: streaming the cache from disk, the fused nine-model pass,
warnings, descriptors and writing the CSV. Each configuration runs in a fresh
process, so that its peak memory (``ru_maxrss``) is its own; resident memory
is also sampled while it runs, to show that it stays flat. Configurations:
1 and 9 models on the CPU (and on CUDA when there is a GPU), plus, for scale,
each model's own forward one structure at a time (what the original tool
does, minus building the graph), with ``--fast`` ``scan.py --method fast``, and (``--torchrun N``) the whole
``scan.py`` command shared by N processes of one thread each, end to end.

Ratios are to the one-structure-at-a-time forward measured in the same run
(what upstream's scan_mdp.py does, minus building the graph); the peers
themselves are timed by ``bench_peers.py``. Figures on a shared machine are
noisy; compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import load_average, repeated_dataset  # noqa: E402


def rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc/self/statm."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kB on Linux



def ensure_bench_cache(work: Path, repeat: int, workers: int) -> Path:
    from paraisite.data import paths
    from megnet_pt.cache import GraphCache, build_cache

    path = work / f"aflow_x{repeat}_cutoff4.h5"
    if path.is_file():
        try:
            cache = GraphCache(path, in_memory=False)
            n = len(cache)
            cache.close()
            print(f"reusing {path} ({n} structures)")
            return path
        except Exception as exc:
            print(f"{path}: {exc}; building it again")
    folder = paths.data_dir("aflow_agl")
    if not (folder / "labels.csv").is_file():
        sys.exit(f"{folder}: no AFLOW dataset (set PARAISITE_HOME, e.g. PARAISITE_HOME=../shared)")
    t = time.perf_counter()
    report = build_cache([repeated_dataset(folder, work, repeat)], path, workers=workers, progress=True)
    print(f"built {path}: {report.structures} structures in {time.perf_counter() - t:.0f} s with {workers} worker(s)")
    return path


def make_run(run: Path, n_models: int) -> Path:
    """``n_models`` random ParAIsite checkpoints laid out as train.py writes them."""
    import torch

    from paraisite.checkpoint import save_model
    from paraisite.model import ParAIsite
    from paraisite.transform import TargetTransform

    for k in range(1, n_models + 1):
        if not (run / f"split{k}" / "final.pt").is_file():
            torch.manual_seed(k)
            model = ParAIsite()
            for selection in ("best", "final"):  # final.pt marks a finished split
                save_model(model, TargetTransform(0.8, 0.5), run / f"split{k}" / f"{selection}.pt", init="rw",
                           dataset="aflow_agl", split=k, epoch=0, selection=selection)
    return run


# --- one configuration, in its own process -------------------------------------------------------

def measure(args: argparse.Namespace) -> dict:
    """Time ``run_scan`` on the cache (or its first ``--quick`` structures); memory sampled meanwhile."""
    import numpy as np
    import torch

    from megnet_pt.cache import GraphCache
    from paraisite.screening.ensemble import load_ensemble
    from paraisite.screening.files import ScanPaths
    from paraisite.screening.scan import ScanSettings, run_scan

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = GraphCache(args.cache, in_memory=False)  # streamed from disk, as a cache too large for memory is
    ensemble = load_ensemble(args.run, method=args.method)
    device = torch.device(args.device)
    out = Path(args.out)
    if args.quick:
        # A cache of the first N structures is not at hand; run_scan's resume does the rest: mark the others done.
        _pretend_done(cache, ensemble, out, args.quick)
    samples: list[tuple[float, float]] = []
    running = threading.Event()
    running.set()

    def sample() -> None:
        t0 = time.perf_counter()
        while running.is_set():
            samples.append((time.perf_counter() - t0, rss_mb()))
            time.sleep(0.25)

    rss_before = rss_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    wall, cpu = time.perf_counter(), time.process_time()
    report = run_scan(cache, ensemble, out, ScanSettings(args.batch_size, device, progress=False))
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    running.clear()
    sampler.join()
    n = report.predicted + report.failed
    rss = np.array([r for _, r in samples]) if samples else np.array([rss_mb()])
    quarter = [float(rss[min(len(rss) - 1, int(q * (len(rss) - 1)))]) for q in (0.1, 0.5, 1.0)]
    result = {
        "device": args.device, "models": len(ensemble), "method": args.method, "batch_size": args.batch_size,
        "threads": torch.get_num_threads(), "structures": n, "seconds": wall, "cpu_seconds": cpu,
        "structures_per_s": n / wall, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss_before,
        "rss_at_10_50_100_pct_mb": quarter,
    }
    if device.type == "cuda":
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 1e6
    rows = sum(1 for _ in open(out)) - 1
    assert rows == len(cache) + len(cache.failures), (rows, len(cache))
    for p in ScanPaths(out).base.parent.glob(out.stem + "*"):
        p.unlink()
    return result


def _pretend_done(cache, ensemble, out: Path, keep: int) -> None:
    """Write a part file holding placeholder rows for all but the first ``keep`` structures."""
    from paraisite.screening.files import ScanPaths, csv_text, scan_meta
    from paraisite.screening.scan import columns

    paths = ScanPaths(out)
    header = columns(ensemble.info.splits, (), cache.label_names if cache.labels is not None else [])
    paths.parts.mkdir(parents=True, exist_ok=True)
    paths.running_meta.write_text(json.dumps(scan_meta(ensemble, cache, header)))
    filler = [""] * (len(header) - 1)
    skipped = [[sid] + filler for sid in cache.ids[keep:]] + [[sid] + filler for sid, _ in cache.failures]
    paths.part(1).write_text(csv_text([header] + skipped))


def one_at_a_time(cache_path: Path, run: Path, n: int, threads: int | None) -> dict:
    """Each model's own forward on single structures (upstream's scan pattern, graphs prebuilt)."""
    import torch

    from megnet_pt.cache import GraphCache
    from paraisite.screening.ensemble import load_ensemble

    if threads:
        torch.set_num_threads(threads)
    cache = GraphCache(cache_path, in_memory=False)
    model = load_ensemble(run).models[0]
    graphs = [cache[i] for i in range(n)]
    with torch.inference_mode():
        model(graphs[0])
        t = time.perf_counter()
        for g in graphs:
            model(g)
        seconds = time.perf_counter() - t
    return {"structures": n, "seconds": seconds, "structures_per_s": n / seconds}


def end_to_end(cache: Path, run: Path, work: Path, nproc: int) -> dict:
    """``torchrun --nproc-per-node N scan.py`` with one thread per process, timed from start to summary."""
    out = work / f"scan_torchrun{nproc}.csv"
    for p in work.glob(out.stem + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(ROOT / "scan.py"), str(cache), "--models", str(run), "--out", str(out), "--threads", "1", "--no-progress"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"torchrun scan failed:\n{proc.stderr[-3000:]}")
    rows = sum(1 for _ in open(out)) - 1
    return {"processes": nproc, "structures": rows, "seconds": seconds, "structures_per_s": rows / seconds}


def run_child(argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=dict(os.environ))
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of AFLOW in the cache (default 10: 32,690)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "paraisite_bench_scan",
                        help="where the cache and models are kept between runs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="processes building the cache (default %(default)s)")
    parser.add_argument("--quick", type=int, default=0, help="time only the first N structures of the cache")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cpu-batch-size", type=int, default=32)
    parser.add_argument("--cuda-batch-size", type=int, default=256)
    parser.add_argument("--one-at-a-time", type=int, default=300, help="structures for the one-at-a-time figure")
    parser.add_argument("--fast", action="store_true",
                        help="also time scan.py --method fast (megnet_pt's C++ nodes, model after model) on the CPU")
    parser.add_argument("--torchrun", type=int, default=0,
                        help="also time scan.py end to end under torchrun with this many processes (not with --quick)")
    # internal: one configuration in a child process
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="fused", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args)))
        return
    if args.single:
        print(json.dumps(one_at_a_time(Path(args.cache), Path(args.run), args.one_at_a_time, args.threads)))
        return

    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # graph caches of the training domain (scan.py's warnings) land here
    print(f"load average {load_average()}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads by default")
    cache = ensure_bench_cache(args.workdir, args.repeat, args.workers)
    runs = {m: make_run(args.workdir / f"run{m}", m) for m in (1, 9)}
    common = ["--cache", str(cache)] + (["--threads", str(args.threads)] if args.threads else [])
    if args.quick:
        common += ["--quick", str(args.quick)]
    configs = [("cpu", 1, "fused"), ("cpu", 9, "fused")]
    configs += [("cpu", 1, "fast"), ("cpu", 9, "fast")] if args.fast else []
    configs += [("cuda", 1, "fused"), ("cuda", 9, "fused")] if torch.cuda.is_available() else []
    results = []
    for device, m, method in configs:
        bs = args.cuda_batch_size if device == "cuda" else args.cpu_batch_size
        out = args.workdir / f"scan_{device}_{m}_{method}.csv"
        print(f"timing {m} model(s) on {device}, {method}, batch {bs} (load average {load_average()}) ...", flush=True)
        results.append(run_child(["--measure", *common, "--run", str(runs[m]), "--out", str(out), "--device", device,
                                  "--batch-size", str(bs), "--method", method]))
    ddp = None
    if args.torchrun and not args.quick:
        from paraisite.screening.scan import training_domain

        training_domain(runs[9], "rw", "aflow_agl", 4.0)  # build its graph cache before the clock starts
        print(f"timing scan.py under torchrun, {args.torchrun} processes x 1 thread (load average {load_average()}) ...",
              flush=True)
        ddp = end_to_end(cache, runs[9], args.workdir, args.torchrun)
    single = run_child(["--single", "--cache", str(cache), "--run", str(runs[1]),
                        "--one-at-a-time", str(args.one_at_a_time)] + (["--threads", str(args.threads)] if args.threads else []))

    print(f"\nscan of {results[0]['structures']} structures (load average now {load_average()})\n")
    one = single["structures_per_s"]  # model-structures/s, one structure at a time, this run
    print("| device | models | method | batch | threads | structures/s | model-structures/s | x one at a time "
          "| per CPU-second: model-structures (x one at a time) | wall s | peak RSS MB | RSS at 10/50/100% MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        rate = r["structures_per_s"]
        per_cpu = r["structures"] * r["models"] / r["cpu_seconds"] if r["device"] == "cpu" else float("nan")
        print(f"| {r['device']} | {r['models']} | {r['method']} | {r['batch_size']} | {r['threads']} | {rate:.0f} | {rate * r['models']:.0f} "
              f"| {rate * r['models'] / one:.1f} | {per_cpu:.0f} ({per_cpu / one:.1f}) "
              f"| {r['seconds']:.0f} | {r['peak_rss_mb']:.0f} | "
              + "/".join(f"{v:.0f}" for v in r["rss_at_10_50_100_pct_mb"]) + " |")
    if ddp:
        rate = ddp["structures_per_s"]
        print(f"\nscan.py end to end (start-up, cache, summary included), torchrun {ddp['processes']} processes x 1 thread, "
              f"9 models: {ddp['structures']} structures in {ddp['seconds']:.0f} s = {rate:.0f} structures/s = "
              f"{9 * rate:.0f} model-structures/s ({9 * rate / one:.1f} x one at a time)")
    (args.workdir / "results.json").write_text(json.dumps({"scan": results, "torchrun": ddp, "one_at_a_time": single},
                                                          indent=2))
    print(f"\none model's own forward, one structure at a time (graphs prebuilt): {one:.0f} structures/s")
    nine = [r for r in results if r["models"] == 9 and r["device"] == "cpu" and r["method"] == "fused"][0]
    hours = 34000 / nine["structures_per_s"] / 3600
    print(f"34k materials x 9 models on this CPU: {hours * 60:.1f} min (one at a time: {34000 * 9 / one / 3600:.1f} h)")


if __name__ == "__main__":
    main()
