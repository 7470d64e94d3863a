"""The progress bar of a run: step/total, loss, lr, tokens/s, ETA and memory on one line.

An evaluation pauses it: `pause()` draws the bar as it stands, `task(total, desc, unit)` is a
second bar (rows, samples; with an ETA) for the evaluation, and `resume()` restarts the step
clock so the evaluation's time does not count in the s/step rate and the training ETA.
"""

from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager

_OPEN: "weakref.WeakSet[Progress]" = weakref.WeakSet()  # bars to end before an error line is printed


def close_open_bars() -> None:
    """End every open bar's line, so that the CLI's error message starts on a line of its own."""
    for progress in list(_OPEN):
        progress.close()


class Progress:
    def __init__(self, total: int, start: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5 if sys.stderr.isatty() else 10)
            _OPEN.add(self)

    def update(self, row: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
        if row.get("rewards/accuracies") is not None:  # preference objectives
            post["acc"] = f"{row['rewards/accuracies']:.2f}"
        if row.get("peak_mem_gb"):
            post["mem"] = f"{row['peak_mem_gb']:.1f}G"
        if row.get("mfu"):
            post["mfu"] = f"{row['mfu']:.0%}"
        if row.get("slow_rank"):  # one rank's forward > 1.5x the median (see tuneforge.train.rankstats)
            post["slow"] = row["slow_rank"]
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def pause(self) -> None:
        if self.bar is not None:
            self.bar.refresh()

    def resume(self) -> None:
        if self.bar is not None:
            self.bar.unpause()  # tqdm: the time since the last draw is left out of the rate

    @contextmanager
    def task(self, total: int, desc: str, unit: str):
        """A bar for a sub-task (an evaluation pass); yields its `update(n)` (a no-op when disabled)."""
        if self.bar is None:
            yield lambda n=1: None
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=False,
                  mininterval=0.5 if sys.stderr.isatty() else 10) as bar:
            yield bar.update

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            _OPEN.discard(self)
