"""The job ``train.py`` runs: a list of (stage, splits) tasks, each trained once by whichever process is free.

    python train.py --init fe+af --dataset togo15
      stage FEAF      fe on aflow_agl into runs/fe_aflow_agl       tasks: split 1, ..., split 9
      stage FEAFTG15  fe+af on togo15 into runs/fe+af_togo15       tasks: split 1, ..., split 9  (k needs FEAF k)

A task is one split, or with ``--ensemble`` a group of splits stacked into one model (one group per process).
The list is built once (:func:`build_job`); every process (``--processes N``, torchrun) then runs the same loop
over it (:func:`run_job`):

    while a task is not finished:
        take the first task whose needs are finished and that no process holds (a lock file per split, which
        the kernel releases when its process dies): train it (resuming its state), score it; else wait

so that every task is trained exactly once, whichever process takes it, the processes stay busy while work is
ready, and a re-run resumes every unfinished task. When all are done, rank 0 writes each stage's reports.
Before any of it, rank 0 builds the graph caches and writes each run folder's ``config.json``; the other
processes then only read them.
"""
from __future__ import annotations

import functools
import os
import platform
import socket
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from megnet_pt.checkpoint import CheckpointError

from ..data.datasets import LTCDataset, dataset_folder, load_dataset, read_labels
from ..evaluation.paper_scale import PaperScale
from ..evaluation.report import collapsed, paper_name, plot_curves, plot_parity, read_csv, summary_markdown, write_csv
from .clock import JobClock, StageWork
from .loop import TrainConfig, check_aflow_checkpoint, evaluate_split, train
from .processes import barrier
from .provenance import check_folder, run_record
from .rundir import RunDir, RunDirError

try:
    import fcntl
except ImportError:  # not on a POSIX system: one process per job, no locks
    fcntl = None

POLL_SECONDS = 1.0  # how often a process with nothing ready looks again


@dataclass
class Stage:
    """One model of the paper (FEAF, FEAFTG15, ...): its settings, its run folder, the datasets it is scored on."""

    config: TrainConfig
    run: RunDir
    tests: list[str] = field(default_factory=list)  # besides its training set
    record: dict | None = None  # the run's record (provenance.run_record), once its inputs are known

    @property
    def name(self) -> str:
        return paper_name(self.config.init, self.config.dataset)

    @property
    def scored_on(self) -> list[str]:
        return list(dict.fromkeys([self.config.dataset, *self.tests]))


@dataclass
class Task:
    """Train and score ``splits`` of ``stage`` (more than one: stacked into one model), after ``needs``."""

    stage: Stage
    splits: list[int]
    needs: list["Task"] = field(default_factory=list)

    def __str__(self) -> str:
        which = f"split {self.splits[0]}" if len(self.splits) == 1 else f"splits {','.join(map(str, self.splits))}"
        return f"{self.stage.name} {which}"

    def finished(self) -> bool:
        return all(self.stage.run.evaluated(k, self.stage.scored_on) for k in self.splits)

    def trained(self) -> bool:
        return all(self.stage.run.finished(k) for k in self.splits)

    def ready(self) -> bool:
        return all(need.trained() for need in self.needs)


@dataclass
class Plan:
    """How to carry out a job; none of this changes its numbers (on the CPU)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    stacked: bool = False  # each task's splits trained together (--ensemble)
    cuda_graphs: bool = True
    deadline: float | None = None  # time.monotonic() value after which no new epoch starts
    progress: bool = True  # progress bars
    rank: int = 0
    world: int = 1
    clock: JobClock | None = None  # progress lines and the estimate of the time left


def build_job(config: TrainConfig, splits: list[int], run: RunDir, tests: list[str] = (), stacked: bool = False,
              world: int = 1, train_aflow: bool = True) -> list[Task]:
    """Every task of the job, in the order processes take them: for ``+af``, the AFLOW stage first (unless
    ``train_aflow`` is False: an ``--aflow-run`` given by the user, finished, is an input, not a stage)."""
    stages = [Stage(config, run, list(tests))]
    if config.aflow_run and train_aflow:
        stages.insert(0, Stage(config.aflow_stage(), RunDir(config.aflow_run)))
    groups = ([g for g in (splits[r::world] for r in range(world)) if g] if stacked else [[k] for k in splits])
    tasks: list[Task] = []
    for i, stage in enumerate(stages):
        before = {tuple(t.splits): t for t in tasks if t.stage is stages[i - 1]} if i else {}
        tasks += [Task(stage, g, [before[tuple(g)]] if before else []) for g in groups]
    return tasks


def stages_of(tasks: list[Task]) -> list[Stage]:
    return list({id(t.stage): t.stage for t in tasks}.values())


def describe_job(tasks: list[Task]) -> str:
    """What a job will train, up front: each stage's models, epochs and folder, and what is already done."""
    parts = []
    for stage in stages_of(tasks):
        splits = [k for t in tasks if t.stage is stage for k in t.splits]
        done = [k for k in splits if stage.run.finished(k)]
        cfg = stage.config
        parts.append(f"{len(splits)} {stage.name} model(s) ({cfg.init} on {cfg.dataset}, {cfg.epochs} epochs each) "
                     f"into {stage.run}" + (" (the AFLOW stage)" if cfg.dataset == "aflow_agl" and len(tasks) > len(splits)
                                             else "") + (f", {len(done)} already finished" if done else ""))
    models = sum(len(t.splits) for t in tasks)
    splits = sorted({k for t in tasks for k in t.splits})
    return "plan: " + ", then ".join(parts) + f"; {models} models in all, split(s) {','.join(map(str, splits))}"


