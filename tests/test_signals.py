"""A signal to a long command (a cache build with workers, a scan) stops it and all its workers: one line, no
traceback, nothing half-written, and the same command then goes on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_cache_build_with_workers_stops_with_them(tmp_path, shared, sig):
    out = tmp_path / "aflow.h5"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "megnet_pt.cache", "build", str(shared / "data" / "aflow_agl"), "-o",
                             str(out), "--workers", "2", "--quiet"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    end = time.monotonic() + 120
    while len(children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers are converting structures
    workers = children(proc.pid)
    assert proc.poll() is None and len(workers) >= 2, proc.communicate()[1][-2000:]
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the command and its workers at once
    else:
        proc.send_signal(sig)  # as kill: to the command alone
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    said = [line for line in err.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("interrupted") and "resume" in said[0], err
    end = time.monotonic() + 10
    while any(running(w) for w in workers) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(running(w) for w in workers)
    done = subprocess.run([sys.executable, "-m", "megnet_pt.cache", "build", str(shared / "data" / "aflow_agl"), "-o",
                           str(out), "--workers", "2", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]


class _SignallingEntry:
    """A structure entry whose parsing is cut short by a signal, as a Ctrl-C during a one-process build is."""

    id, labels = "signalled", {}

    def load(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs at the next check of the interpreter, here
            time.sleep(0.001)
        raise AssertionError("the signal did not arrive")


def test_a_signal_is_not_taken_for_a_structure_that_failed():
    from megnet_pt.cache.workers import _convert
    from megnet_pt.interrupt import Interrupted, stop_on_signals

    with pytest.raises(Interrupted):  # not ("signalled", None, "SIGINT"): a failed structure, and the build going on
        with stop_on_signals():
            _convert(_SignallingEntry(), 4.0)


class _SignalledWhileCollected:
    """Python drops what a ``__del__`` raises ("Exception ignored in ..."): a signal landing there is one a weakref
    callback or a finaliser swallowed, as in a cache build with workers."""

    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            time.sleep(0.001)


def test_a_signal_python_dropped_still_stops_the_command(monkeypatch):
    from megnet_pt.interrupt import Interrupted, check_interrupted, stop_on_signals

    reported = []  # what Python would print as "Exception ignored in ...": the user sees one line, not a traceback
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    units = 0
    with pytest.raises(Interrupted) as stopped:
        with stop_on_signals():
            doomed = _SignalledWhileCollected()
            del doomed  # the handler's raise is dropped here
            for units in range(1, 4):
                check_interrupted()  # what a long loop calls between units of work
    assert stopped.value.code == 128 + signal.SIGTERM and units == 1 and reported == []
    check_interrupted()  # outside the block nothing is pending
    with pytest.raises(Interrupted):  # and a block that checks nothing still ends with it
        with stop_on_signals():
            doomed = _SignalledWhileCollected()
            del doomed
