"""Stop requests during training: SIGTERM/SIGUSR1 (preemption) and Ctrl-C (SIGINT).

Owns `StopFlag`, installed by the training loop around its steps:
- SIGTERM or SIGUSR1: the loop finishes the current step, saves a checkpoint and exits with
  `PREEMPTED_EXIT` (75);
- the first SIGINT (Ctrl-C): the same, exiting with `INTERRUPTED_EXIT` (130, as a shell
  reports a Ctrl-C);
- a second SIGINT: `KeyboardInterrupt` at once (nothing more is saved).
A stop that arrives during the last step finishes the run instead (`final/` is written, exit 0).
`signal_handlers_restored` puts the previous handlers back after a run, so a process that
trains twice (tests, notebooks) gets its own Ctrl-C back.
"""

from __future__ import annotations

import contextlib
import signal

from tuneforge.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT


STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT] + ([signal.SIGUSR1] if hasattr(signal, "SIGUSR1") else [])


@contextlib.contextmanager
def signal_handlers_restored():
    """Put back, on the way out, the stop-signal handlers that were there on the way in."""
    try:
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    except ValueError:
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


class StopFlag:
    """Set by a stop signal; the loop reads `signal` after each step and `exit_code` when it stops."""

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with whoever handles them
                break
        return self

    def _handle(self, signum, _frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal == "SIGINT":  # a second Ctrl-C: abort now
            raise KeyboardInterrupt
        if self.signal is None or name == "SIGINT":
            self.signal = name

    @property
    def exit_code(self) -> int:
        """130 after a Ctrl-C, 75 after SIGTERM/SIGUSR1 (0 when no signal came)."""
        if self.signal is None:
            return 0
        return INTERRUPTED_EXIT if self.signal == "SIGINT" else PREEMPTED_EXIT


def stop_message(signal_name: str | None, step: int) -> str:
    """The line the loop prints after saving on a stop request."""
    what = "interrupted (Ctrl-C)" if signal_name == "SIGINT" else f"received {signal_name or 'a stop signal on another rank'}"
    return f"{what}: saved checkpoint at step {step}; continue with --resume"


def last_step_message(signal_name: str | None) -> str:
    return f"{signal_name or 'a stop signal'} arrived in the last step: finishing the run instead of stopping"
