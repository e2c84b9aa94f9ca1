"""Train ParAIsite with the paper's nine-split protocol.

    python train.py --init fe+af --dataset togo15

Step 1 (``--init rw``): random MEGNet weights. Step 2 (``fe``): the published
formation-energy MEGNet with a fresh head. Step 3 (``fe+af``): the FEAF model
of the same split, i.e. ``fe`` first fine-tuned on AFLOW AGL (trained here on
first use into runs/fe_aflow_agl and reused afterwards). ``rw+af`` likewise
from RWAF. Every split k (1..9) is an 80/20 hold-out drawn with seed k.

Everything goes to ``runs/<init>_<dataset>/``; a re-run with the same
arguments resumes an interrupted run and skips finished splits.
``torchrun --nproc-per-node N train.py ...`` spreads the splits over N processes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch

from megnet_pt.checkpoint import CheckpointError
from megnet_pt.predict import resolve_device
from paraisite.datasets import NAMES, DatasetError, LTCDataset, dataset_folder, load_dataset, read_labels
from paraisite.paper_scale import PaperScale
from paraisite.ensemble_training import train_splits_together
from paraisite.report import collapsed, paper_name, plot_curves, plot_parity, read_csv, summary_markdown, write_csv
from paraisite.training import (
    INITS, TrainConfig, aflow_checkpoint, aflow_stage_done, check_aflow_checkpoint, check_run_config, evaluate_split,
    split_dir, train_split,
)


def parse_splits(text: str) -> list[int]:
    """'9' -> splits 1..9; '1,4,7' -> those splits."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits takes a count (9) or a list (1,4,7), not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--splits: split indices start at 1 (got {text!r})")
    return list(range(1, values[0] + 1)) if len(values) == 1 and "," not in text else sorted(set(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Results, checkpoints, curves, summary.md and plots go to the run folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Example: python train.py --init fe+af --dataset togo15 --test-on togo15,miyazaki21,mix,aflow_agl",
    )
    p.add_argument("--init", default="fe+af", help=f"starting weights: {', '.join(INITS)} (rw random, fe formation energy, "
                   "+af after the AFLOW stage of the same split)")
    p.add_argument("--dataset", default="togo15", help=f"training set: {', '.join(NAMES)}, or a folder with labels.csv and cif/")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--splits", type=parse_splits, default=parse_splits("9"),
                   help="how many splits (9 = splits 1..9, 2 = splits 1 and 2) or a list (1,4,7; 4, = split 4 alone)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine annealing, T_max 1000 epochs, eta_min 1e-5)")
    p.add_argument("--seed", type=int, default=42, help="seeds model initialisation and shuffling (splits use seed k)")
    p.add_argument("--test-on", default="", help="also score each split's model on these datasets' validation parts "
                   "of the same seed (comma-separated; the training set is always scored)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<init>_<dataset>, with _clip<C> under "
                   "--clip-grad-norm and _holdout<H> under --select-holdout)")
    p.add_argument("--aflow-run", default=None, help="AFLOW-stage run folder for fe+af / rw+af "
                   "(default: runs/fe_aflow_agl or runs/rw_aflow_agl, _clip<C> likewise; trained there first when missing)")
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="C",
                   help="not in the paper: clip each step's gradient to L2 norm C (both stages of fe+af/rw+af); 10 keeps "
                   "the AFLOW stage from collapsing (README.md: Training). Default folders get a suffix _clip<C>")
    p.add_argument("--select-holdout", type=float, default=None, metavar="H",
                   help="not in the paper: choose best.pt on a share H (e.g. 0.1) of each split's training part, held out "
                   "from training, instead of on the validation part it is scored on (an honest early stopping; the "
                   "AFLOW stage of fe+af/rw+af keeps its own selection). Default folders get a suffix _holdout<H>")
    p.add_argument("--time-limit", type=float, default=None, help="stop cleanly after the epoch that passes this many "
                   "minutes; re-run the same command to go on")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--ensemble", action="store_true", help="train the selected splits together as one vectorised model "
                   "(same results to float32 round-off); meant for a GPU, and on a CPU faster when it has several threads")
    p.add_argument("--no-cuda-graphs", action="store_true", help="with --ensemble on CUDA: launch every kernel of every "
                   "step instead of replaying the step recorded once as a CUDA graph (slower; for comparison)")
    return p


