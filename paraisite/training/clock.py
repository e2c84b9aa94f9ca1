"""How far a training job has got, and when it will end at the pace seen so far.

A job is one or two stages (for ``+af``: the AFLOW stage, then the target
dataset), each a set of splits of ``epochs`` epochs over ``n_train``
structures. Work is counted in structure-epochs; the pace is the wall time
per structure-epoch measured on this job's own epochs, so the estimate of a
stage not yet started scales with its size. Lines are printed (not redrawn),
so they stay in a log: after the first two epochs, then about every minute.
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
class Stage:
    name: str
    run: RunDir
    splits: list[int]  # this process's share
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
    every: float = 60.0  # seconds between progress lines
    out: TextIO = field(default=sys.stderr)
    stages: list[Stage] = field(default_factory=list)
    seconds: float = 0.0  # measured: wall time of the epochs trained so far ...
    units: int = 0  # ... and the structure-epochs they covered
    epochs_seen: int = 0
    last_line: float = field(default_factory=time.monotonic)

    def add(self, stage: Stage) -> None:
        if stage.name not in [s.name for s in self.stages]:
            self.stages.append(stage)

    def estimate(self) -> float | None:
        """Seconds left for this process's share of the whole job; None before an epoch is timed."""
        if not self.units:
            return None
        return self.seconds / self.units * sum(s.units_left() for s in self.stages)

    def epoch_done(self, stage_name: str, splits: list[int], epoch: int, seconds: float) -> None:
        stage = next(s for s in self.stages if s.name == stage_name)
        self.seconds += seconds
        self.units += stage.n_train * len(splits)
        self.epochs_seen += 1
        now = time.monotonic()
        if self.epochs_seen <= 2 or now - self.last_line >= self.every or epoch == stage.epochs:
            self.last_line = now
            tqdm.write(self.line(stage, splits, epoch, seconds), file=self.out)  # above a progress bar, not into it

    def line(self, stage: Stage, splits: list[int], epoch: int, seconds: float) -> str:
        which = f"split {splits[0]}" if len(splits) == 1 else f"splits {','.join(map(str, splits))}"
        place = f"{which} ({stage.splits.index(splits[0]) + 1} of {len(stage.splits)})" if len(splits) == 1 else which
        left = self.estimate()
        share = " for this process's share" if self.processes > 1 else ""
        end = (datetime.now(timezone.utc) + timedelta(seconds=left)).strftime("%H:%M UTC") if left is not None else "?"
        return (f"[{stage.name}] {place}, epoch {epoch} of {stage.epochs}, {seconds:.1f} s/epoch; whole job: about "
                f"{duration(left or 0)} left{share} (ends near {end})")
