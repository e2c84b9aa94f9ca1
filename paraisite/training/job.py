"""The paper's protocol for one model: train each split, score it, report; the AFLOW stage first for ``+af``.

    config (what defines the run) + plan (how to carry it out)
      -> [+af: the AFLOW stage of the same splits, trained first where unfinished]
      -> per split: train (paraisite.training.loop.train), score on every test set (evaluate_split)
      -> results.csv, predictions.csv, summary.md, curves.png, parity.png

Under torchrun each process takes every ``world``-th split; rank 0 writes
``config.json`` and builds the graph caches before the others read them.
"""
from __future__ import annotations

import functools
import platform
import sys
from dataclasses import dataclass, field

import torch

from megnet_pt.checkpoint import CheckpointError

from ..data.datasets import LTCDataset, dataset_folder, load_dataset, read_labels
from .clock import JobClock, Stage
from ..evaluation.paper_scale import PaperScale
from .processes import barrier
from ..evaluation.report import collapsed, paper_name, plot_curves, plot_parity, read_csv, summary_markdown, write_csv
from .rundir import RunDir
from .loop import TrainConfig, check_aflow_checkpoint, evaluate_split, split_groups, train


@dataclass
class Plan:
    """How to carry out a run; none of this changes its numbers (on the CPU)."""

    splits: list[int]
    run: RunDir
    tests: list[str] = field(default_factory=list)  # datasets scored besides the training set
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stacked: bool = False  # the splits of each process trained together (--ensemble)
    cuda_graphs: bool = True
    deadline: float | None = None  # time.monotonic() value after which no new epoch starts
    progress: bool = True
    rank: int = 0
    world: int = 1
    clock: JobClock | None = None  # progress lines and the estimate of the time left (rank 0)

    def for_aflow_stage(self, config: TrainConfig, splits: list[int]) -> "Plan":
        return Plan(splits, RunDir(config.aflow_run), [], self.device, self.stacked, self.cuda_graphs, self.deadline,
                    self.progress, self.rank, self.world, self.clock)


def check_given_aflow_run(config: TrainConfig, splits: list[int]) -> None:
    """An ``--aflow-run`` named by the user must hold a finished AFLOW stage of every split (nothing is written)."""
    aflow = RunDir(config.aflow_run)
    gone = [k for k in splits if not aflow.checkpoint(k, "best").is_file()]
    if gone:
        raise CheckpointError(f"--aflow-run {aflow}: no AFLOW model for split(s) {gone} (expected {aflow.checkpoint(gone[0], 'best')})")
    unfinished = [k for k in splits if not aflow.finished(k)]
    if unfinished:
        raise CheckpointError(f"--aflow-run {aflow}: the AFLOW stage of split(s) {unfinished} is unfinished (best.pt but no "
                              f"final.pt); finish it first (python train.py --init {config.init.split('+')[0]} --dataset "
                              f"aflow_agl --run-dir {aflow} with its --epochs), or leave out --aflow-run to have it trained here")


def hardware(device: torch.device) -> str:
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    return f"Hardware: {name}; torch {torch.__version__}."


def write_reports(run: RunDir, config: TrainConfig, device: torch.device) -> None:
    """results.csv, predictions.csv, summary.md and plots from every scored split of the run."""
    splits = [k for k in run.splits() if run.results(k).is_file()]
    results, predictions, curves = [], [], {}
    for k in splits:
        results += read_csv(run.results(k))
        predictions += read_csv(run.predictions(k))
        curves[k] = read_csv(run.curve(k))
    write_csv(run.results(), results)
    write_csv(run.predictions(), predictions)
    summary = summary_markdown(results, config.init, config.dataset, hardware(device), config.select_holdout,
                               config.off_paper())
    (run.path / "summary.md").write_text(summary + "\n")
    name = paper_name(config.init, config.dataset)
    plot_curves(curves, run.path / "curves.png", f"{name}: MAPE per epoch")
    own = [r for r in predictions if r["test_dataset"] == config.dataset]
    plot_parity(own, run.path / "parity.png", f"{name}: validation, {len(splits)} split(s)")


def recorded_config(config: TrainConfig, data: LTCDataset) -> dict:
    """What ``config.json`` holds: the settings, and the digest of the inputs the run is trained on."""
    return config.to_dict() | {"inputs": {data.name: data.sources_sha256}}


def _datasets(config: TrainConfig, plan: Plan, needs_stage: bool) -> dict[str, LTCDataset]:
    """The datasets (graph caches built into ./data first); then each run folder's config.json is checked or written."""
    names = dict.fromkeys([config.dataset, *plan.tests])
    datasets = {name: load_dataset(name, cutoff=config.cutoff, progress=plan.progress) for name in names}
    if needs_stage:
        aflow = load_dataset("aflow_agl", cutoff=config.cutoff, progress=plan.progress)
        RunDir(config.aflow_run).check_config(recorded_config(config.aflow_stage(), aflow), TrainConfig().to_dict())
    plan.run.check_config(recorded_config(config, datasets[config.dataset]), TrainConfig().to_dict())
    return datasets


