"""The run folder: the one place that knows its layout.

``python train.py --init I --dataset D`` writes ``runs/<I>_<D>[_clip<C>][_holdout<H>]/``:

    config.json                  the settings that define the run (two runs in one folder must agree)
    state_<k1>-<k2>-....pt       resume state of the splits being trained together (one split: state_<k>.pt)
    .split<k>.lock               held by the process training split k (the kernel lets go when it ends)
    split<k>/best.pt             the model of the epoch chosen on the selection part
    split<k>/final.pt            the model after the last epoch; its presence means split k is finished
    split<k>/curve.csv           one row per epoch
    split<k>/results.csv         metrics of best and final on each scored dataset
    split<k>/predictions.csv     per-structure predictions behind them
    results.csv, predictions.csv, summary.md, curves.png, parity.png   the whole run

No torch here: ``scripts/make_results.py`` reads run folders without it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

SELECTIONS = ("best", "final")
_STATE = re.compile(r"state_([0-9]+(?:-[0-9]+)*)\.pt")


class RunDirError(ValueError):
    """A run folder that does not hold what is asked of it (the message says which and why)."""


class RunDir:
    """Paths, the finished rule, checkpoints, resume states and the config of one run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # --- names ------------------------------------------------------------------------------

    @staticmethod
    def suffix(clip_grad_norm: float | None = None, select_holdout: float | None = None, *, recipe: str = "paper",
               loss: str | None = None, megnet_lr: float | None = None, swa_epochs: int | None = None,
               freeze_megnet_epochs: int | None = None, fast_step: bool = False) -> str:
        """``_<recipe>``, ``_clip<C>``, ``_holdout<H>``, ``_<loss>``, ``_megnetlr<L>``, ``_swa<N>``, ``_freeze<N>``, ``_fast``:
        runs off the paper's protocol, or of the fast step, never share its folders (the settings given are those not
        already the recipe's)."""
        return "".join([
            f"_{recipe}" if recipe != "paper" else "",
            f"_clip{clip_grad_norm:g}" if clip_grad_norm else "",
            f"_holdout{select_holdout:g}" if select_holdout else "",
            f"_{loss}" if loss else "",
            f"_megnetlr{megnet_lr:g}" if megnet_lr else "",
            f"_swa{swa_epochs}" if swa_epochs else "",
            f"_freeze{freeze_megnet_epochs}" if freeze_megnet_epochs else "",
            "_fast" if fast_step else "",
        ])

    @classmethod
    def default(cls, init: str, dataset: str, clip_grad_norm: float | None = None,
                select_holdout: float | None = None, root: str | Path = "runs", **off_paper: Any) -> "RunDir":
        """``runs/<init>_<dataset name><suffix>`` (``off_paper``: the keywords of :meth:`suffix`)."""
        return cls(Path(root) / f"{init}_{Path(dataset).name}{cls.suffix(clip_grad_norm, select_holdout, **off_paper)}")

    @classmethod
    def default_aflow(cls, init: str, clip_grad_norm: float | None = None, root: str | Path = "runs",
                      fast_step: bool = False) -> "RunDir":
        """The AFLOW-stage run a ``+af`` init starts from: ``runs/<fe|rw>_aflow_agl[_clip<C>][_fast]``."""
        return cls.default(init.split("+")[0], "aflow_agl", clip_grad_norm, None, root, fast_step=fast_step)

    # --- one split --------------------------------------------------------------------------

    def split(self, k: int) -> Path:
        return self.path / f"split{k}"

    def checkpoint(self, k: int, selection: str) -> Path:
        if selection not in SELECTIONS:
            raise RunDirError(f"selection must be one of {', '.join(SELECTIONS)} (got {selection!r})")
        return self.split(k) / f"{selection}.pt"

    def curve(self, k: int) -> Path:
        return self.split(k) / "curve.csv"

    def results(self, k: int | None = None) -> Path:
        return (self.split(k) if k is not None else self.path) / "results.csv"

    def predictions(self, k: int | None = None) -> Path:
        return (self.split(k) if k is not None else self.path) / "predictions.csv"

    def lock(self, k: int) -> Path:
        """The lock file of split ``k``, held (``flock``) by the process training it (paraisite.training.job)."""
        return self.path / f".split{k}.lock"

    def finished(self, k: int) -> bool:
        """Split ``k`` trained to its last epoch: ``final.pt`` (and ``best.pt``) written.

        ``best.pt`` alone proves nothing: it is written whenever the selection
        loss improves, long before the last epoch.
        """
        return self.checkpoint(k, "final").is_file() and self.checkpoint(k, "best").is_file()

    def evaluated(self, k: int, datasets: list[str]) -> bool:
        """Split ``k`` finished and scored on every dataset of ``datasets``."""
        path = self.results(k)
        if not (self.finished(k) and path.is_file()):
            return False
        with open(path, newline="") as f:
            return set(datasets) <= {row["test_dataset"] for row in csv.DictReader(f)}

    def splits(self) -> list[int]:
        """The split indices that have a folder, ascending."""
        if not self.path.is_dir():
            return []
        return sorted(int(d.name[5:]) for d in self.path.iterdir()
                      if d.is_dir() and d.name.startswith("split") and d.name[5:].isdigit())

    def finished_checkpoints(self, selection: str = "best") -> list[tuple[int, Path]]:
        """``(k, split<k>/<selection>.pt)`` of every split, refusing a run with any split unfinished.

        So that an ensemble never silently misses a member or takes one that is half trained.
        """
        if selection not in SELECTIONS:
            raise RunDirError(f"--selection must be one of {', '.join(SELECTIONS)} (got {selection!r})")
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run folder; train one first (python train.py --init fe+af "
                              "--dataset togo15 writes runs/fe+af_togo15) or name another with --models")
        splits = self.splits()
        if not splits:
            raise RunDirError(f"{self.path}: no split<k>/ folders; is this a run folder written by train.py?")
        training = [k for k in splits if not self.checkpoint(k, "final").is_file()]
        if training:
            raise RunDirError(f"{self.path}: split(s) {','.join(map(str, training))} are not finished (no final.pt): "
                              "still training? re-run the train.py command to finish them")
        missing = [k for k in splits if not self.checkpoint(k, selection).is_file()]
        if missing:
            raise RunDirError(f"{self.path}: split(s) {','.join(map(str, missing))} have no {selection}.pt "
                              f"({'still training? re-run train.py to finish them' if selection == 'final' else 'not trained yet'})")
        return [(k, self.checkpoint(k, selection)) for k in splits]

    # --- resume states ----------------------------------------------------------------------

    def state(self, splits: list[int]) -> Path:
        """The resume state of ``splits`` trained together, named after them so that processes never collide."""
        return self.path / f"state_{'-'.join(map(str, splits))}.pt"

    def states(self) -> list[tuple[Path, list[int]]]:
        """Every resume state in the folder and its splits."""
        if not self.path.is_dir():
            return []
        found = [(p, _STATE.fullmatch(p.name)) for p in sorted(self.path.glob("state_*.pt"))]
        return [(p, [int(v) for v in m.group(1).split("-")]) for p, m in found if m]

    # --- config -----------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    def read_config(self) -> dict[str, Any] | None:
        """The settings in ``config.json`` (None without one); a damaged one is a :class:`RunDirError` naming it."""
        if not self.config_path.is_file():
            return None
        try:
            config = json.loads(self.config_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{self.config_path}: not valid JSON ({exc}); the run's settings are also recorded in "
                              "each of its model files: re-run the command that trained it to rebuild it") from exc
        if not isinstance(config, dict):
            raise RunDirError(f"{self.config_path}: not a run's settings (a JSON object was expected)")
        return config

    def check_config(self, config: dict[str, Any], defaults: dict[str, Any] | None = None,
                     rebuild_damaged: bool = False) -> None:
        """Write ``config.json`` on first use; refuse a folder that holds a run with other settings.

        Processes that start on one new folder at once (one split each) may all
        write it: each through a file of its own, and each then compares its
        settings with the one that landed. A setting missing from an older
        config.json counts as its value in ``defaults`` (what runs had before the
        setting existed), else None; ``inputs`` (the digest of the training
        data) missing there is not known, so not compared. With
        ``rebuild_damaged`` (the caller has checked that every model file in
        the folder is of this run), a damaged ``config.json`` is kept as
        ``config.json.damaged`` and written again.
        """
        current = _normalised(config)
        if rebuild_damaged and self.config_path.is_file():
            try:
                self.read_config()
            except RunDirError as exc:
                os.replace(self.config_path, self.config_path.with_name("config.json.damaged"))
                print(f"warning: {exc.args[0].split(';')[0]}; kept as config.json.damaged and written again from "
                      "this command's settings, which every model file in the folder carries", file=sys.stderr)
        if not self.config_path.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            tmp = self.config_path.with_name(f"config.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(current, indent=2) + "\n")
            os.replace(tmp, self.config_path)
        stored = _normalised((defaults or {}) | (self.read_config() or {}))
        # aflow_run too: +af models that started from other AFLOW models must not be taken as finished
        diff = config_differences(stored, current)
        if "inputs" in diff:
            raise RunDirError(f"{self.path} was trained on other inputs: labels.csv or the structure files of "
                              f"{', '.join(current['inputs'])} changed since (sha256 {diff['inputs'][0]} there, "
                              f"{diff['inputs'][1]} now); its models and metrics are not of these data: use another "
                              "--run-dir or delete it")
        if diff:
            shown = ", ".join(f"{key}: {a!r} there, {b!r} now" for key, (a, b) in diff.items())
            raise RunDirError(f"{self.path} holds a run with other settings ({shown}); use another --run-dir or delete it")


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (a's value, b's value)}`` where two run configs differ.

    A setting one lacks counts as None (it was added to train.py after that
    run); ``inputs``, the digest of the training data recorded since
    2026-12-01, is compared only where both have it.
    """
    keys = dict.fromkeys([*a, *b])
    return {key: (a.get(key), b.get(key)) for key in keys
            if a.get(key) != b.get(key) and not (key == "inputs" and (key not in a or key not in b))}


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    out = dict(config)
    if out.get("aflow_run"):
        out["aflow_run"] = os.path.normpath(out["aflow_run"])
    return out
