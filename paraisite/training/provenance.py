"""What a model file or resume state belongs to, and the check every reader of one makes.

Every ``split<k>/best.pt``, ``final.pt`` and ``state_<k>.pt`` written by the loop carries, beside its split,
stage (``init``, ``dataset``) and selection, the record of its run:

    run = {"settings": the TrainConfig that made it, less where its folders are (aflow_run),
           "inputs":   {dataset: sha256 of labels.csv and of every structure file}}

so that ``config.json`` is never the only record. Every reader checks a file against what it expects and
refuses it with what differs: resuming (the state's run is the command's), scoring again (split, selection and
run are the folder's), a ``+af`` start (the AFLOW model is of every setting the AFLOW stage derives from the
command), screening (every member of the split of its folder, all of one run), and a run folder as a whole
(:func:`check_folder`: every file in it is of the run the command asks for, checked before ``config.json`` is
written, so that a folder whose ``config.json`` was deleted, edited or damaged is rebuilt from its files or
refused, never relabelled). Files written before the record existed carry none: only their split, stage and
selection are checked.
"""
from __future__ import annotations

from typing import Any

from megnet_pt.checkpoint import CheckpointError, load_plain

from .rundir import SELECTIONS, RunDir

NOT_RECORDED = ("aflow_run",)  # where a run's folders are, not what it is
ADDED_LATER = {"fast_step": False}  # settings newer than some files: a file without one was made at this value


def run_record(config: dict[str, Any], inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The record of a run: its settings (a ``TrainConfig.to_dict()``) and, when known, its inputs' digests."""
    settings = {k: v for k, v in config.items() if k not in NOT_RECORDED and k != "inputs"}
    return {"settings": settings, "inputs": dict(inputs if inputs is not None else config.get("inputs") or {})}


def record_differences(recorded: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """What differs between two records, as ``key: A there, B expected``; inputs compared where both know them."""
    a, b = ADDED_LATER | recorded.get("settings", {}), ADDED_LATER | expected.get("settings", {})
    diff = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} expected" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    ia, ib = recorded.get("inputs") or {}, expected.get("inputs") or {}
    diff += [f"inputs of {name}: sha256 {ia[name][:12]}... there, {ib[name][:12]}... now (labels.csv or a structure "
             "file changed)" for name in ia if name in ib and ia[name] != ib[name]]
    return diff


def check_file(meta: dict[str, Any], where: str, *, split: int | None = None, selection: str | None = None,
               init: str | None = None, dataset: str | None = None, record: dict[str, Any] | None = None) -> None:
    """Refuse a model file or resume state (its metadata ``meta``) that is not what the reader expects."""
    wrong = []
    if split is not None:
        found = meta.get("split", meta.get("splits"))
        if found not in (split, [split]):
            wrong.append(f"it is of split {found}, not of split {split}")
    if selection is not None and "selection" in meta and meta["selection"] != selection:
        wrong.append(f"it is the {meta['selection']} model, not the {selection} one")
    for key, value in (("init", init), ("dataset", dataset)):
        if value is not None and meta.get(key) not in (None, value):
            wrong.append(f"{key} is {meta.get(key)!r}, expected {value!r}")
    if record is not None and meta.get("run") is not None:
        wrong += record_differences(meta["run"], record)
    if wrong and all(w.startswith("inputs of ") for w in wrong):
        raise CheckpointError(f"{where} was trained on other inputs ({'; '.join(wrong)}); its models and metrics are "
                              "not of these data: use another --run-dir or delete it to train it again")
    if wrong:
        raise CheckpointError(f"{where}: not a file of this run ({'; '.join(wrong)}): copied here from another run, "
                              "split or stage, or its run folder's config.json edited by hand; put it back, run the "
                              "command with the settings it was trained with, or delete it to train it again")


def check_folder(run: RunDir, record: dict[str, Any]) -> None:
    """Every model file and resume state in ``run`` must be of the run ``record`` describes (see the docstring)."""
    for k in run.splits():
        for selection in SELECTIONS:
            path = run.checkpoint(k, selection)
            if path.is_file():
                check_file(file_meta(path), str(path), split=k, selection=selection, record=record)
    for path, splits in run.states():
        try:
            meta = file_meta(path)
        except CheckpointError:
            continue  # an unreadable state is refused by the loop when it reaches its splits, with what to do
        check_file(meta, str(path), record=record)
        if meta.get("splits") != splits:
            raise CheckpointError(f"{path}: the resume state of split(s) {meta.get('splits')}, not of {splits} as its "
                                  "name says; delete it to restart those splits")


def file_meta(path) -> dict[str, Any]:
    """The metadata of a model file or resume state, without its weights (read, not checked: the reader checks)."""
    payload = load_plain(path)
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a ParAIsite model file or resume state")
    return {k: v for k, v in payload.items() if k not in ("state_dict", "members", "sha256")}