def describe_progress(tasks: list[Task]) -> str:
    """Where the unfinished tasks stand on disk: what a re-run resumes from."""
    started = []
    for task in tasks:
        if not task.trained():
            run, k = task.stage.run, task.splits[0]
            epochs = len(read_csv(run.curve(k))) if run.curve(k).is_file() else 0
            if epochs:
                started.append(f"{task} at epoch {epochs} of {task.stage.config.epochs}")
    done = sum(t.trained() for t in tasks)
    return f"{done} of {len(tasks)} tasks trained" + (f", {', '.join(started)} saved" if started else "")


def parallel_tasks(tasks: list[Task]) -> int:
    """How many unfinished tasks one stage still has: the most processes the job can keep busy."""
    return max([sum(not t.trained() for t in tasks if t.stage is s) for s in stages_of(tasks)] or [0])


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


# --- before training: data and config.json -------------------------------------------------------

def recorded_config(config: TrainConfig, data: LTCDataset) -> dict:
    """What ``config.json`` holds: the settings, and the digest of the inputs the run is trained on."""
    return config.to_dict() | {"inputs": {data.name: data.sources_sha256}}


def check_finished_aflow_models(tasks: list[Task]) -> None:
    """A ``+af`` job whose AFLOW models are already there: each must be the one it needs (nothing written yet)."""
    for task in tasks:
        config = task.stage.config
        for k in task.splits if config.aflow_run else []:
            if RunDir(config.aflow_run).finished(k):
                check_aflow_checkpoint(RunDir(config.aflow_run), config.init, k, config.cutoff)


def prepare(tasks: list[Task], plan: Plan) -> dict[int, dict[str, LTCDataset]]:
    """The datasets of every stage with work left (and of the job's own stage), by ``id(stage)``, each run folder's
    ``config.json`` checked or written; rank 0 first (it builds the graph caches), then the others.

    A finished AFLOW stage is not loaded, but its settings are still checked (without the inputs' digest)."""
    check_finished_aflow_models(tasks)
    datasets: dict[int, dict[str, LTCDataset]] = {}
    stages = stages_of(tasks)

    def load() -> None:
        for stage in stages:
            loaded = None
            if stage is stages[-1] or not all(t.finished() for t in tasks if t.stage is stage):
                loaded = {n: load_dataset(n, cutoff=stage.config.cutoff, progress=plan.progress and plan.rank == 0)
                          for n in stage.scored_on}
                datasets[id(stage)] = loaded
            config = recorded_config(stage.config, loaded[stage.config.dataset]) if loaded else stage.config.to_dict()
            stage.record = run_record(config)
            try:  # the files first: config.json is then written (or rebuilt) only for a folder that holds this run
                check_folder(stage.run, stage.record)
                stage.run.check_config(config, TrainConfig().to_dict(), rebuild_damaged=True)
            except (CheckpointError, RunDirError) as exc:
                if stage is stages[-1]:
                    raise
                raise type(exc)(f"{exc} [the AFLOW stage of this job: to start from the models there as they are, "
                                f"name the folder with --aflow-run {stage.run}]") from exc
        for stage in stages:  # an --aflow-run given by the user: its models must be of the run its config.json names
            aflow = RunDir(stage.config.aflow_run) if stage.config.aflow_run else None
            if aflow is not None and not any(s.run.path == aflow.path for s in stages) and aflow.read_config():
                check_folder(aflow, run_record(aflow.read_config()))

    if plan.rank == 0:
        load()
    barrier(plan.world)
    if plan.rank != 0:
        load()
    return datasets


# --- the loop every process runs -----------------------------------------------------------------

