"""`synapse-nidstate stats`: what Synapse's state storage and the module's tables cost on disk.

Sizes come from the database itself, so they match what its own tools show:

- PostgreSQL: ``pg_table_size``, ``pg_indexes_size`` and ``pg_total_relation_size``
  (what ``psql``'s ``\\dt+`` and ``\\di+`` report). ``table_bytes`` is the heap
  with its free-space and visibility maps, ``toast_bytes`` the TOAST table with
  its index (``pg_class.reltoastrelid``), so that
  ``table_bytes + index_bytes + toast_bytes == total_bytes`` and
  ``table_bytes + toast_bytes == pg_table_size``.
- SQLite: the pages of each b-tree, from the ``dbstat`` virtual table
  (``SUM(pgsize)``, overflow pages included); each index is counted with its
  table through ``sqlite_master.tbl_name``. SQLite has no TOAST (``None``). An
  SQLite built without ``dbstat`` gives no per-table sizes (``None``); the
  report then says so and gives the database file's size (``page_size`` x
  ``page_count``) instead.

Row counts are exact (``COUNT(*)``), and the top rooms need a scan of
``state_groups_state``: on a large server this takes as long as reading it.
"""

import argparse
import json
import sys
from typing import Any

import attr
from synapse.server import HomeServer
from synapse.storage.database import DatabasePool, LoggingTransaction
from synapse.storage.engines import PostgresEngine

from synapse_nidstate.schema import TABLES, engine_name

#: Synapse's state storage: the state database's tables, and the main one's map.
SYNAPSE_STATE_TABLES = ("state_groups", "state_groups_state", "state_group_edges")
SYNAPSE_MAIN_TABLES = ("event_to_state_groups",)

SYNAPSE = "Synapse"
NIDSTATE = "synapse-nidstate"

_BYTE_FIELDS = ("table_bytes", "index_bytes", "toast_bytes", "total_bytes")


@attr.s(auto_attribs=True, frozen=True, slots=True)
class TableStats:
    """One table: its rows and its size on disk (None: the engine cannot tell)."""

    name: str
    #: "main" or "state": which of Synapse's databases holds it.
    database: str
    exists: bool
    rows: int
    table_bytes: int | None
    index_bytes: int | None
    #: PostgreSQL's out-of-line storage (TOAST table and its index); None on SQLite.
    toast_bytes: int | None
    total_bytes: int | None


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RoomStats:
    """One room's share of a side's state storage."""

    room_id: str
    #: Synapse: rows of state_groups_state; module: sum of nidstate_blocks.entry_count.
    state_entries: int
    #: Bytes of the stored values, without row headers or indexes. Synapse: the
    #: columns of its state_groups_state rows (``pg_column_size``, or the length of
    #: each value as a blob on SQLite, 8 for the state group); module: ``length(entries)``.
    data_bytes: int
    #: Synapse: state_groups_state rows; module: nidstate_blocks rows.
    rows: int


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SideStats:
    """Synapse's state storage, or the module's tables."""

    name: str
    tables: list[TableStats]
    state_entries: int
    top_rooms: list[RoomStats]

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def _sum(self, field: str) -> int | None:
        values = [getattr(t, field) for t in self.tables if t.exists]
        if not values or any(v is None for v in values):
            return None
        return sum(values)

    @property
    def table_bytes(self) -> int | None:
        return self._sum("table_bytes")

    @property
    def index_bytes(self) -> int | None:
        return self._sum("index_bytes")

    @property
    def toast_bytes(self) -> int | None:
        return self._sum("toast_bytes")

    @property
    def total_bytes(self) -> int | None:
        return self._sum("total_bytes")

    @property
    def bytes_per_state_entry(self) -> float | None:
        total = self.total_bytes
        if total is None or not self.state_entries:
            return None
        return total / self.state_entries


