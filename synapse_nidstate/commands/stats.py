"""`synapse-nidstate stats`: Synapse's state storage and the module's tables side by side,
as text tables, JSON or a plot (the figures themselves: ``storage_figures``)."""

import argparse
import json
import sys
from typing import Any

from synapse.server import HomeServer

from synapse_nidstate.commands.plot import plot_report, require_matplotlib
from synapse_nidstate.commands.storage_figures import (
    NIDSTATE,
    SYNAPSE,
    SideStats,
    StorageReport,
    TableStats,
    format_bytes,
    storage_report,
)
from synapse_nidstate.commands.ui import table


def _number(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def format_report(report: StorageReport) -> str:
    """The report as text tables: totals side by side, then each table, then the top rooms."""
    syn, mod = report.synapse, report.nidstate
    engines = report.engines
    where = (
        f"main database on {engines['main']}, state database on {engines['state']}"
        if report.separate_state_database
        else f"one database on {engines['main']}"
    )
    lines = [
        f"State storage: {SYNAPSE} vs {NIDSTATE} ({where})",
        f"sizes: {report.size_method}",
        "",
    ]

    def per_entry(side: SideStats) -> str:
        value = side.bytes_per_state_entry
        return "n/a" if value is None else f"{value:,.1f} B"

    summary = [
        ("tables", len(syn.tables), len([t for t in mod.tables if t.exists])),
        ("rows", _number(syn.rows), _number(mod.rows)),
        ("table", format_bytes(syn.table_bytes), format_bytes(mod.table_bytes)),
        ("indexes", format_bytes(syn.index_bytes), format_bytes(mod.index_bytes)),
        ("TOAST", format_bytes(syn.toast_bytes), format_bytes(mod.toast_bytes)),
        ("total", format_bytes(syn.total_bytes), format_bytes(mod.total_bytes)),
        ("total bytes", _number(syn.total_bytes), _number(mod.total_bytes)),
        ("state entries", _number(syn.state_entries), _number(mod.state_entries)),
        ("bytes per state entry", per_entry(syn), per_entry(mod)),
    ]
    lines.append(table(summary, ("", SYNAPSE, NIDSTATE)))
    ratio = report.total_bytes_ratio
    if ratio is not None:
        lines.append(
            f"\n{NIDSTATE} / {SYNAPSE} total bytes: {ratio:.3f}"
            + (f" ({1 / ratio:.1f}x smaller)" if 0 < ratio < 1 else "")
            + f"; bytes per state entry: {_ratio(report.bytes_per_state_entry_ratio)}"
        )
    if not any(t.exists for t in mod.tables):
        lines.append(f"\n{NIDSTATE}'s tables do not exist in this database.")

    header = ("table", "db", "rows", "table", "indexes", "TOAST", "total")
    for side in (syn, mod):
        rows: list[tuple[Any, ...]] = [
            (
                t.name,
                t.database,
                _number(t.rows) if t.exists else "missing",
                format_bytes(t.table_bytes),
                format_bytes(t.index_bytes),
                format_bytes(t.toast_bytes),
                format_bytes(t.total_bytes),
            )
            for t in side.tables
        ]
        rows.append(
            (
                "total",
                "",
                _number(side.rows),
                format_bytes(side.table_bytes),
                format_bytes(side.index_bytes),
                format_bytes(side.toast_bytes),
                format_bytes(side.total_bytes),
            )
        )
        lines += ["", f"{side.name}:", table(rows, header)]

    if report.top:
        lines += ["", f"Top {report.top} rooms by state entries:"]
        room_rows: list[tuple[Any, ...]] = []
        for i in range(max(len(syn.top_rooms), len(mod.top_rooms))):
            cells: list[Any] = [i + 1]
            for side in (syn, mod):
                if i < len(side.top_rooms):
                    room = side.top_rooms[i]
                    cells += [room.room_id, _number(room.state_entries), format_bytes(room.data_bytes)]
                else:
                    cells += ["", "", ""]
            room_rows.append(tuple(cells))
        lines.append(
            table(
                room_rows,
                ("#", f"{SYNAPSE} room", "entries", "data", f"{NIDSTATE} room", "entries", "data"),
            )
        )
        lines.append(
            f"(data: {SYNAPSE}: the values of its state_groups_state rows; "
            f"{NIDSTATE}: the packed entries of its blocks)"
        )
    return "\n".join(lines)


def _table_json(t: TableStats) -> dict[str, Any]:
    return {
        "database": t.database,
        "exists": t.exists,
        "rows": t.rows,
        "table_bytes": t.table_bytes,
        "index_bytes": t.index_bytes,
        "toast_bytes": t.toast_bytes,
        "total_bytes": t.total_bytes,
    }


def _side_json(side: SideStats) -> dict[str, Any]:
    return {
        "tables": {t.name: _table_json(t) for t in side.tables},
        "rows": side.rows,
        "table_bytes": side.table_bytes,
        "index_bytes": side.index_bytes,
        "toast_bytes": side.toast_bytes,
        "total_bytes": side.total_bytes,
        "state_entries": side.state_entries,
        "bytes_per_state_entry": side.bytes_per_state_entry,
        "top_rooms": [
            {
                "room_id": r.room_id,
                "state_entries": r.state_entries,
                "data_bytes": r.data_bytes,
                "rows": r.rows,
            }
            for r in side.top_rooms
        ],
    }


def report_as_json(report: StorageReport) -> dict[str, Any]:
    """Every figure, with its unit in its key (``*_bytes``, ``rows``, ``state_entries``, ``*_ratio``).

    Sizes the engine cannot tell (TOAST on SQLite, any size without ``dbstat``) are null.
    """
    return {
        "engines": dict(report.engines),
        "size_method": report.size_method,
        "separate_state_database": report.separate_state_database,
        "top_rooms_count": report.top,
        "synapse": _side_json(report.synapse),
        "nidstate": _side_json(report.nidstate),
        "nidstate_to_synapse_total_bytes_ratio": report.total_bytes_ratio,
        "nidstate_to_synapse_bytes_per_state_entry_ratio": report.bytes_per_state_entry_ratio,
    }


def _at_least_zero(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be at least 0")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument(
        "--plot", metavar="FILE.png", help="also draw a bar chart into this PNG file"
    )
    parser.add_argument(
        "--top",
        metavar="N",
        type=_at_least_zero,
        default=10,
        help="rooms with the most state to list (default 10; 0 skips the per-room scan)",
    )


async def run(hs: HomeServer, args: argparse.Namespace) -> int:
    """Print the report (text, or JSON with --json) and draw it if --plot is given."""
    if args.plot:
        require_matplotlib()  # before the long scan, not after it
    report = await storage_report(hs, top=args.top)
    if args.json:
        json.dump(report_as_json(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    if args.plot:
        plot_report(report, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    sys.stdout.flush()
    return 0
