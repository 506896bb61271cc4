"""`synapse-nidstate`: the operator's command line."""

import argparse
import shutil
import sys
import tempfile
import time
from typing import Any

from synapse_nidstate import __version__


class Progress:
    """A one-line progress bar on a terminal; a log line every few seconds elsewhere."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self._last < (0.2 if self.tty else 5.0)):
            return
        self._last = now
        self._print(now)

    def _print(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate if rate else 0.0
        shown = min(self.done, self.total)
        if self.tty:
            width = 30
            filled = int(width * shown / self.total)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(
                f"\r{self.label} [{bar}] {shown}/{self.total} {rate:,.0f}/s ETA {left:,.0f}s "
            )
        else:
            sys.stderr.write(
                f"{self.label}: {shown}/{self.total} ({rate:,.0f}/s, ETA {left:,.0f}s)\n"
            )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._print(time.monotonic())
            if self.tty:
                sys.stderr.write("\n")


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    cells = [header] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="synapse-nidstate",
        description="Numeric-ID state storage for Synapse: operator tools.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="start a real Synapse in this process with the module, write a history "
        "and show that every event's mirrored state equals Synapse's",
    )
    demo.add_argument("--rooms", type=int, default=4, help="rooms (default 4)")
    demo.add_argument("--events", type=int, default=3000, help="events to send (default 3000)")
    demo.add_argument(
        "--big-room-members", type=int, default=200, help="members of the biggest room (200)"
    )
    demo.add_argument("--seed", type=int, default=1, help="random seed of the history (1)")
    demo.add_argument(
        "--postgres", metavar="DSN", help="use this PostgreSQL database instead of SQLite"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--keep", action="store_true", help="keep the temporary data directory"
    )

    args = parser.parse_args(argv)
    if args.command == "demo":
        for name in ("rooms", "events", "big_room_members"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        from synapse_nidstate.demo import run_demo

        data_dir = tempfile.mkdtemp(prefix="synapse-nidstate-demo-")
        try:
            return run_demo(args, data_dir)
        finally:
            if args.keep:
                print(f"data kept in {data_dir}")
            else:
                shutil.rmtree(data_dir, ignore_errors=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