def validate_names(args: argparse.Namespace) -> list[str]:
    if args.init not in INITS:
        raise DatasetError(f"unknown --init {args.init!r}: expected one of {', '.join(INITS)}")
    tests = [t.strip() for t in args.test_on.split(",") if t.strip()]
    for name in [args.dataset, *tests]:
        if name not in NAMES and not Path(name).is_dir():
            raise DatasetError(f"unknown dataset {name!r}: expected one of {', '.join(NAMES)} or a folder holding labels.csv and cif/")
    for v, flag in ((args.epochs, "--epochs"), (args.batch_size, "--batch-size")):
        if v < 1:
            raise DatasetError(f"{flag} must be at least 1 (got {v})")
    if args.lr <= 0:
        raise DatasetError(f"--lr must be positive (got {args.lr})")
    if args.clip_grad_norm is not None and not args.clip_grad_norm > 0:
        raise DatasetError(f"--clip-grad-norm must be positive (got {args.clip_grad_norm})")
    if args.select_holdout is not None and not 0 < args.select_holdout < 1:
        raise DatasetError(f"--select-holdout must be between 0 and 1 (got {args.select_holdout})")
    return tests


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def hardware(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"Hardware: {name}; torch {torch.__version__}."


def write_reports(run_dir: Path, config: TrainConfig, device: torch.device) -> None:
    """results.csv, predictions.csv, summary.md and plots from every finished split of the run."""
    splits = sorted(int(d.name[5:]) for d in run_dir.glob("split*") if (d / "results.csv").is_file())
    results, predictions, curves = [], [], {}
    for k in splits:
        d = split_dir(run_dir, k)
        results += read_csv(d / "results.csv")
        predictions += read_csv(d / "predictions.csv")
        curves[k] = read_csv(d / "curve.csv")
    write_csv(run_dir / "results.csv", results)
    write_csv(run_dir / "predictions.csv", predictions)
    summary = summary_markdown(results, config.init, config.dataset, hardware(device), config.select_holdout)
    (run_dir / "summary.md").write_text(summary + "\n")
    name = paper_name(config.init, config.dataset)
    plot_curves(curves, run_dir / "curves.png", f"{name}: MAPE per epoch")
    own = [r for r in predictions if r["test_dataset"] == config.dataset]
    plot_parity(own, run_dir / "parity.png", f"{name}: validation, {len(splits)} split(s)")


def run(config: TrainConfig, splits: list[int], run_dir: Path, tests: list[str], device: torch.device,
        deadline: float | None, progress: bool, rank: int = 0, world: int = 1, report: bool = True,
        ensemble: bool = False, cuda_graphs: bool = True) -> bool:
    """Train and evaluate ``splits`` (this process's share under torchrun); True when all are done."""
    mine = splits[rank::world]
    aflow_run = Path(config.aflow_run) if config.init in ("fe+af", "rw+af") else None
    stage = TrainConfig(init=config.init.split("+")[0], dataset="aflow_agl", epochs=config.epochs,
                        batch_size=config.batch_size, lr=config.lr, seed=config.seed, cutoff=config.cutoff,
                        clip_grad_norm=config.clip_grad_norm)
    needs_stage = aflow_run is not None and any(not aflow_stage_done(aflow_run, k) for k in splits)

    def prepare() -> dict[str, LTCDataset]:
        check_run_config(run_dir, config)
        if needs_stage:
            check_run_config(aflow_run, stage)
            load_dataset("aflow_agl", cutoff=config.cutoff, progress=progress)  # builds its graph cache once, before the ranks need it
        return {name: load_dataset(name, cutoff=config.cutoff, progress=progress) for name in dict.fromkeys([config.dataset, *tests])}

    # Under torchrun, rank 0 writes config.json and builds the graph caches; the others then only read them.
    datasets = prepare() if rank == 0 else {}
    barrier(world)
    if rank != 0:
        datasets = prepare()
    if aflow_run is not None:
        missing = [k for k in mine if not aflow_stage_done(aflow_run, k)]  # never started or interrupted: trained or resumed below
        for k in sorted(set(mine) - set(missing)):
            check_aflow_checkpoint(aflow_checkpoint(aflow_run, k), config.init, k, config.cutoff)
        if missing:
            print(f"AFLOW stage of split(s) {missing} not finished in {aflow_run}: training it first ({stage.init}, aflow_agl)", file=sys.stderr)
            if not run(stage, missing, aflow_run, [], device, deadline, progress, report=world == 1, ensemble=ensemble,
                       cuda_graphs=cuda_graphs):
                return False
    data = datasets[config.dataset]
    # the module of a +af model carries AFLOW's scaler upstream (paraisite/paper_scale.py); float32, as LTCDataset.ltc
    aflow_ltc = (torch.tensor(read_labels(dataset_folder("aflow_agl") / "labels.csv")[2], dtype=torch.float32)
                 if aflow_run is not None else None)
    paper_scale = PaperScale.for_run(config.init, data, aflow_ltc)
    # the ensemble writes every split's final.pt; train_split below then only finds them done
    if ensemble and not train_splits_together(data, mine, config, run_dir, device, deadline, progress, cuda_graphs):
        return False
    finished = True
    for k in mine:
        d = split_dir(run_dir, k)
        if not (d / "results.csv").is_file() or not set(datasets) <= {r["test_dataset"] for r in read_csv(d / "results.csv")}:
            if not train_split(data, k, config, run_dir, device, deadline, progress):
                finished = False
                break
            rows, preds = evaluate_split(k, run_dir, datasets, device, paper_scale)
            for r in collapsed(rows, config.dataset):
                print(f"warning: {d}/{r['selection']}.pt (epoch {r['epoch']}) collapsed: {float(r['share_nonpositive']):.0%} "
                      f"of its {config.dataset} validation predictions are <= 0 W/m/K (README.md: Training)", file=sys.stderr)
            write_csv(d / "predictions.csv", preds)
            write_csv(d / "results.csv", rows)
    if world == 1 and all((split_dir(run_dir, k) / "results.csv").is_file() for k in splits):
        if report:
            write_reports(run_dir, config, device)
        return True
    return finished


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tests = validate_names(args)
        rank, world, local_rank = distributed()
        device = resolve_device(args.device)
        if device.type == "cuda" and world > 1:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)  # kernels, streams and CUDA graphs of this process go to its own GPU
        suffix = f"_clip{args.clip_grad_norm:g}" if args.clip_grad_norm else ""  # never mixed with the paper's runs
        aflow_run = args.aflow_run or f"runs/{args.init.split('+')[0]}_aflow_agl{suffix}"
        config = TrainConfig(init=args.init, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr, seed=args.seed, aflow_run=aflow_run if "+af" in args.init else None,
                             clip_grad_norm=args.clip_grad_norm, select_holdout=args.select_holdout)
        suffix += f"_holdout{args.select_holdout:g}" if args.select_holdout else ""
        if "+af" in args.init and args.aflow_run and not all(aflow_stage_done(Path(aflow_run), k) for k in args.splits):
            gone = [k for k in args.splits if not aflow_checkpoint(Path(aflow_run), k).is_file()]
            unfinished = [k for k in args.splits if k not in gone and not aflow_stage_done(Path(aflow_run), k)]
            if gone:
                raise CheckpointError(f"--aflow-run {aflow_run}: no AFLOW model for split(s) {gone} (expected {aflow_checkpoint(Path(aflow_run), gone[0])})")
            raise CheckpointError(f"--aflow-run {aflow_run}: the AFLOW stage of split(s) {unfinished} is unfinished (best.pt but no "
                                  f"final.pt); finish it first (python train.py --init {args.init.split('+')[0]} --dataset aflow_agl "
                                  f"--run-dir {aflow_run} with its --epochs), or leave out --aflow-run to have it trained here")
        run_dir = Path(args.run_dir or f"runs/{args.init}_{Path(args.dataset).name}{suffix}")
        deadline = time.monotonic() + 60 * args.time_limit if args.time_limit else None
        if rank == 0:
            print(f"{paper_name(args.init, Path(args.dataset).name)}: split(s) {','.join(map(str, args.splits))} "
                  f"of {args.dataset} into {run_dir}", file=sys.stderr)
            if device.type == "cuda" and not args.ensemble and len(args.splits) > world:
                print("note: on CUDA, --ensemble trains the splits together and is several times faster "
                      "(README.md: Training)", file=sys.stderr)
        done = run(config, args.splits, run_dir, tests, device, deadline, not args.no_progress, rank, world,
                   ensemble=args.ensemble, cuda_graphs=not args.no_cuda_graphs)
        barrier(world)
        if world > 1 and rank == 0:
            done = all((split_dir(run_dir, k) / "results.csv").is_file() for k in args.splits)
            if done:
                write_reports(run_dir, config, device)
                if config.aflow_run and Path(config.aflow_run).is_dir():
                    write_reports(Path(config.aflow_run), TrainConfig(init=config.init.split("+")[0], dataset="aflow_agl"), device)
    except (DatasetError, CheckpointError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        if done:
            print(f"done: {run_dir}/summary.md")
            print((run_dir / "summary.md").read_text())
        else:
            print(f"stopped before the end (time limit); run the same command again to resume {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
