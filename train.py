"""Train ParAIsite with the paper's nine-split protocol.

    python train.py --init fe+af --dataset togo15

Step 1 (``--init rw``): random MEGNet weights. Step 2 (``fe``): the published
formation-energy MEGNet with a fresh head. Step 3 (``fe+af``): the FEAF model
of the same split, i.e. ``fe`` first fine-tuned on AFLOW AGL (trained here on
first use into runs/fe_aflow_agl and reused afterwards). ``rw+af`` likewise
from RWAF. Every split k (1..9) is an 80/20 hold-out drawn with seed k.

Everything goes to ``runs/<init>_<dataset>/``; a re-run with the same
arguments resumes an interrupted run and skips finished splits. On a CPU the
splits are spread over one single-thread process per core (``--processes``);
``torchrun --nproc-per-node N train.py ...`` does the same by hand.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from megnet_pt.checkpoint import CheckpointError
from megnet_pt.fast import fast_ops
from megnet_pt.interrupt import os_error
from paraisite.data.datasets import NAMES, DatasetError
from paraisite.data.paths import use_base_url
from paraisite.training.clock import JobClock
from paraisite.training.processes import (Interrupted, cpu_cores, cpu_processes, distributed, process_device, resume_command,
                                          spawn, spawned, stop_on_signals)
from paraisite.training.job import (Plan, build_job, check_given_aflow_run, describe_job, describe_progress, parallel_tasks,
                                    run_job)
from paraisite.training.rundir import RunDir
from paraisite.evaluation.metrics import LOSSES
from paraisite.training.loop import INITS, RECIPE_SETTINGS, RECIPES, TrainConfig


def parse_splits(text: str) -> list[int]:
    """'9' -> splits 1..9; '1,4,7' -> those splits."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits takes a count (9) or a list (1,4,7), not {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--splits: split indices start at 1 (got {text!r})")
    return list(range(1, values[0] + 1)) if len(values) == 1 and "," not in text else sorted(set(values))


