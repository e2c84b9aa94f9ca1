"""Screen crystal structures for lattice thermal conductivity with the nine models of a ParAIsite run.

    python scan.py mp_stable.h5 [--models weights/ltc_fe_togo15_log10_clip10 | runs/<run>] [--out mp_stable_ltc.csv]
                   [--top 30] [--with-eform] [--with-bandgap] [--correlations] [--batch-size N] [--device auto|cpu|cuda]

The default models are the ensemble shipped in weights/ (its model card: weights/<name>/README.md); a run of
your own (python train.py ... writes runs/<init>_<dataset>) is used with --models.

As in the paper's screening of ~34k stable Materials Project materials: every
structure gets the prediction of each split's model, their mean, standard
deviation, std/mean, max and max x std/mean, the descriptors the paper
correlates them with, and a warning column. A summary lists the --top
materials with the lowest max (Table S6), with PNG plots of the predictions.
Re-running the same command after an interruption continues where it stopped;
``torchrun --nproc-per-node N scan.py ...`` shares the work between processes.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from megnet_pt.cache import CacheError, GraphCache, default_cache_path, ensure_cache
from megnet_pt.cache.workers import cpu_cores
from megnet_pt.checkpoint import CheckpointError
from megnet_pt.elements import ELEMENTS
from megnet_pt.interrupt import Interrupted, os_error, stop_on_signals
from paraisite.screening.ensemble import load_ensemble
from paraisite.screening.shipped import default_models
from paraisite.screening.properties import property_models
from paraisite.data.paths import use_base_url
from paraisite.training.processes import distributed, process_device
from paraisite.evaluation.report import paper_name
from paraisite.training.rundir import SELECTIONS
from paraisite.screening.files import ScanError, hold_output, record_run
from paraisite.screening.summary import summarize, write_summary
from paraisite.screening.scan import ScanSettings, run_scan, training_domain
from paraisite.screening.intervals import load_calibration

DEFAULT_MODELS = default_models()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "input: a graph cache (.h5, from python -m megnet_pt.cache build), or CIF files/folders, dataset folders,\n"
            "pymatgen JSON or extended XYZ files, which are first cached (--cache, default ./data/<name>_cutoff4.h5).\n\n"
            "output (--out): CSV, one row per input structure (in input order; those that could not be converted last):\n"
            "  id, formula, ltc_split<k> (W/m/K, one per model), ltc_mean, ltc_std (sample std), ltc_std_over_mean,\n"
            "  ltc_max, ltc_max_x_std_over_mean, [ltc_lo, ltc_hi: the --interval, domain: distance to the training\n"
            "  structures, ~1 inside them; with a calibrated ensemble such as the shipped one], n_sites, volume (Å^3), density (g/cm^3), atomic_density (atoms/Å^3),\n"
            "  n_elements, [eform_ev_per_atom], [band_gap_pbe_ev], input_<field> (each field the cache carries, e.g. the Materials Project's\n"
            "  band_gap, is_stable as 1/0), warning (no neighbour within the cutoff; element or size outside the\n"
            "  training data; 'error: ...' when there is no prediction, e.g. a structure that could not be read).\n"
            "beside it: <base>.summary.md (top table, correlations), <base>.ltc.png, <base>.spread.png, <base>.scan.json.\n"
            "while running, rows go to <out>.parts/rank<r>.csv as they are produced; a re-run resumes from them.\n\n"
            "examples:\n"
            "  python scan.py a.cif b.cif                              # the shipped ensemble (weights/)\n"
            "  python scan.py a.cif --models runs/fe+af_togo15          # the models of a run of your own\n"
            "  python -m megnet_pt.cache build --from-mp is_stable=true -o mp_stable.h5 --workers 8   # needs MP_API_KEY\n"
            "  python scan.py mp_stable.h5 --with-eform --with-bandgap --correlations\n"
            "  torchrun --nproc-per-node 4 scan.py mp_stable.h5     # 4 processes (GPUs if present), one output"
        ),
    )
    p.add_argument("inputs", nargs="+", help="a graph cache (.h5), or structure files/folders to cache first")
    p.add_argument("--models", default=DEFAULT_MODELS, help="a shipped ensemble or a run folder holding split<k>/best.pt "
                   f"(default: the shipped {DEFAULT_MODELS.name})")
    p.add_argument("--selection", default=None, choices=SELECTIONS,
                   help="which checkpoint of each split of a run: best (lowest validation loss, the default) or final; "
                   "a shipped ensemble has its own (final)"),
    p.add_argument("--out", default=None, help="CSV to write (default: <input name>_ltc.csv)")
    p.add_argument("--top", type=int, default=30, help="materials with the lowest max prediction in the summary (default: %(default)s)")
    p.add_argument("--with-eform", action="store_true",
                   help="add the formation energy predicted by the published MEGNet (eV/atom)")
    p.add_argument("--with-bandgap", action="store_true",
                   help="add the PBE band gap predicted by the published multi-fidelity MEGNet (eV; "
                        "MEGNet-MP-2019.4.1-BandGap-mfi, fetched on first use); --correlations uses it where the "
                        "input has no band gap")
    p.add_argument("--correlations", action="store_true",
                   help="Pearson r and p-value between the mean (and variance) of the predictions and the descriptors, "
                   "and every numeric field of the inputs (input_<field>: as the paper's Tables 1-4 on Materials Project fields)")
    p.add_argument("--interval", type=float, default=None, metavar="LEVEL",
                   help="level of ltc_lo..ltc_hi, e.g. 0.8 (default: the calibration's, 0.9); needs models with "
                        "intervals.json (scripts/calibrate_intervals.py)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures per batch (default: 32 on a CPU, 256 on a GPU; results do not depend on it)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's choice; on a busy shared machine 1 is often faster)")
    p.add_argument("--cache", default=None, help="where to cache structure inputs (default: ./data/<name>_cutoff<c>.h5)")
    p.add_argument("--workers", type=int, default=cpu_cores(),
                   help="processes parsing structure files into the cache (default: every core, %(default)s here)")
    p.add_argument("--method", default="fused", choices=("fused", "reference", "fast"),
                   help="fused: the models stacked into one pass; reference: each model's own forward; fast: each "
                        "model's forward through megnet_pt's C++ nodes (CPU only; needs g++ and ninja at first use; "
                        "about 1.3x fused) (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--base-url", default=None, metavar="URL", help="download the published weights (--with-eform, --with-bandgap) and the training data (warnings) from this mirror "
                   "(a URL or folder laid out as <base>/<ParAIsite|CrabNet|matgl>/<path>; default: $PARAISITE_BASE_URL, "
                   "else GitHub)")
    return p


def is_cache(inputs: list[str]) -> bool:
    """One graph cache (.h5), or structure files; several caches, or a cache among structure files, are an error."""
    caches = [i for i in inputs if Path(i).suffix.lower() in (".h5", ".hdf5") and not Path(i).is_dir()]
    if caches and len(inputs) > 1:
        raise ValueError(f"{', '.join(caches)}: scan one graph cache at a time, or structure files (CIF, JSON, "
                         "extended XYZ, folders) without a cache among them")
    return bool(caches)


def open_cache(args: argparse.Namespace, given_cache: bool, cutoff: float, rank: int, world: int) -> GraphCache:
    """The graph cache of the inputs; structure files are cached first (by rank 0 under torchrun)."""
    if given_cache:
        return GraphCache(args.inputs[0], cutoff=cutoff, vocabulary=ELEMENTS)
    path = Path(args.cache) if args.cache else default_cache_path(args.inputs, cutoff)
    if rank == 0:
        ensure_cache(args.inputs, path, cutoff=cutoff, workers=args.workers, progress=not args.no_progress).close()
    if world > 1:
        torch.distributed.barrier()
    return GraphCache(path, cutoff=cutoff, vocabulary=ELEMENTS)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    use_base_url(args.base_url)
    rank, world, local_rank = distributed()
    sync = torch.distributed if world > 1 else None
    try:
        with stop_on_signals():
            given_cache = is_cache(args.inputs)  # several caches are refused before anything is loaded or written
            if args.top < 0 or (args.batch_size is not None and args.batch_size < 1):
                raise ValueError("--top must be >= 0 and --batch-size >= 1")
            device = process_device(args.device, world, local_rank)
            if args.method == "fast" and device.type != "cpu":
                raise ValueError(f"--method fast runs on a CPU (megnet_pt.fast), not on {device}: use --method fused there")
            if args.threads:
                torch.set_num_threads(args.threads)
            batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
            if args.interval is not None and not 0 < args.interval < 1:
                raise ValueError(f"--interval must be between 0 and 1, e.g. 0.9 (got {args.interval:g})")
            ensemble = load_ensemble(args.models, args.selection, method=args.method)
            info = ensemble.info
            calibration = load_calibration(args.models)
            if args.interval is not None and calibration is None:
                raise ValueError(f"--interval: {args.models} has no intervals.json; make one with "
                                 f"python scripts/calibrate_intervals.py {args.models}")
            # Rank 0 first: a first use fetches and converts the published weights into ./weights, once.
            properties = {}
            if rank == 0:
                properties = property_models(args.with_eform, args.with_bandgap, ensemble.cutoff)
            if world > 1:
                torch.distributed.barrier()
            if rank != 0:
                properties = property_models(args.with_eform, args.with_bandgap, ensemble.cutoff)
            cache = open_cache(args, given_cache, ensemble.cutoff, rank, world)
            out = Path(args.out) if args.out else Path(f"{Path(args.inputs[0]).name.split('.')[0]}_ltc.csv")
            domain, domain_note = (None, "")
            if rank == 0:
                domain, domain_note = training_domain(info.run_dir, info.init, info.dataset, info.cutoff)
            if sync is not None:  # every rank writes warnings, so every rank needs the domain
                shared = [domain, domain_note]
                sync.broadcast_object_list(shared, src=0)
                domain, domain_note = shared
            if rank == 0:
                print(f"{info.describe()}; {len(cache)} structures in {cache.path} "
                      f"(+{len(cache.failures)} that could not be converted); {world} process(es) on {device}",
                      file=sys.stderr)
            start = time.perf_counter()
            started_utc = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            settings = ScanSettings(batch_size, device, properties, domain, calibration, args.interval, rank, world,
                                    not args.no_progress, sync)
            with hold_output(out) if rank == 0 else contextlib.nullcontext():
                report = run_scan(cache, ensemble, out, settings)
    except (CheckpointError, CacheError, ScanError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder: one line, the rows written so far are kept
        print(f"error: {os_error(exc, 'scanning')}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"interrupted ({exc if isinstance(exc, Interrupted) else 'SIGINT'}): the rows written so far are kept; "
              "run the same command again to continue", file=sys.stderr)
        return getattr(exc, "code", 130)
    if rank != 0:
        return 0
    seconds = time.perf_counter() - start
    done = report.predicted + report.failed
    rate = f", {done / seconds:.1f} structures/s per process" if done and seconds > 0 else ""
    name = info.run_dir.name if info.shipped else paper_name(info.init, info.dataset)
    title = f"{name} ({len(ensemble)} models, {info.selection}) on {cache.path.name}"
    runs = record_run(out, {"started_utc": started_utc, "processes": world, "device": str(device), "structures": done,
                            "seconds": f"{seconds:.2f}", "structures_per_s": f"{done / seconds:.1f}" if seconds > 0 else "",
                            "already_done": report.skipped})
    notes = [info.describe(), f"cache {cache.path} (cutoff {cache.cutoff:g} Å)", domain_note]
    if calibration is not None:
        notes.append(f"ltc_lo..ltc_hi: {calibration.describe(args.interval)}")
    notes += [f"run of {r['started_utc']}: {r['structures']} structures in {float(r['seconds']):.1f} s by rank 0 of "
              f"{r['processes']} on {r['device']}, {r['structures_per_s']} structures/s per process; "
              f"{r['already_done']} already done" for r in runs]
    if not done:
        notes.append("this run: nothing left to predict (every row was already written)")
    summary = summarize(out, top=args.top, correlations=args.correlations)
    if args.correlations and not args.with_eform:
        notes.append("formation energy not correlated: add --with-eform")
    if args.correlations and not args.with_bandgap:
        notes.append("band gap correlated only where the input gives one: add --with-bandgap for the others")
    md = write_summary(out, summary, args.top, [n for n in notes if n], title)
    print(f"wrote {out} ({summary.rows} rows: {summary.predicted} predicted, {summary.errors} without a prediction, "
          f"{summary.warned} with a warning){rate}")
    print(f"summary: {md}")
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
