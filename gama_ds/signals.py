"""Stop signals: who listens for them, and who must not die of them.

Slurm signals every process of a job step: SIGUSR1 from `--signal=USR1@T` before the time limit,
SIGTERM on scancel, preemption or a time limit without `--signal`, then SIGKILL after KillWait.
DeepSpeed's launcher, when it gets SIGTERM, sends it to its ranks and all their children. A rank
answers either signal with a checkpoint at the next step; its DataLoader workers and
multiprocessing's resource tracker receive the same signal and must survive it, or the rank
fails before it can save.

Nothing here imports torch: the entry points listen before the heavy imports, so a signal that
arrives while a 7B model loads is remembered, not fatal.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Helpers also ignore Ctrl-C: the terminal sends it to the whole foreground group.
HELPER_SIGNALS = (*STOP_SIGNALS, signal.SIGINT)


class StopRequest:
    """The first stop signal this process received, by name; None until then."""

    def __init__(self):
        self.received: str | None = None
        self.listening = False

    def listen(self) -> StopRequest:
        if not self.listening:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
            self.listening = True
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name


# One per process: the handler is process-wide, and a signal may arrive before training starts.
stop_request = StopRequest()


def listen_for_stop() -> StopRequest:
    return stop_request.listen()


@contextlib.contextmanager
def stop_signals_held():
    """Hold stop signals back (pending, not lost) while helper processes are started: a process
    inherits the signal mask through fork and exec, so a child started in here cannot die of a
    stop signal before `deaf_to_stop_signals` runs in it. The parent gets them on leaving."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELPER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def deaf_to_stop_signals(*_) -> None:
    """In a helper process (DataLoader worker): ignore stop signals, then let them through, so
    the ones held back since its start are discarded. Usable as a worker_init_fn."""
    for sig in HELPER_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELPER_SIGNALS)


def start_resource_tracker_deaf_to_stop_signals() -> None:
    """multiprocessing's resource tracker ignores SIGTERM and SIGINT but dies of SIGUSR1, and
    leaves the DataLoader's semaphores to leak. Started with it ignored, it keeps that (an
    ignored signal stays ignored across exec); held meanwhile, none reaches this process unheard.
    Starting one ends with SIGTERM and SIGINT unblocked, whatever the mask was: call this before
    `stop_signals_held`, not inside it. Cheap when the tracker runs already."""
    from multiprocessing import resource_tracker

    with stop_signals_held():
        previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        try:
            resource_tracker.ensure_running()
        finally:
            signal.signal(signal.SIGUSR1, previous)