@attr.s(auto_attribs=True, frozen=True, slots=True)
class StorageReport:
    synapse: SideStats
    nidstate: SideStats
    #: {"main": "postgres" | "sqlite", "state": ...}
    engines: dict[str, str]
    #: How the sizes were measured, in words.
    size_method: str
    top: int
    #: Synapse's state tables live in a database of their own (``data_stores: [state]``).
    separate_state_database: bool = False

    @property
    def total_bytes_ratio(self) -> float | None:
        """The module's total bytes over Synapse's."""
        ours, theirs = self.nidstate.total_bytes, self.synapse.total_bytes
        if ours is None or not theirs:
            return None
        return ours / theirs

    @property
    def bytes_per_state_entry_ratio(self) -> float | None:
        ours, theirs = self.nidstate.bytes_per_state_entry, self.synapse.bytes_per_state_entry
        if ours is None or not theirs:
            return None
        return ours / theirs


# --- measuring ---------------------------------------------------------------

_PG_SIZES = """
    SELECT
        pg_table_size(c.oid),
        pg_indexes_size(c.oid),
        pg_total_relation_size(c.oid),
        CASE WHEN c.reltoastrelid = 0 THEN 0
             ELSE pg_total_relation_size(c.reltoastrelid) END
    FROM pg_class AS c
    WHERE c.oid = to_regclass(?)
"""


def _has_dbstat_txn(txn: LoggingTransaction) -> bool:
    txn.execute("PRAGMA compile_options")
    return any(row[0] == "ENABLE_DBSTAT_VTAB" for row in txn.fetchall())


def _sqlite_btree_bytes_txn(txn: LoggingTransaction, name: str) -> int:
    txn.execute("SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = ?", (name,))
    row = txn.fetchone()
    return int(row[0]) if row else 0


def _table_stats_txn(
    txn: LoggingTransaction, table: str, database: str, dbstat: bool
) -> TableStats:
    postgres = isinstance(txn.database_engine, PostgresEngine)
    if postgres:
        txn.execute(_PG_SIZES, (table,))
        sizes = txn.fetchone()
        if sizes is None:
            return TableStats(table, database, False, 0, None, None, None, None)
        table_size, index_bytes, total_bytes, toast_bytes = (int(v) for v in sizes)
        table_bytes: int | None = table_size - toast_bytes
        toast: int | None = toast_bytes
        indexes: int | None = index_bytes
        total: int | None = total_bytes
    else:
        txn.execute(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        )
        row = txn.fetchone()
        if not row or not row[0]:
            return TableStats(table, database, False, 0, None, None, None, None)
        toast = None
        if dbstat:
            table_bytes = _sqlite_btree_bytes_txn(txn, table)
            txn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?"
                " ORDER BY name",
                (table,),
            )
            index_names = [r[0] for r in txn.fetchall()]
            indexes = sum(_sqlite_btree_bytes_txn(txn, name) for name in index_names)
            total = table_bytes + indexes
        else:
            table_bytes = indexes = total = None
    txn.execute(f"SELECT COUNT(*) FROM {table}")
    row = txn.fetchone()
    rows = int(row[0]) if row else 0
    return TableStats(table, database, True, rows, table_bytes, indexes, toast, total)


async def _tables(
    db_pool: DatabasePool, tables: tuple[str, ...], database: str, what: str
) -> tuple[list[TableStats], str]:
    """The tables' stats, and how their sizes were measured."""

    def tables_txn(txn: LoggingTransaction) -> tuple[list[TableStats], str]:
        if isinstance(txn.database_engine, PostgresEngine):
            dbstat = False
            method = (
                "PostgreSQL pg_table_size / pg_indexes_size / pg_total_relation_size "
                "(as psql \\dt+ and \\di+ show them)"
            )
        else:
            dbstat = _has_dbstat_txn(txn)
            if dbstat:
                method = "SQLite dbstat: pages of each table and of its indexes"
            else:
                txn.execute("PRAGMA page_size")
                page_size = int(txn.fetchone()[0])  # type: ignore[index]
                txn.execute("PRAGMA page_count")
                page_count = int(txn.fetchone()[0])  # type: ignore[index]
                method = (
                    "SQLite without dbstat: no per-table sizes; the whole "
                    f"{database} database file is {page_size} x {page_count} = "
                    f"{page_size * page_count} bytes"
                )
        stats = [_table_stats_txn(txn, table, database, dbstat) for table in tables]
        return stats, method

    return await db_pool.runInteraction(f"nidstate_stats_{what}", tables_txn)


