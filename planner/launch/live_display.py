"""What the user sees while a launch runs: phase, step/total, loss, tokens/s, ETA, spend vs budget.

`NullDisplay` is the silent default for library use and tests; `LiveDisplay` is the CLI's.
"""

from __future__ import annotations

import logging
from typing import Any

from ftplan.planner.launch.budget import Progress

_LOG = logging.getLogger("ftplan.launch")


class NullDisplay:
    def phase(self, name: str, message: str = "") -> None: ...
    def progress(self, progress: Progress, **kw: Any) -> None: ...
    def warn(self, message: str) -> None: ...
    def log(self, line: str) -> None:
        _LOG.info(line)
    def done(self, status: str, error: str | None) -> None: ...


class LiveDisplay:
    """Phase, step/total, loss, tokens/s, ETA, spend so far and projected total vs the budget, on stderr.

    A rich status line on a terminal; plain lines (one per phase, one per progress change) otherwise,
    so logs of CI runs stay readable."""

    def __init__(self, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.quiet = quiet
        self.live = None
        self._last = None
        if self.console.is_terminal and not quiet:
            from rich.live import Live

            self.live = Live("", console=self.console, refresh_per_second=4, transient=True)
            self.live.start()
        self.phase_name = ""

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        self.console.print(text, markup=False)

    def phase(self, name: str, message: str = "") -> None:
        self.phase_name = name
        self._line(f"[{name}] {message}".rstrip())

    def progress(self, progress, *, spent: float, projected: float | None, budget: float | None,
                 eta_s: float | None, margin: float | None = None) -> None:
        loss = "-" if progress.loss is None else f"{progress.loss:.4f}"
        tps = "-" if not progress.tokens_per_s else f"{progress.tokens_per_s:,.0f}"
        eta = "-" if eta_s is None else f"{eta_s / 60:.1f} min"
        proj = "-" if projected is None else f"${projected:.4f}"
        if projected is not None and margin:  # say what the projection adds beyond this run's training
            proj += f" (incl. ${margin:.4f} pull margin)"
        bud = "-" if budget is None else f"${budget:.2f}"
        text = (f"[training] step {progress.step}/{progress.total_steps or '?'}  loss {loss}  tok/s {tps}  "
                f"ETA {eta}  spent ${spent:.4f}  projected {proj} / budget {bud}")
        if self.live is not None:
            self.live.update(text)
        elif (progress.step, progress.loss) != self._last:
            self._last = (progress.step, progress.loss)
            self._line(text)

    def warn(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(f"warning: {message}", markup=False)
        else:
            self.console.print(f"warning: {message}", markup=False)

    def log(self, line: str) -> None:
        _LOG.info(line)  # SSH reconnects, pulls, host keys: visible with `ftplan -v`

    def done(self, status: str, error: str | None) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
