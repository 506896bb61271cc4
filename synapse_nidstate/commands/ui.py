"""What the commands show a person: progress and tables, through ``rich``.

Progress goes to standard error (a bar on a terminal, a log line every few
seconds otherwise, nothing with ``--no-progress``); tables go to standard
output as plain text, so they read the same in a terminal, a pipe and a file.
"""

import io
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

#: Seconds between two progress lines when standard error is not a terminal.
LOG_INTERVAL = 5.0


#: Rich's SIMPLE_HEAD box in ASCII: no edges, a line of dashes under the header.
_PLAIN_HEAD = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)


class _RateColumn(ProgressColumn):
    """Units per second (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.0f}/s" if task.speed else "")


class WorkProgress:
    """Progress of ``total`` units of work, advanced by calling it with a count.

    On a terminal: a rich progress bar (done/total, rate, time left). Elsewhere:
    a line on standard error every :data:`LOG_INTERVAL` seconds and at the end.
    With nothing to do (``total == 0``) it shows nothing.
    """

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled and total > 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: RichProgress | None = None
        if self.enabled and sys.stderr.isatty():
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                _RateColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total)
            self._bar.start()

    def __call__(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total))
        elif self.enabled and time.monotonic() - self._last_line >= LOG_INTERVAL:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self._last_line = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate if rate else 0.0
        sys.stderr.write(
            f"{self.label}: {min(self.done, self.total)}/{self.total}"
            f" ({rate:,.0f}/s, ETA {left:,.0f}s)\n"
        )
        sys.stderr.flush()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=min(self.done, self.total))
            self._bar.stop()
            self._bar = None
        elif self.enabled:
            self._line()


def counted(n: int, singular: str, plural: str | None = None) -> str:
    """``1 batch``, ``2 batches``: a count and its noun, in the right number."""
    return f"{n:,} {singular if n == 1 else plural or singular + 's'}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], title: str | None = None) -> str:
    """``rows`` under ``header`` as plain text: the first column left-aligned,
    the others (figures) right-aligned, a rule under the header."""
    grid = Table(
        *header,
        title=title,
        box=_PLAIN_HEAD,
        show_edge=False,
        pad_edge=False,
        title_justify="left",
    )
    for i, column in enumerate(grid.columns):
        column.justify = "left" if i == 0 else "right"
        column.no_wrap = True
    for row in rows:
        grid.add_row(*(str(cell) for cell in row))
    out = io.StringIO()
    Console(file=out, width=250, no_color=True, force_terminal=False, highlight=False).print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
