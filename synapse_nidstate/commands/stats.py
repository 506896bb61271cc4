"""`synapse-nidstate stats`: Synapse's state storage and the module's tables side by side,
as text tables, JSON or a plot (the figures themselves: ``storage_figures``)."""

import argparse
import json
import sys
import textwrap
from typing import Any

from synapse.server import HomeServer

from synapse_nidstate.commands.plot import plot_report, plot_target_problem, require_matplotlib
from synapse_nidstate.commands.storage_figures import (
    NIDSTATE,
    ROOM_NOTES,
    SYNAPSE,
    RoomStats,
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
    lines.append(
        f"(state entries: {SYNAPSE}'s rows of state_groups_state, {NIDSTATE}'s entries "
        "of nidstate_blocks; both count full states and deltas as stored)"
    )
    ratio = report.total_bytes_ratio
    if ratio is not None:
        lines.append(
            f"\n{NIDSTATE} / {SYNAPSE} total bytes: {ratio:.3f}"
            + (f" ({1 / ratio:.1f}x smaller)" if 0 < ratio < 1 else "")
            + f"; bytes per state entry: {_ratio(report.bytes_per_state_entry_ratio)}"
        )
    if not any(t.exists for t in mod.tables):
        lines.append(f"\n{NIDSTATE}'s tables do not exist in this database.")
    lines += format_reclaim(report)

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
        lines += ["", format_top_rooms(report)]
    return "\n".join(lines)


#: How each engine gives deleted rows' space back.
SPACE_BACK = {
    "postgres": "PostgreSQL: autovacuum makes the space reusable; VACUUM FULL "
    "state_groups_state (or pg_repack, without the lock) returns it to the "
    "operating system",
    "sqlite": "SQLite: the pages are reused; VACUUM (Synapse stopped) returns them to "
    "the operating system",
}


def format_reclaim(report: StorageReport) -> list[str]:
    """The reclaim lines: what was deleted, and the state footprint now."""
    reclaim = report.reclaim
    if reclaim is None or not reclaim.groups:
        return []
    rows_now = report.synapse.state_entries
    return [
        "",
        f"reclaimed: {_number(reclaim.groups)} state groups, {_number(reclaim.rows_deleted)} "
        f"rows of state_groups_state deleted ({_number(rows_now)} rows left of "
        f"{_number(rows_now + reclaim.rows_deleted)})",
        f"state footprint now ({SYNAPSE}'s state tables + {NIDSTATE}'s): "
        f"{format_bytes(report.footprint_bytes)}",
        f"(sizes are allocated space: {SPACE_BACK[report.engines['state']]})",
    ]


def _name(room: RoomStats, width: int = 40) -> str:
    label = room.name or room.canonical_alias
    if not label:
        return "-"
    return label if len(label) <= width else label[: width - 1] + "\u2026"


def _wrapped(label: str, text: str) -> list[str]:
    return textwrap.wrap(
        f"{label}: {text}.", width=100, subsequent_indent="  ", break_on_hyphens=False
    )


def format_top_rooms(report: StorageReport) -> str:
    """The top rooms, one room a row with both sides' figures, and what each figure is."""
    title = (
        f"Top {len(report.top_rooms) or report.top} rooms by {SYNAPSE}'s state rows, most first"
        " (room: its name or canonical alias):"
    )
    if not report.top_rooms:
        return f"{title}\n(no room has state in state_groups_state)"
    rows = [
        (
            _name(room),
            room.room_id,
            _number(room.synapse_rows),
            format_bytes(room.synapse_data_bytes),
            _number(room.nidstate_entries),
            format_bytes(room.nidstate_data_bytes),
            _ratio(room.data_bytes_ratio),
        )
        for room in report.top_rooms
    ]
    header = (
        "room",
        "room ID",
        f"{SYNAPSE} rows",
        "data",
        f"{NIDSTATE} entries",
        "data",
        "data ratio",
    )
    notes = [
        *_wrapped(f"{SYNAPSE} rows", ROOM_NOTES["synapse_rows"]),
        *_wrapped(f"{NIDSTATE} entries", ROOM_NOTES["nidstate_entries"]),
        *_wrapped("data", ROOM_NOTES["data_bytes"]),
        *_wrapped("data ratio", ROOM_NOTES["data_bytes_ratio"]),
    ]
    return "\n".join([title, table(rows, header), *notes])


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


#: The unit of every number in the JSON: a key is its unit or ends in ``_<unit>``.
JSON_UNITS = {
    "bytes": "an integer number of bytes",
    "rows": "rows of a table",
    "entries": "state entries as stored (see notes)",
    "blocks": "rows of nidstate_blocks",
    "bytes_per_state_entry": "total bytes / state entries (a mean, not an integer)",
    "ratio": "synapse-nidstate's figure / Synapse's, a plain number",
    "count": "how many of what the key names",
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
    }


def _room_json(room: RoomStats) -> dict[str, Any]:
    return {
        "room_id": room.room_id,
        "name": room.name,
        "canonical_alias": room.canonical_alias,
        "label": room.label,
        "synapse_rows": room.synapse_rows,
        "synapse_data_bytes": room.synapse_data_bytes,
        "nidstate_entries": room.nidstate_entries,
        "nidstate_blocks": room.nidstate_blocks,
        "nidstate_data_bytes": room.nidstate_data_bytes,
        "data_bytes_ratio": room.data_bytes_ratio,
    }


def report_as_json(report: StorageReport) -> dict[str, Any]:
    """Every figure, with its unit in its key (see :data:`JSON_UNITS`, which the JSON
    carries as ``units``; ``notes`` says what the per-room figures count).

    Sizes the engine cannot tell (TOAST on SQLite, any size without ``dbstat``) are null.
    """
    return {
        "units": dict(JSON_UNITS),
        "notes": {
            "state_entries": (
                f"{SYNAPSE}: rows of state_groups_state; {NIDSTATE}: entries of "
                "nidstate_blocks (as synapse_rows and nidstate_entries of a room)"
            ),
            **ROOM_NOTES,
        },
        "engines": dict(report.engines),
        "size_method": report.size_method,
        "separate_state_database": report.separate_state_database,
        "top_rooms_requested_count": report.top,
        "synapse": _side_json(report.synapse),
        "nidstate": _side_json(report.nidstate),
        "nidstate_to_synapse_total_bytes_ratio": report.total_bytes_ratio,
        "nidstate_to_synapse_bytes_per_state_entry_ratio": report.bytes_per_state_entry_ratio,
        "top_rooms": [_room_json(room) for room in report.top_rooms],
        "reclaim": None
        if report.reclaim is None
        else {
            "groups_reclaimed_count": report.reclaim.groups,
            "rows_deleted_count": report.reclaim.rows_deleted,
            "state_footprint_total_bytes": report.footprint_bytes,
        },
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
    """Print the report (text, or JSON with --json) and draw it if --plot is given.

    A plot file that cannot be written is one line on standard error and exit
    code 2, found before the long scan when it can be.
    """
    if args.plot:
        require_matplotlib()  # before the long scan, not after it
        problem = plot_target_problem(args.plot)
        if problem is not None:
            return _cannot_plot(args.plot, problem)
    report = await storage_report(hs, top=args.top)
    if args.json:
        json.dump(report_as_json(report), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    sys.stdout.flush()
    if args.plot:
        try:
            plot_report(report, args.plot)
        except OSError as e:  # e.g. the directory went away during the scan
            return _cannot_plot(args.plot, e.strerror or str(e))
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _cannot_plot(path: str, why: str) -> int:
    print(f"synapse-nidstate: cannot write the plot to {path}: {why}", file=sys.stderr)
    return 2
