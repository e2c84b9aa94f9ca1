"""train.py's job: a list of (stage, split) tasks shared by processes, each trained once; processes that stop together."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import working_folder
from paraisite.training.job import build_job, describe_job, parallel_tasks
from paraisite.training.loop import TrainConfig
from paraisite.training.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared, graph_caches):
    with working_folder(tmp_path_factory.mktemp("job")) as d:
        (d / "data").symlink_to(graph_caches)
        yield d


def env() -> dict[str, str]:
    """What a user's shell has: no torchrun variables, no thread limit (train.py chooses)."""
    keep = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "OMP_NUM_THREADS")}
    return keep | {"PYTHONPATH": str(ROOT)}


def train_py(workdir: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--no-progress"], cwd=workdir, env=env(),
                          capture_output=True, text=True, timeout=900, **kw)


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(open(path)))


def same_numbers(a: Path, b: Path) -> None:
    got, want = rows(a), rows(b)
    assert len(got) == len(want)
    for x, y in zip(got, want):
        assert (x["split"], x["selection"], x["test_dataset"]) == (y["split"], y["selection"], y["test_dataset"])
        for key in ("mape", "mae", "sre", "spearman"):
            assert float(x[key]) == pytest.approx(float(y[key]), rel=1e-5, abs=1e-9), (key, x, y)


def test_the_task_list_of_a_plus_af_job(tmp_path):
    config = TrainConfig(init="fe+af", dataset="togo15", epochs=2, aflow_run=str(tmp_path / "aflow"))
    tasks = build_job(config, [1, 2, 3], RunDir(tmp_path / "run"))
    assert [str(t) for t in tasks] == ["FEAF split 1", "FEAF split 2", "FEAF split 3",
                                       "FEAFTG15 split 1", "FEAFTG15 split 2", "FEAFTG15 split 3"]
    assert [[str(n) for n in t.needs] for t in tasks[3:]] == [["FEAF split 1"], ["FEAF split 2"], ["FEAF split 3"]]
    assert not any(t.ready() for t in tasks[3:]) and all(t.ready() for t in tasks[:3])
    assert parallel_tasks(tasks) == 3 and "6 models in all" in describe_job(tasks)
    stacked = build_job(config, [1, 2, 3], RunDir(tmp_path / "run"), stacked=True, world=2)  # one group per process
    assert [str(t) for t in stacked] == ["FEAF splits 1,3", "FEAF split 2", "FEAFTG15 splits 1,3", "FEAFTG15 split 2"]
    given = build_job(config, [1, 2], RunDir(tmp_path / "run"), train_aflow=False)  # --aflow-run: an input
    assert [str(t) for t in given] == ["FEAFTG15 split 1", "FEAFTG15 split 2"] and not given[0].needs