def run_protocol(config: TrainConfig, plan: Plan, report: bool = True) -> bool:
    """Train and score this process's share of ``plan.splits``; True when every split of the plan is scored."""
    mine = plan.splits[plan.rank :: plan.world]
    aflow = RunDir(config.aflow_run) if config.init in ("fe+af", "rw+af") else None
    needs_stage = aflow is not None and any(not aflow.finished(k) for k in plan.splits)
    if aflow is not None:  # before anything is written: a refused AFLOW model leaves no config.json behind
        for k in mine:
            if aflow.finished(k):
                check_aflow_checkpoint(aflow, config.init, k, config.cutoff)
    # Under torchrun, rank 0 writes config.json and builds the graph caches; the others then only read them.
    datasets = _datasets(config, plan, needs_stage) if plan.rank == 0 else {}
    barrier(plan.world)
    if plan.rank != 0:
        datasets = _datasets(config, plan, needs_stage)
    data = datasets[config.dataset]
    name = paper_name(config.init, config.dataset)
    on_epoch = None
    if plan.clock is not None and mine:
        n_train = len(data.training_parts(mine[0], config.select_holdout)[0])
        plan.clock.add(Stage(name, plan.run, mine, config.epochs, n_train))
        on_epoch = functools.partial(plan.clock.epoch_done, name)
    if aflow is not None:
        missing = [k for k in mine if not aflow.finished(k)]  # never started or interrupted: trained or resumed here
        if missing:
            stage = config.aflow_stage()
            print(f"AFLOW stage of split(s) {missing} not finished in {aflow}: training it first ({stage.init}, aflow_agl)",
                  file=sys.stderr)
            if not run_protocol(stage, plan.for_aflow_stage(config, missing), report=plan.world == 1):
                return False
    # the module of a +af model carries AFLOW's scaler upstream (paraisite/evaluation/paper_scale.py); float32, as LTCDataset.ltc
    aflow_ltc = (torch.tensor(read_labels(dataset_folder("aflow_agl") / "labels.csv")[2], dtype=torch.float32)
                 if aflow is not None else None)
    paper_scale = PaperScale.for_run(config.init, data, aflow_ltc)
    run = plan.run
    for group in split_groups(mine, plan.stacked):
        if not train(data, group, config, run, plan.device, plan.stacked, plan.deadline, plan.progress, plan.cuda_graphs,
                     on_epoch):
            return False
        for k in group:
            if run.evaluated(k, list(datasets)):
                continue
            rows, preds = evaluate_split(k, run, datasets, plan.device, paper_scale)
            for r in collapsed(rows, config.dataset):
                print(f"warning: {run.checkpoint(k, r['selection'])} (epoch {r['epoch']}) collapsed: "
                      f"{float(r['share_nonpositive']):.0%} of its {config.dataset} validation predictions are "
                      "<= 0 W/m/K (docs/training.md)", file=sys.stderr)
            write_csv(run.predictions(k), preds)
            write_csv(run.results(k), rows)
    if report and plan.world == 1 and all(run.results(k).is_file() for k in plan.splits):
        write_reports(run, config, plan.device)
    return True


def finish_distributed(config: TrainConfig, plan: Plan) -> bool:
    """After every process is done (rank 0): the reports of the run and of its AFLOW stage."""
    done = all(plan.run.results(k).is_file() for k in plan.splits)
    if done:
        write_reports(plan.run, config, plan.device)
        aflow = RunDir(config.aflow_run) if config.aflow_run else None
        if aflow is not None and aflow.path.is_dir():
            write_reports(aflow, config.aflow_stage(), plan.device)
    return done


def describe_job(config: TrainConfig, splits: list[int], run: RunDir) -> str:
    """What a job will train, up front: each stage's models, epochs and folder, and what is already done."""
    def stage(cfg: TrainConfig, folder: RunDir) -> str:
        done = [k for k in splits if folder.finished(k)]
        return (f"{len(splits)} {paper_name(cfg.init, cfg.dataset)} model(s) ({cfg.init} on {cfg.dataset}, {cfg.epochs} "
                f"epochs each) into {folder}" + (f", {len(done)} already finished" if done else ""))

    parts = [stage(config, run)]
    if config.aflow_run:
        parts.insert(0, stage(config.aflow_stage(), RunDir(config.aflow_run)) + " (the AFLOW stage)")
    total = len(splits) * len(parts)
    return "plan: " + ", then ".join(parts) + f"; {total} models in all, split(s) {','.join(map(str, splits))}"


def describe_start(config: TrainConfig, plan: Plan) -> str:
    return (f"{paper_name(config.init, config.dataset)}: split(s) {','.join(map(str, plan.splits))} of "
            f"{config.dataset} into {plan.run}")