async def _module_state_entries(db_pool: DatabasePool, exists: bool) -> int:
    if not exists:
        return 0

    def entries_txn(txn: LoggingTransaction) -> int:
        txn.execute("SELECT COALESCE(SUM(entry_count), 0) FROM nidstate_blocks")
        row = txn.fetchone()
        return int(row[0]) if row else 0

    return await db_pool.runInteraction("nidstate_stats_module_entries", entries_txn)


async def _synapse_top_rooms(db_pool: DatabasePool, top: int) -> list[RoomStats]:
    def top_txn(txn: LoggingTransaction) -> list[RoomStats]:
        if isinstance(txn.database_engine, PostgresEngine):
            size = " + ".join(
                f"COALESCE(pg_column_size({c}), 0)"
                for c in ("state_group", "room_id", "type", "state_key", "event_id")
            )
        else:
            size = "8 + " + " + ".join(
                f"COALESCE(LENGTH(CAST({c} AS BLOB)), 0)"
                for c in ("room_id", "type", "state_key", "event_id")
            )
        txn.execute(
            f"SELECT room_id, COUNT(*), SUM({size}) FROM state_groups_state"
            " GROUP BY room_id ORDER BY COUNT(*) DESC, room_id LIMIT ?",
            (top,),
        )
        return [
            RoomStats(room_id, int(count), int(size or 0), int(count))
            for room_id, count, size in txn.fetchall()
        ]

    return await db_pool.runInteraction("nidstate_stats_synapse_top_rooms", top_txn)


async def _module_top_rooms(db_pool: DatabasePool, top: int) -> list[RoomStats]:
    def top_txn(txn: LoggingTransaction) -> list[RoomStats]:
        txn.execute(
            "SELECT r.room_id, SUM(b.entry_count), SUM(LENGTH(b.entries)), COUNT(*)"
            " FROM nidstate_blocks AS b JOIN nidstate_rooms AS r ON r.room_nid = b.room_nid"
            " GROUP BY r.room_id ORDER BY SUM(b.entry_count) DESC, r.room_id LIMIT ?",
            (top,),
        )
        return [
            RoomStats(room_id, int(entries), int(size or 0), int(blocks))
            for room_id, entries, size, blocks in txn.fetchall()
        ]

    return await db_pool.runInteraction("nidstate_stats_module_top_rooms", top_txn)


async def storage_report(hs: HomeServer, top: int = 10) -> StorageReport:
    """Measure Synapse's state storage and the module's tables in ``hs``'s databases."""
    if top < 0:
        raise ValueError("top must be at least 0")
    stores = hs.get_datastores()
    main, state = stores.main.db_pool, stores.state.db_pool

    state_tables, state_method = await _tables(state, SYNAPSE_STATE_TABLES, "state", "synapse_state")
    main_tables, main_method = await _tables(main, SYNAPSE_MAIN_TABLES, "main", "synapse_main")
    module_tables, _ = await _tables(main, TABLES, "main", "module")

    synapse_entries = next(t.rows for t in state_tables if t.name == "state_groups_state")
    module_exists = {t.name: t.exists for t in module_tables}
    module_entries = await _module_state_entries(main, module_exists["nidstate_blocks"])

    synapse_top: list[RoomStats] = []
    module_top: list[RoomStats] = []
    if top:
        synapse_top = await _synapse_top_rooms(state, top)
        if module_exists["nidstate_blocks"] and module_exists["nidstate_rooms"]:
            module_top = await _module_top_rooms(main, top)

    if state is main or state_method == main_method:
        method = main_method
    else:
        method = f"main database: {main_method}; state database: {state_method}"
    return StorageReport(
        synapse=SideStats(SYNAPSE, state_tables + main_tables, synapse_entries, synapse_top),
        nidstate=SideStats(NIDSTATE, module_tables, module_entries, module_top),
        engines={"main": engine_name(main.engine), "state": engine_name(state.engine)},
        size_method=method,
        top=top,
        separate_state_database=state is not main,
    )