HELP = """\
Train ParAIsite (Klochko & d'Aquin, PCCP 2026): a MEGNet graph network with an MLP head, predicting the lattice
thermal conductivity (LTC, W/m/K at 300 K) of a crystal from its structure. Each of the nine splits (an 80/20
hold-out drawn with seed k) trains one model; results, checkpoints, curves, summary.md and plots go to the run folder.

datasets (--dataset, --test-on):
  togo15      95 rocksalt, zinc-blende and wurtzite compounds, LTC from phono3py (Togo/Seko et al. 2015)
  miyazaki21  143 half-Heusler compounds (Miyazaki et al. 2021)
  mix         togo15 + miyazaki21, split per source
  aflow_agl   3,269 AFLOW entries with the cheap AGL (Debye-Grueneisen) LTC: the intermediate pre-training set
  a folder    with labels.csv (id,formula,ltc) and cif/<id>.cif

starting points (--init):
  rw          random MEGNet weights (the paper's step 1)
  fe          the published formation-energy MEGNet (MEGNet-MP-2018.6.1-Eform), fresh head (step 2)
  fe+af       fe, fine-tuned first on aflow_agl (the "AFLOW stage", one model per split, in runs/fe_aflow_agl),
              then on --dataset (step 3, the paper's best): 9 + 9 = 18 models
  rw+af       the same from random weights

data: the datasets and weights are downloaded on first use into $PARAISITE_HOME (default ~/.cache/paraisite), from
GitHub at pinned commits, or from the mirror --base-url / $PARAISITE_BASE_URL; every file is checked by sha256.
cost: fe+af on togo15 is about 2.3 h on a 2-core CPU (the AFLOW stage is nearly all of it) and about 15 min on one
H200 with --ensemble; the run prints its own estimate after its first epochs. Interrupt it at any time: the same
command resumes it.
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, every flag with its default (those without one say what happens in their help)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=HELP,
        formatter_class=HelpFormatter,
        epilog="Example: python train.py --init fe+af --dataset togo15 --test-on togo15,miyazaki21,mix,aflow_agl",
    )
    p.add_argument("--init", default="fe+af", help=f"starting weights: {', '.join(INITS)} (above)")
    p.add_argument("--dataset", default="togo15", help=f"training set: {', '.join(NAMES)}, or a folder with labels.csv and cif/")
    p.add_argument("--epochs", type=int, default=300, help="epochs per model (both stages of fe+af / rw+af)")
    p.add_argument("--splits", type=parse_splits, default="9",
                   help="how many splits (9 = splits 1..9, 2 = splits 1 and 2) or a list (1,4,7; 4, = split 4 alone)")
    p.add_argument("--batch-size", type=int, default=8, help="structures per optimisation step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (cosine annealing, T_max 1000 epochs, eta_min 1e-5)")
    p.add_argument("--seed", type=int, default=42, help="seeds model initialisation and shuffling (splits use seed k)")
    p.add_argument("--test-on", default="", help="also score each split's model on these datasets' validation parts "
                   "of the same seed (comma-separated; the training set is always scored)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<init>_<dataset>, with a suffix for each "
                   "setting off the paper's protocol: _<recipe>, _clip<C>, _holdout<H>, _log10, _megnetlr<LR>, _swa<N>, "
                   "_freeze<N>, _fast)")
    p.add_argument("--aflow-run", default=None, help="AFLOW-stage run folder for fe+af / rw+af "
                   "(default: runs/fe_aflow_agl or runs/rw_aflow_agl, _clip<C> likewise; trained there first when missing)")
    p.add_argument("--clip-grad-norm", type=float, default=None, metavar="C",
                   help="not in the paper: clip each step's gradient to L2 norm C (both stages of fe+af/rw+af); 10 keeps "
                   "the AFLOW stage from collapsing (docs/training.md). Default folders get a suffix _clip<C>")
    p.add_argument("--select-holdout", type=float, default=None, metavar="H",
                   help="not in the paper: choose best.pt on a share H (e.g. 0.1) of each split's training part, held out "
                   "from training, instead of on the validation part it is scored on (an honest early stopping; the "
                   "AFLOW stage of fe+af/rw+af keeps its own selection). Default folders get a suffix _holdout<H>")
    p.add_argument("--recipe", default="paper", choices=list(RECIPES),
                   help="paper: the paper's protocol; robust: not in the paper, the recipe our search chose without the "
                   f"validation parts ({', '.join(f'{k}={v}' for k, v in RECIPES['robust'].items())}; on Togo15 about as "
                   "accurate as paper, docs/results.md). Default folders get a suffix _<recipe>; the flags below "
                   "override its settings")
    p.add_argument("--loss", default=None, choices=LOSSES, help="not in the paper: the training loss, mape (MAPE in W/m/K, "
                   "the paper's) or log10 (mean absolute error of log10(LTC + 1)); default: the recipe's")
    p.add_argument("--megnet-lr", type=float, default=None, metavar="LR", help="not in the paper: MEGNet's own learning "
                   "rate (the head keeps --lr); default: the recipe's, else --lr")
    p.add_argument("--swa-epochs", type=int, default=None, metavar="N", help="not in the paper: final.pt is the mean of the "
                   "weights after each of the last N epochs (stochastic weight averaging); default: the recipe's, else none")
    p.add_argument("--freeze-megnet-epochs", type=int, default=None, metavar="N", help="not in the paper: MEGNet's "
                   "weights stay as they start for the first N epochs, only the head trains; default: the recipe's, else none")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many minutes, checked between epochs "
                   "(the epoch running then is finished and saved first; an AFLOW epoch takes about 16 s on one CPU thread); "
                   "re-run the same command to go on")
    p.add_argument("--processes", default="auto", help="on a CPU: processes sharing the splits, each with cores/N threads; "
                   "auto is one single-thread process per core, at most one per split (fastest; 1 = this process alone)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--base-url", default=None, metavar="URL", help="download the datasets and the published weights from this mirror "
                   "(a URL or folder laid out as <base>/<ParAIsite|CrabNet|matgl>/<path>; default: $PARAISITE_BASE_URL, "
                   "else GitHub)")
    p.add_argument("--ensemble", action="store_true", help="train the selected splits together as one vectorised model "
                   "(same results to float32 round-off); meant for a GPU, and on a CPU faster when it has several threads")
    p.add_argument("--fast-step", action="store_true", help="on a CPU: MEGNet's and the head's MLPs and MEGNet's "
                   "blocks as C++ autograd nodes with their backward written out (megnet_pt/fast_mlp.cpp, compiled on "
                   "first use: needs a C++ compiler and ninja); the same model, float32 sums in another order, about "
                   "1.3x faster a step (docs/performance.md). Default folders get a suffix _fast")
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
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DatasetError(f"--lr must be a positive number (got {args.lr})")
    if args.clip_grad_norm is not None and not (math.isfinite(args.clip_grad_norm) and args.clip_grad_norm > 0):
        raise DatasetError(f"--clip-grad-norm must be positive (got {args.clip_grad_norm})")
    if args.select_holdout is not None and not 0 < args.select_holdout < 1:
        raise DatasetError(f"--select-holdout must be between 0 and 1 (got {args.select_holdout})")
    if args.megnet_lr is not None and not (math.isfinite(args.megnet_lr) and args.megnet_lr > 0):
        raise DatasetError(f"--megnet-lr must be a positive number (got {args.megnet_lr})")
    if args.time_limit is not None and not (math.isfinite(args.time_limit) and args.time_limit > 0):
        raise DatasetError(f"--time-limit must be a positive number of minutes (got {args.time_limit})")
    if args.swa_epochs is not None and not 1 <= args.swa_epochs <= args.epochs:
        raise DatasetError(f"--swa-epochs must be between 1 and --epochs ({args.epochs}) (got {args.swa_epochs})")
    if args.freeze_megnet_epochs is not None and not 1 <= args.freeze_megnet_epochs <= args.epochs:
        raise DatasetError(f"--freeze-megnet-epochs must be between 1 and --epochs ({args.epochs}) "
                           f"(got {args.freeze_megnet_epochs})")
    return tests


def recipe_settings(args: argparse.Namespace) -> tuple[dict, dict]:
    """The settings of the run (its recipe's, overridden by flags given) and those of them that are not the recipe's."""
    recipe = RECIPES[args.recipe]
    given = {key: getattr(args, key) for key in RECIPE_SETTINGS if getattr(args, key) is not None}
    return recipe | given, {key: v for key, v in given.items() if recipe.get(key) != v}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    use_base_url(args.base_url)
    rank, tasks = 0, []
    try:
        with stop_on_signals():
            tests = validate_names(args)
            if args.processes != "auto" and not (args.processes.isdigit() and int(args.processes) >= 1):
                raise DatasetError(f"--processes takes auto or a number of processes (got {args.processes!r})")
            rank, world, local_rank = distributed()
            device = process_device(args.device, world, local_rank)
            settings, off_recipe = recipe_settings(args)
            if args.fast_step and (args.ensemble or device.type != "cpu"):
                raise DatasetError("--fast-step is one model at a time on a CPU: leave out --ensemble, use --device cpu")
            aflow_run = args.aflow_run or str(RunDir.default_aflow(args.init, settings.get("clip_grad_norm"),
                                                                   fast_step=args.fast_step))
            config = TrainConfig(init=args.init, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                                 lr=args.lr, seed=args.seed, aflow_run=aflow_run if "+af" in args.init else None,
                                 recipe=args.recipe, fast_step=args.fast_step, **settings)
            if "+af" in args.init and args.aflow_run:
                check_given_aflow_run(config, args.splits)
            run = (RunDir(args.run_dir) if args.run_dir
                   else RunDir.default(args.init, args.dataset, recipe=args.recipe, fast_step=args.fast_step, **off_recipe))
            tasks = build_job(config, args.splits, run, tests, args.ensemble, world, train_aflow=not args.aflow_run)
            if rank == 0 and not spawned():
                print(describe_job(tasks), file=sys.stderr)
            if args.fast_step:
                fast_ops()  # compiled here once (or found built), before any worker needs it
            if world == 1 and device.type == "cpu" and not args.ensemble:
                processes, threads = cpu_processes(args.processes, parallel_tasks(tasks))
                if processes > 1:  # the fastest path on a CPU: the tasks shared by single-thread processes
                    print(f"on this CPU ({cpu_cores()} cores): {processes} processes x {threads} thread(s) share the "
                          f"{len(tasks)} tasks (--processes 1: one process)", file=sys.stderr)
                    return spawn(__file__, argv, processes, threads)
            if rank == 0 and device.type == "cuda" and not args.ensemble and len(args.splits) > world:
                print("note: on CUDA, --ensemble trains the splits together and is several times faster "
                      "(docs/performance.md)", file=sys.stderr)
            deadline = time.monotonic() + 60 * args.time_limit if args.time_limit else None
            plan = Plan(device, args.ensemble, not args.no_cuda_graphs, deadline, not args.no_progress and rank == 0,
                        rank, world, JobClock(processes=world, rank=rank))
            done = run_job(tasks, plan)
    except (DatasetError, CheckpointError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only folder: one line, what was done is kept
        print(f"error: {os_error(exc, 'training')}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if not spawned():  # spawned: the launcher says it once for every process
            print(f"interrupted ({exc}): {describe_progress(tasks) if tasks else 'nothing trained'}; run the same "
                  f"command to resume: {resume_command(argv)}", file=sys.stderr)
        return exc.code
    if rank == 0:
        if done:
            print(f"done: {run}/summary.md")
            print((run.path / "summary.md").read_text())
        else:
            print(f"stopped before the end (time limit); run the same command again to resume {run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
