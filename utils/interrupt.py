"""Stop a training run cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, save, say how to resume.

``train.py`` runs its loop inside :class:`StopSignals`::

    with StopSignals() as stop:
        for ...:
            train_step(...)
            stop.check()              # raises StopRequested once a signal came
        ...
    # on StopRequested: save a resumable checkpoint inside `with stop.critical():`, then exit

* The first SIGINT or SIGTERM only sets :attr:`StopSignals.requested` (and prints one line); the loop notices
  it at its next :meth:`StopSignals.check` (after the current step, or the current test image).
* A second signal outside :meth:`StopSignals.critical` raises ``KeyboardInterrupt`` at once: quit without
  saving (the checkpoints already on disk are intact: every checkpoint write is atomic).
* Inside :meth:`StopSignals.critical` (a checkpoint write) further signals only print that the write is being
  completed: a second Ctrl-C cannot leave a half-written checkpoint, and the run stops once it is written.

Only SIGKILL (or a power cut) ends the process without a save; the atomic writes of ``utils/checkpoint.py``
guarantee that even then every checkpoint on disk is complete (an old one or a new one).

DataLoader worker processes share the terminal's process group, so Ctrl-C reaches them too; they must leave
the stop to the main process (a worker killed by it would make the next batch fail): pass
:func:`ignore_stop_signals` as the DataLoader's ``worker_init_fn``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

__all__ = ["STOP_SIGNALS", "StopRequested", "StopSignals", "ignore_stop_signals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(Exception):  # noqa: N818 (a request, not an error)
    """A stop signal came; raised by :meth:`StopSignals.check` at a point where the run can be saved."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: ``128 + signum`` (130 for Ctrl-C)."""
        return 128 + self.signum


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to stop at a safe point instead of killing it.

    Handlers can only be installed from the main thread; elsewhere the context manager does nothing (no
    stop is ever requested) and signals keep their usual effect.

    Attributes:
        signum: the first stop signal received, or ``None``.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._in_critical = 0

    @property
    def requested(self) -> bool:
        """Whether a stop signal came."""
        return self.signum is not None

    def check(self, every_process: bool = False) -> None:
        """Raise :class:`StopRequested` if a stop signal came.

        Args:
            every_process: under torchrun, decide together (``utils.distributed.gather_flags``, a collective:
                every process must call it at the same point): all stop when any got a signal, so that they
                save and leave at the same step (a signal reaches the processes at slightly different
                times).
        """
        if every_process:
            from utils.distributed import gather_flags

            if any(gather_flags(self.requested)):
                raise StopRequested(self.signum or signal.SIGTERM)
        elif self.signum is not None:
            raise StopRequested(self.signum)

    @contextlib.contextmanager
    def critical(self):
        """A section that signals must not interrupt (a checkpoint write).

        The first stop signal that comes during it is noted as usual (the next :meth:`check` raises); later
        ones only print that the section is being completed.
        """
        self._in_critical += 1
        try:
            yield
        finally:
            self._in_critical -= 1

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            _say(f"\n{name}: stopping after the current step and saving a checkpoint "
                 "(send it again to quit at once without saving)\n")
        elif self._in_critical:
            _say(f"\n{name}: a checkpoint is being written; the run stops as soon as it is complete\n")
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def _say(message: str) -> None:
    """Write to stderr without Python's buffered stream: a signal handler may run while the interrupted
    code is in the middle of writing to ``sys.stderr`` (a tqdm bar), and a second write into the same buffer
    would raise 'reentrant call'."""
    try:
        os.write(2, message.encode())
    except OSError:
        pass


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Make this process ignore SIGINT and SIGTERM (a DataLoader ``worker_init_fn``: the main process
    decides when to stop, and shuts its workers down itself)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