# --- presenting --------------------------------------------------------------


def format_bytes(n: int | float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"n/a"``."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _number(n: int | None) -> str:
    return "n/a" if n is None else f"{n:,}"


def _ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.3f}"


def format_report(report: StorageReport) -> str:
    """The report as text tables: totals side by side, then each table, then the top rooms."""
    from synapse_nidstate.cli import _table

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
    lines.append(_table(summary, ("", SYNAPSE, NIDSTATE)))
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
        lines += ["", f"{side.name}:", _table(rows, header)]

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
            _table(
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


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "plotting needs matplotlib: pip install 'synapse-nidstate[plot]'"
        ) from e


def plot_report(report: StorageReport, path: str) -> None:
    """Write a PNG bar chart: bytes per table on both sides, and the top rooms."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    syn, mod = report.synapse, report.nidstate
    colours = {SYNAPSE: "#d95f02", NIDSTATE: "#1b9e77"}
    fig = Figure(figsize=(11, 13), layout="constrained")
    FigureCanvasAgg(fig)
    ax_tables, ax_entries, ax_bytes = fig.subplots(3, 1)

    # Bytes per table, stacked heap / indexes / TOAST, one colour per side.
    tables = [(side, t) for side in (syn, mod) for t in side.tables if t.exists]
    ys = list(range(len(tables)))
    left = [0.0] * len(tables)
    handles = [Patch(facecolor=colours[side.name], label=side.name) for side in (syn, mod)]
    for field, label, alpha in (
        ("table_bytes", "table", 1.0),
        ("index_bytes", "indexes", 0.55),
        ("toast_bytes", "TOAST", 0.25),
    ):
        widths = [float(getattr(t, field) or 0) for _, t in tables]
        if not any(widths):
            continue
        ax_tables.barh(
            ys,
            widths,
            left=left,
            color=[colours[side.name] for side, _ in tables],
            alpha=alpha,
            edgecolor="black",
            linewidth=0.3,
        )
        handles.append(Patch(facecolor="grey", alpha=alpha, edgecolor="black", label=label))
        left = [a + b for a, b in zip(left, widths)]
    ax_tables.set_yticks(ys, [t.name for _, t in tables])
    ax_tables.invert_yaxis()
    ax_tables.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x)))
    ratio = report.total_bytes_ratio
    ax_tables.set_title(
        f"Bytes per table: {SYNAPSE} {format_bytes(syn.total_bytes)}, "
        f"{NIDSTATE} {format_bytes(mod.total_bytes)}"
        + ("" if ratio is None else f" (ratio {ratio:.3f})")
    )
    ax_tables.legend(handles=handles, loc="best")

    # The top rooms of either side, in Synapse's order, then the module's.
    rooms: list[str] = []
    for room in syn.top_rooms + mod.top_rooms:
        if room.room_id not in rooms:
            rooms.append(room.room_id)
    by_side = {side.name: {r.room_id: r for r in side.top_rooms} for side in (syn, mod)}
    height = 0.4
    for ax, field, unit in (
        (ax_entries, "state_entries", "state entries"),
        (ax_bytes, "data_bytes", "stored state data"),
    ):
        for offset, side in ((-height / 2, syn), (height / 2, mod)):
            values = [
                float(getattr(by_side[side.name][r], field)) if r in by_side[side.name] else 0.0
                for r in rooms
            ]
            ax.barh(
                [i + offset for i in range(len(rooms))],
                values,
                height=height,
                color=colours[side.name],
                label=side.name,
            )
        ax.set_yticks(list(range(len(rooms))), rooms, fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel(unit)
        if field == "data_bytes":
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_bytes(x)))
        missing = any(r not in by_side[side.name] for side in (syn, mod) for r in rooms)
        ax.set_title(
            f"Top rooms: {unit}"
            + (" (no bar: not in that side's top rooms)" if missing else "")
        )
        if rooms:
            ax.legend(loc="best")
    fig.savefig(path, format="png", dpi=100)


# --- command line -----------------------------------------------------------


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
        _require_matplotlib()  # before the long scan, not after it
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
