"""The files of a scan: streamed part files while it runs, one CSV at the end, and what must agree to resume.

Rows are appended to ``<out>.parts/rank<r>.csv`` and flushed after every
batch. A re-run first repairs the part files (a row cut by a kill is
dropped), then predicts only the ids that have no row yet. At the end the
parts are merged into ``<out>`` in cache order (structures that failed to
convert last), every input id exactly once. ``<out>.parts/scan.json`` (then
``<base>.scan.json``) records the models, the cache and the columns, so that a
re-run with other settings refuses to mix rows; ``<base>.runs.csv`` logs each
run that predicted something.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from megnet_pt.cache import GraphCache

try:
    import fcntl
except ImportError:  # not on a POSIX system: no lock
    fcntl = None
from megnet_pt.download import sha256_file

from ..training.rundir import RunDir

if TYPE_CHECKING:
    from .ensemble import Ensemble

FORMAT = "paraisite scan"
VERSION = 1


def csv_text(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


@dataclass
class ScanPaths:
    """Where a scan writes: the CSV, its parts while running, and the summary files beside it."""

    out: Path

    @property
    def parts(self) -> Path:
        return self.out.with_name(self.out.name + ".parts")

    def part(self, rank: int) -> Path:
        return self.parts / f"rank{rank}.csv"

    @property
    def base(self) -> Path:
        return self.out.with_suffix("") if self.out.suffix else self.out

    def sidecar(self, suffix: str) -> Path:
        return self.base.with_name(self.base.name + suffix)

    @property
    def running_meta(self) -> Path:
        return self.parts / "scan.json"

    @property
    def meta(self) -> Path:
        return self.sidecar(".scan.json")

    @property
    def lock(self) -> Path:
        return self.out.with_name(self.out.name + ".lock")


@contextlib.contextmanager
def hold_output(out: str | Path) -> Iterator[None]:
    """One scan writing ``out`` at a time: a second one started beside it is refused, naming the first."""
    path = ScanPaths(Path(out)).lock
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ScanError(f"{out}: another scan is writing it ({f.read().strip() or 'a running process'}); wait for it "
                            "to finish, or give this one another --out") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def scan_meta(ensemble: "Ensemble", cache: GraphCache, header: list[str], intervals: str | None = None) -> dict[str, Any]:
    """What must agree between a scan and the one that resumes it."""
    info = ensemble.info
    return {
        "format": FORMAT,
        "version": VERSION,
        "models": str(info.run_dir.resolve()) if info else None,
        "selection": info.selection if info else None,
        "checkpoints": ({str(k): sha256_file(RunDir(info.run_dir).checkpoint(k, info.selection)) for k in info.splits}
                        if info else None),
        "cache_ids_sha256": cache.attrs.get("ids_sha256"),
        "cache_sources_sha256": cache.attrs.get("sources_sha256"),
        "cutoff": cache.cutoff,
        "columns": header,
        "intervals": intervals,  # the calibration and level of ltc_lo..ltc_hi, in words
    }


class ScanError(ValueError):
    """An output that cannot be written or resumed (the message says which file and why)."""


def _check_meta(stored: dict[str, Any], current: dict[str, Any], where: Path, out: Path) -> None:
    differ = [k for k in ("format", "version", "checkpoints", "cache_ids_sha256", "cutoff", "columns", "intervals")
              if stored.get(k) != current.get(k)]
    if differ:
        what = {"checkpoints": "other models (--models/--selection, or retrained)", "cache_ids_sha256": "another input",
                "columns": "other columns (--with-eform?)", "cutoff": "another cutoff",
                "intervals": "other intervals (--interval, or another intervals.json)"}
        reasons = ", ".join(what.get(k, k) for k in differ)
        raise ScanError(f"{out}: a scan with {reasons} is recorded in {where}; use another --out, or delete "
                        f"{out} and its .parts/.scan.json to start over")


def repair_parts(paths: ScanPaths, header: list[str], known: dict[str, int]) -> int:
    """Make every part file hold only whole, valid, distinct rows; returns the number of rows kept.

    A process killed while writing leaves its last line cut short; a row
    whose id is unknown, whose field count is wrong or that repeats an id of
    an earlier row is dropped too. Files that change are rewritten atomically.
    """
    seen: set[str] = set()
    for part in sorted(paths.parts.glob("rank*.csv")):
        with open(part, newline="") as f:
            text = f.read()
        keep_text = text if text.endswith("\n") else text[: text.rfind("\n") + 1]
        lines = keep_text.splitlines(keepends=True)
        kept, changed = [], keep_text != text
        if not lines or next(csv.reader([lines[0]])) != header:
            raise ScanError(f"{part}: not a part of this scan (its header differs); delete {paths.parts} to start over")
        for line in lines[1:]:
            fields = next(csv.reader([line]), [])
            if len(fields) != len(header) or fields[0] not in known or fields[0] in seen:
                changed = True
                continue
            seen.add(fields[0])
            kept.append(line)
        if changed:
            tmp = part.with_name(part.name + ".tmp")
            tmp.write_text(lines[0] + "".join(kept))
            os.replace(tmp, part)
    return len(seen)


def done_ids(paths: ScanPaths) -> set[str]:
    ids: set[str] = set()
    for part in sorted(paths.parts.glob("rank*.csv")):
        with open(part, newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            ids.update(row[0] for row in reader if row)
    return ids


def merge_parts(paths: ScanPaths, header: list[str], order: dict[str, int]) -> int:
    """Write ``out`` from the parts, rows in input order (``order[id]``); every id must appear exactly once."""
    positions, files, offsets = [], [], []
    parts = sorted(paths.parts.glob("rank*.csv"))
    for n, part in enumerate(parts):
        with open(part, "rb") as f:
            f.readline()
            while True:
                offset = f.tell()
                line = f.readline()
                if not line:
                    break
                sid = next(csv.reader([line.decode()]))[0]
                positions.append(order[sid])
                files.append(n)
                offsets.append(offset)
    positions_a = np.asarray(positions, dtype=np.int64)
    sort = np.argsort(positions_a, kind="stable")
    if len(positions_a) != len(order) or (len(sort) > 1 and (np.diff(positions_a[sort]) == 0).any()):
        have = set(positions)
        missing = [sid for sid, p in order.items() if p not in have]
        raise ScanError(f"{paths.parts}: {len(missing)} id(s) have no row (e.g. {', '.join(missing[:5])}) or some "
                        "repeat; re-run the same command to complete the scan")
    tmp = paths.out.with_name(paths.out.name + ".tmp")
    handles = [open(p, "rb") for p in parts]
    try:
        with open(tmp, "wb") as out:
            out.write(csv_text([header]).encode())
            for k in sort:
                f = handles[files[k]]
                f.seek(offsets[k])
                out.write(f.readline())
    finally:
        for f in handles:
            f.close()
    os.replace(tmp, paths.out)
    return len(sort)


RUN_LOG_FIELDS = ["started_utc", "processes", "device", "structures", "seconds", "structures_per_s", "already_done"]


def record_run(out: str | Path, row: dict[str, Any]) -> list[dict[str, str]]:
    """Log a run that predicted something in ``<base>.runs.csv`` and return the log.

    A run that found nothing already done predicted the whole file, so it
    starts the log anew; a resumed run adds its row. A re-run with nothing left
    to do logs nothing, so the summary keeps the throughput of the runs that
    did the work.
    """
    path = ScanPaths(Path(out)).sidecar(".runs.csv")
    if int(row["structures"]) > 0:
        fresh = int(row["already_done"]) == 0 or not path.is_file()
        with open(path, "w" if fresh else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RUN_LOG_FIELDS)
            if fresh:
                writer.writeheader()
            writer.writerow(row)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: list[list[str]], header: list[str]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        f.write(csv_text(([header] if new else []) + rows))
        f.flush()


def prepare_parts(paths: ScanPaths, header: list[str], order: dict[str, int], ensemble: "Ensemble",
             cache: GraphCache, intervals: str | None = None) -> tuple[list[int], list[int]] | Exception:
    """Rank 0: check or create the parts; returns (cache positions to predict, failure rows to write)."""
    try:
        meta = scan_meta(ensemble, cache, header, intervals)
        if paths.out.exists() and not paths.parts.exists():
            if not paths.meta.is_file():
                raise ScanError(f"{paths.out} exists and was not written by this scan (no {paths.meta.name}); "
                                "use another --out or delete it")
            _check_meta(json.loads(paths.meta.read_text()), meta, paths.meta, paths.out)
            return [], []  # finished earlier: only the summary is redone
        paths.parts.mkdir(parents=True, exist_ok=True)
        if paths.running_meta.is_file():
            _check_meta(json.loads(paths.running_meta.read_text()), meta, paths.running_meta, paths.out)
            repair_parts(paths, header, order)
        else:
            for stale in paths.parts.glob("rank*.csv"):
                stale.unlink()
            tmp = paths.running_meta.with_name("scan.json.tmp")
            tmp.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp, paths.running_meta)
        done = done_ids(paths)
        todo = [k for k, sid in enumerate(cache.ids) if sid not in done]
        failed = [k for k, (sid, _) in enumerate(cache.failures) if sid not in done]
        return todo, failed
    except Exception as exc:  # handed to every rank, so that all stop with the same message
        return exc