@contextmanager
def claim(task: Task) -> Iterator[bool]:
    """Hold every split of ``task`` (True), or none when another process holds one (False).

    One lock file per split, ``flock``ed: the kernel lets go of it when its process ends, however it ends.
    """
    if fcntl is None:
        yield True
        return
    with ExitStack() as held:
        for k in task.splits:
            path = task.stage.run.lock(k)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = held.enter_context(open(path, "a+"))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
        yield True


def run_job(tasks: list[Task], plan: Plan) -> bool:
    """Train and score tasks until none is left (True) or the deadline passes (False); see the module docstring."""
    datasets = prepare(tasks, plan)
    scales = {id(s): paper_scale(s, datasets[id(s)]) for s in stages_of(tasks) if id(s) in datasets}
    if plan.clock is not None:
        for stage in stages_of(tasks):
            splits = [k for t in tasks if t.stage is stage for k in t.splits]
            data = datasets.get(id(stage), {}).get(stage.config.dataset)
            n_train = len(data.training_parts(splits[0], stage.config.select_holdout)[0]) if data else 0
            plan.clock.add(StageWork(stage.name, stage.run, splits, stage.config.epochs, n_train))
    work(tasks, datasets, scales, plan)
    barrier(plan.world)  # every process has stopped: finished, or at the deadline
    if plan.rank == 0:
        for stage in stages_of(tasks):
            if all(t.finished() for t in tasks if t.stage is stage):
                write_reports(stage.run, stage.config, plan.device)
    return all(t.finished() for t in tasks)


def work(tasks: list[Task], datasets: dict[int, dict[str, LTCDataset]], scales: dict[int, PaperScale | None],
         plan: Plan) -> None:
    """This process's part: take tasks until none is left or the deadline has passed (checked between epochs, as
    in the loop: the first epoch of the first task is always trained)."""
    started = False
    while True:
        todo = [t for t in tasks if not t.finished()]
        if not todo or (started and plan.deadline is not None and time.monotonic() > plan.deadline):
            return
        for task in (t for t in todo if t.ready()):
            with claim(task) as mine:
                if mine and not task.finished():  # another process may have finished it since the look
                    started = True
                    if not run_task(task, datasets[id(task.stage)], scales[id(task.stage)], plan):
                        return
                    break
        else:
            started = True  # waiting counts as time spent: past the deadline, stop waiting
            time.sleep(POLL_SECONDS)  # what is left is held by other processes, or waits for their tasks


def paper_scale(stage: Stage, datasets: dict[str, LTCDataset]) -> PaperScale | None:
    # the module of a +af model carries AFLOW's scaler upstream (paraisite/evaluation/paper_scale.py); float32, as LTCDataset.ltc
    aflow_ltc = (torch.tensor(read_labels(dataset_folder("aflow_agl") / "labels.csv")[2], dtype=torch.float32)
                 if stage.config.aflow_run else None)
    return PaperScale.for_run(stage.config.init, datasets[stage.config.dataset], aflow_ltc)


def run_task(task: Task, datasets: dict[str, LTCDataset], scale: PaperScale | None, plan: Plan) -> bool:
    """Train the task's splits (resuming) and score each; False when the deadline stopped it."""
    stage, run = task.stage, task.stage.run
    on_epoch = functools.partial(plan.clock.epoch_done, stage.name) if plan.clock is not None else None
    if not train(datasets[stage.config.dataset], task.splits, stage.config, run, plan.device, plan.stacked,
                 plan.deadline, plan.progress, plan.cuda_graphs, on_epoch):
        return False
    for k in task.splits:
        if run.evaluated(k, list(datasets)):
            continue
        rows, preds = evaluate_split(k, run, datasets, plan.device, scale, stage.record)
        for r in collapsed(rows, stage.config.dataset):
            print(f"warning: {run.checkpoint(k, r['selection'])} (epoch {r['epoch']}) collapsed: "
                  f"{float(r['share_nonpositive']):.0%} of its {stage.config.dataset} validation predictions are "
                  "<= 0 W/m/K (docs/training.md)", file=sys.stderr)
        write_csv(run.predictions(k), preds)
        write_csv(run.results(k), rows)
    return True


# --- after training: the reports of a run folder --------------------------------------------------

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
                               config.off_paper(), config.fast_step)
    (run.path / "summary.md").write_text(summary + "\n")
    name = paper_name(config.init, config.dataset)
    plot_curves(curves, run.path / "curves.png", f"{name}: MAPE per epoch")
    own = [r for r in predictions if r["test_dataset"] == config.dataset]
    plot_parity(own, run.path / "parity.png", f"{name}: validation, {len(splits)} split(s)")
