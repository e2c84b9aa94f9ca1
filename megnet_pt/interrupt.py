"""How a long command stops cleanly: signals as an exception, OS errors in one line, child processes that never
outlive the command that started them.

A long command (a cache build, a scan, training) turns SIGINT, SIGTERM and SIGHUP into :class:`Interrupted`
inside :func:`stop_on_signals`, so that it unwinds like Ctrl-C: worker pools are shut down by their context
managers, temporary files are removed, and the command prints one line and exits ``128 + signal``. Its worker
processes call :func:`die_with_parent`: on Linux the kernel sends them SIGTERM when their parent dies, even by
SIGKILL, so none keeps running unseen. :func:`os_error` says what a full disk, a read-only folder or a refused permission
stopped, in one line.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import signal
import sys
from collections.abc import Iterator

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """A signal asked the command to stop; ``code`` is the exit code a shell expects (128 + the signal).

    A ``BaseException``, as ``KeyboardInterrupt`` is: the ``except Exception`` that reports a bad structure or a
    damaged file must not take a Ctrl-C for one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.code = 128 + signum


_received: list[int] = []  # the signal that arrived inside the innermost stop_on_signals, if one did


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Inside: the first SIGINT, SIGTERM or SIGHUP raises :class:`Interrupted`; later ones are ignored while the
    command unwinds (a second Ctrl-C does not cut its clean-up short). Outside, the handlers are as they were.

    Python drops an exception raised where it cannot propagate (in a ``__del__`` or a weakref callback: "Exception
    ignored in ..."), so a signal that lands there would be lost: long loops call :func:`check_interrupted`, and
    leaving the block without an exception raises it too."""
    global _received
    if not _main_thread():
        yield
        return
    outer, _received = _received, []
    received = _received

    def handler(signum, frame):
        if not received:
            received.append(signum)
            raise Interrupted(signum)

    def unraisable(info) -> None:  # the dropped raise is remembered: no "Exception ignored" traceback for it
        if not isinstance(info.exc_value, Interrupted):
            old_unraisable(info)

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    old_unraisable, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        check_interrupted()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        sys.unraisablehook = old_unraisable
        _received = outer


def check_interrupted() -> None:
    """Raise :class:`Interrupted` if a signal arrived inside :func:`stop_on_signals` (its first raise may have been
    dropped by Python); nothing otherwise. Called between units of work, not in clean-up code."""
    if _received:
        raise Interrupted(_received[0])


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


_OS_REASONS = {errno.ENOSPC: "no space left on the device", errno.EROFS: "the folder is on a read-only file system",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied", errno.EDQUOT: "disk quota exceeded"}


def os_error(exc: OSError, doing: str) -> str:
    """One line for an OS error met while ``doing`` (e.g. "writing the checkpoint runs/x/split1/best.pt"): the
    reason, the path, and that what was finished before is kept (files are written whole, under a temporary name)."""
    reason = _OS_REASONS.get(exc.errno) or exc.strerror or str(exc).splitlines()[0]
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in doing else ""
    return (f"{reason} while {doing}{where}; everything finished before is kept and no half-written file is left: "
            "free space or fix the folder's permissions, then run the same command again")
