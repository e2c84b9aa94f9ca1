"""How far a training job has got, and when it will end at the pace seen so far.

A job is one or two stages (for ``+af``: the AFLOW stage, then the target
dataset), each a set of splits of ``epochs`` epochs over ``n_train``
structures, shared by ``processes`` processes. Work is counted in
structure-epochs; the pace is the wall time per structure-epoch measured on
this process's own epochs, so the estimate of a stage not yet started scales
with its size, and the whole job's work left is shared by the processes.
Lines are printed (not redrawn), so they stay in a log: after the first two
epochs, then about every minute; with several processes each prints its own,
named after it.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TextIO

from tqdm import tqdm

from .rundir import RunDir


@dataclass
class StageWork:
    """The work of one stage of the job: every split of it, whichever process trains it."""

    name: str
    run: RunDir
    splits: list[int]
    epochs: int
    n_train: int

    def epochs_done(self, k: int) -> int:
        if self.run.finished(k):
            return self.epochs
        curve = self.run.curve(k)
        if not curve.is_file():
            return 0
        with open(curve) as f:
            return max(0, sum(1 for _ in f) - 1)

    def units_left(self) -> int:
        return sum(self.epochs - min(self.epochs, self.epochs_done(k)) for k in self.splits) * self.n_train


def duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes < 1:
        return "under a minute"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


@dataclass
class JobClock:
    processes: int = 1
    rank: int = 0
    every: float = 60.0  # seconds between progress lines
    out: TextIO = field(default=sys.stderr)
    stages: list[StageWork] = field(default_factory=list)
    seconds: float = 0.0  # measured: wall time of the epochs trained so far ...
    units: int = 0  # ... and the structure-epochs they covered
    epochs_seen: int = 0
    last_line: float = field(default_factory=time.monotonic)

    def add(self, stage: StageWork) -> None:
        if stage.name not in [s.name for s in self.stages]:
            self.stages.append(stage)

    def estimate(self) -> float | None:
        """Seconds left for the whole job, its work shared by the processes; None before an epoch is timed."""
        if not self.units:
            return None
        return self.seconds / self.units * sum(s.units_left() for s in self.stages) / self.processes

    def epoch_done(self, stage_name: str, splits: list[int], epoch: int, seconds: float) -> None:
        stage = next(s for s in self.stages if s.name == stage_name)
        self.seconds += seconds
        self.units += stage.n_train * len(splits)
        self.epochs_seen += 1
        now = time.monotonic()
        if self.epochs_seen <= 2 or now - self.last_line >= self.every or epoch == stage.epochs:
            self.last_line = now
            tqdm.write(self.line(stage, splits, epoch, seconds), file=self.out)  # above a progress bar, not into it

    def line(self, stage: StageWork, splits: list[int], epoch: int, seconds: float) -> str:
        which = f"split {splits[0]}" if len(splits) == 1 else f"splits {','.join(map(str, splits))}"
        left = self.estimate()
        who = f"process {self.rank + 1} of {self.processes}: " if self.processes > 1 else ""
        end = (datetime.now(timezone.utc) + timedelta(seconds=left)).strftime("%H:%M UTC") if left is not None else "?"
        done = sum(s.run.finished(k) for s in self.stages for k in s.splits)
        models = sum(len(s.splits) for s in self.stages)
        return (f"{who}[{stage.name}] {which}, epoch {epoch} of {stage.epochs}, {seconds:.1f} s/epoch; whole job: "
                f"{done} of {models} models done, about {duration(left or 0)} left (ends near {end})")