@pytest.mark.slow
def test_plus_af_with_two_processes_trains_every_task_once_with_the_numbers_of_one(workdir):
    """The headline command as the README gives it (on a 2-core CPU: two processes), short: every AFLOW split
    and every Togo15 split trained once, the results of one process. Failed on 6a33ea5: split 2's AFLOW stage
    was never trained (each process took its share of its share)."""
    proc = train_py(workdir, "--init", "fe+af", "--dataset", "togo15", "--epochs", "1", "--splits", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "plan: 2 FEAF model(s)" in err and "then 2 FEAFTG15 model(s)" in err and "4 models in all" in err
    for task in ("[FEAF] split 1", "[FEAF] split 2", "[FEAFTG15] split 1", "[FEAFTG15] split 2"):
        assert sum(f"{task}, epoch 1 of 1" in line for line in err.splitlines()) == 1, (task, err)
    if os.cpu_count() and len(os.sched_getaffinity(0)) > 1:
        assert "2 processes x" in err and "process 2 of 2: [" in err
    for run in ("fe_aflow_agl", "fe+af_togo15"):
        for k in (1, 2):
            assert [r["epoch"] for r in rows(workdir / "runs" / run / f"split{k}" / "curve.csv")] == ["1"]
    assert {r["split"] for r in rows(workdir / "runs" / "fe+af_togo15" / "results.csv")} == {"1", "2"}
    assert (workdir / "runs" / "fe_aflow_agl" / "summary.md").is_file()
    with working_folder(workdir, threads=1):  # the same job in one process, one thread, into other folders
        assert train.main(["--init", "fe", "--dataset", "aflow_agl", "--epochs", "1", "--splits", "2", "--processes",
                           "1", "--no-progress", "--run-dir", "runs/one/aflow"]) == 0
        assert train.main(["--init", "fe+af", "--dataset", "togo15", "--epochs", "1", "--splits", "2", "--processes",
                           "1", "--no-progress", "--run-dir", "runs/one/fe+af", "--aflow-run", "runs/one/aflow"]) == 0
    same_numbers(workdir / "runs" / "fe_aflow_agl" / "results.csv", workdir / "runs" / "one" / "aflow" / "results.csv")
    same_numbers(workdir / "runs" / "fe+af_togo15" / "results.csv", workdir / "runs" / "one" / "fe+af" / "results.csv")


def wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def lock_pid(run: Path, k: int) -> int | None:
    try:
        text = (run / f".split{k}.lock").read_text().split()
    except FileNotFoundError:
        return None
    return int(text[1]) if len(text) > 1 else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def curve_epochs(run: Path, k: int) -> int:
    path = run / f"split{k}" / "curve.csv"
    return len(rows(path)) if path.is_file() else 0


def start_two(workdir: Path, name: str) -> tuple[subprocess.Popen, list[int]]:
    """A two-process rw job of 16 epochs on two splits, watched until both processes are in their second epoch."""
    run = workdir / "runs" / name
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--init", "rw", "--dataset", "togo15", "--epochs",
                             "16", "--splits", "2", "--processes", "2", "--no-progress", "--run-dir", str(run)],
                            cwd=workdir, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: all(curve_epochs(run, k) >= 2 for k in (1, 2)) or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    pids = [lock_pid(run, k) for k in (1, 2)]
    assert all(pids) and pids[0] != pids[1] and proc.pid not in pids
    return proc, pids


@pytest.mark.slow
def test_signals_stop_every_process_and_a_killed_one_leaves_its_task_to_the_rerun(workdir):
    with working_folder(workdir, threads=1):  # the reference: one process
        assert train.main(["--init", "rw", "--dataset", "togo15", "--epochs", "16", "--splits", "2", "--processes", "1",
                           "--no-progress", "--run-dir", "runs/signal_reference"]) == 0
    # SIGTERM to train.py: every process it started stops (none re-parented to go on), one line, exit 143
    proc, pids = start_two(workdir, "sigterm")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    wait_for(lambda: not any(alive(p) for p in pids), timeout=10)
    said = [line for line in err.splitlines() if "interrupted" in line]
    assert len(said) == 1 and "SIGTERM" in said[0] and "run the same command to resume" in said[0], err
    assert "Traceback" not in err and not list((workdir / "runs" / "sigterm").glob("*.tmp"))
    # SIGKILL to train.py: its processes are stopped by the kernel (they die with their parent)
    proc, pids = start_two(workdir, "sigkill")
    proc.kill()
    proc.communicate(timeout=60)
    wait_for(lambda: not any(alive(p) for p in pids), timeout=20)
    # one worker killed: the other is stopped, the command says so; the same command then finishes the rest
    proc, pids = start_two(workdir, "one_killed")
    os.kill(pids[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "process" in err and "was killed (SIGKILL)" in err, err
    wait_for(lambda: not alive(pids[0]), timeout=20)
    for name in ("sigterm", "sigkill", "one_killed"):
        done = train_py(workdir, "--init", "rw", "--dataset", "togo15", "--epochs", "16", "--splits", "2",
                        "--processes", "2", "--run-dir", f"runs/{name}")
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resuming split" in done.stderr
        for k in (1, 2):  # every epoch trained once, none twice
            assert [int(r["epoch"]) for r in rows(workdir / "runs" / name / f"split{k}" / "curve.csv")] == list(range(1, 17))
        same_numbers(workdir / "runs" / name / "results.csv", workdir / "runs" / "signal_reference" / "results.csv")
