"""What `synapse-nidstate stats` measures: what Synapse's state storage and the module's tables cost on disk.

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

Row counts are exact (``COUNT(*)``). The top rooms are ranked by their rows in
``state_groups_state``, which needs a scan of it (on a large server this takes as
long as reading it); the module's figures are then read for the same rooms, and
names from Synapse's ``room_stats_state``.
"""

import attr
from synapse.server import HomeServer
from synapse.storage.database import (
    DatabasePool,
    LoggingTransaction,
    make_in_list_sql_clause,
)
from synapse.storage.engines import PostgresEngine

from synapse_nidstate.storage.reclaim import reclaimed_totals_txn
from synapse_nidstate.storage.schema import TABLES, engine_name

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


#: What each per-room figure is (the text report's footnote, the JSON's ``notes``).
ROOM_NOTES = {
    "synapse_rows": (
        "the room's rows in state_groups_state, a full copy of its state at every "
        "state group stored without a predecessor (the first, one after every 100 "
        "deltas, and wherever Synapse has no delta), then one row per changed key at "
        "every other state group"
    ),
    "nidstate_entries": (
        "the entries of the room's nidstate_blocks, its full state for a state group "
        "without a predecessor and again at every compaction (when a snapshot reaches 64 "
        "blocks), one entry per changed key in every delta block (removed keys as "
        "tombstones); identical blocks are stored once. So a room can hold more "
        "entries than Synapse rows: the module writes its full state again after at "
        "most 63 deltas, Synapse after 100"
    ),
    "data_bytes": (
        "bytes of the stored values alone, without row headers, indexes, the "
        "module's interned strings or its per-event table: Synapse: the columns of "
        "its state_groups_state rows (pg_column_size; on SQLite the length of each "
        "value, 8 for the state group); synapse-nidstate: its blocks' packed "
        "entries (a tag byte, then 12 bytes an entry)"
    ),
    "data_bytes_ratio": "synapse-nidstate's data bytes / Synapse's, for the room",
}


@attr.s(auto_attribs=True, frozen=True, slots=True)
class RoomStats:
    """One room's state storage on both sides (see :data:`ROOM_NOTES`)."""

    room_id: str
    #: From Synapse's ``room_stats_state`` (None: the room has none).
    name: str | None
    canonical_alias: str | None
    #: Rows of ``state_groups_state``.
    synapse_rows: int
    synapse_data_bytes: int
    #: Sums over the room's ``nidstate_blocks`` (0: no blocks; None: no module tables).
    nidstate_entries: int | None
    nidstate_blocks: int | None
    nidstate_data_bytes: int | None

    @property
    def label(self) -> str:
        """The room's name, else its canonical alias, else its ID."""
        return self.name or self.canonical_alias or self.room_id

    @property
    def data_bytes_ratio(self) -> float | None:
        """The module's data bytes over Synapse's."""
        if self.nidstate_data_bytes is None or not self.synapse_data_bytes:
            return None
        return self.nidstate_data_bytes / self.synapse_data_bytes


@attr.s(auto_attribs=True, frozen=True, slots=True)
class SideStats:
    """Synapse's state storage, or the module's tables."""

    name: str
    tables: list[TableStats]
    #: Synapse: rows of state_groups_state; module: the entries of nidstate_blocks
    #: (full states and deltas as each side stores them, see :data:`ROOM_NOTES`).
    state_entries: int

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
class ReclaimFigures:
    """What reclaim deleted (``nidstate_reclaimed_groups``)."""

    groups: int
    rows_deleted: int


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
    #: The ``top`` rooms with the most rows in ``state_groups_state``, most first.
    top_rooms: list[RoomStats] = attr.Factory(list)
    #: None: the module's reclaim table does not exist (an older schema, or none).
    reclaim: ReclaimFigures | None = None

    @property
    def footprint_bytes(self) -> int | None:
        """Synapse's state tables as they are plus the module's: the state footprint."""
        ours, theirs = self.nidstate.total_bytes, self.synapse.total_bytes
        if ours is None or theirs is None:
            return None
        return ours + theirs

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


async def table_figures(db_pool: DatabasePool, table: str, database: str) -> TableStats:
    """One table's rows and bytes, measured as ``stats`` measures them."""
    stats, _ = await _tables(db_pool, (table,), database, f"table_{table}")
    return stats[0]


async def room_names(
    db_pool: DatabasePool, room_ids: list[str]
) -> dict[str, tuple[str | None, str | None]]:
    """Room ID -> (name, canonical alias), from Synapse's ``room_stats_state``."""
    return await _room_names(db_pool, room_ids)


async def _synapse_top_rooms(db_pool: DatabasePool, top: int) -> list[tuple[str, int, int]]:
    """(room ID, rows, data bytes) of the rooms with the most state_groups_state rows."""

    def top_txn(txn: LoggingTransaction) -> list[tuple[str, int, int]]:
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
        return [(room_id, int(count), int(size or 0)) for room_id, count, size in txn.fetchall()]

    return await db_pool.runInteraction("nidstate_stats_synapse_top_rooms", top_txn)


def _chunks(values: list[str], size: int = 500) -> list[list[str]]:
    return [values[i : i + size] for i in range(0, len(values), size)]


async def _module_rooms(
    db_pool: DatabasePool, room_ids: list[str]
) -> dict[str, tuple[int, int, int]]:
    """Room ID -> (entries, blocks, data bytes) of the module's blocks of these rooms."""

    def rooms_txn(txn: LoggingTransaction) -> dict[str, tuple[int, int, int]]:
        found: dict[str, tuple[int, int, int]] = {}
        for chunk in _chunks(room_ids):
            clause, args = make_in_list_sql_clause(txn.database_engine, "r.room_id", chunk)
            txn.execute(
                "SELECT r.room_id, SUM(b.entry_count), COUNT(*), SUM(LENGTH(b.entries))"
                " FROM nidstate_blocks AS b"
                " JOIN nidstate_rooms AS r ON r.room_nid = b.room_nid"
                f" WHERE {clause} GROUP BY r.room_id",
                args,
            )
            for room_id, entries, blocks, size in txn.fetchall():
                found[room_id] = (int(entries), int(blocks), int(size or 0))
        return found

    return await db_pool.runInteraction("nidstate_stats_module_rooms", rooms_txn)


async def _room_names(
    db_pool: DatabasePool, room_ids: list[str]
) -> dict[str, tuple[str | None, str | None]]:
    """Room ID -> (name, canonical alias), from Synapse's ``room_stats_state``."""

    def names_txn(txn: LoggingTransaction) -> dict[str, tuple[str | None, str | None]]:
        found: dict[str, tuple[str | None, str | None]] = {}
        for chunk in _chunks(room_ids):
            clause, args = make_in_list_sql_clause(txn.database_engine, "room_id", chunk)
            txn.execute(
                f"SELECT room_id, name, canonical_alias FROM room_stats_state WHERE {clause}",
                args,
            )
            for room_id, name, alias in txn.fetchall():
                found[room_id] = (_one_line(name), _one_line(alias))
        return found

    return await db_pool.runInteraction("nidstate_stats_room_names", names_txn)


def _one_line(value: str | None) -> str | None:
    """A name as one line of text (None if empty)."""
    if not value:
        return None
    return " ".join(str(value).split()) or None


async def _top_rooms(
    main: DatabasePool, state: DatabasePool, top: int, module_tables: bool
) -> list[RoomStats]:
    """The ``top`` rooms by Synapse's rows, with both sides' figures for each."""
    synapse_rooms = await _synapse_top_rooms(state, top)
    room_ids = [room_id for room_id, _, _ in synapse_rooms]
    module = await _module_rooms(main, room_ids) if module_tables and room_ids else {}
    names = await _room_names(main, room_ids) if room_ids else {}
    rooms = []
    for room_id, rows, data_bytes in synapse_rooms:
        name, alias = names.get(room_id, (None, None))
        entries, blocks, module_bytes = module.get(room_id, (0, 0, 0))
        rooms.append(
            RoomStats(
                room_id=room_id,
                name=name,
                canonical_alias=alias,
                synapse_rows=rows,
                synapse_data_bytes=data_bytes,
                nidstate_entries=entries if module_tables else None,
                nidstate_blocks=blocks if module_tables else None,
                nidstate_data_bytes=module_bytes if module_tables else None,
            )
        )
    return rooms


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
    reclaim = None
    if module_exists.get("nidstate_reclaimed_groups"):

        def reclaim_txn(txn: LoggingTransaction) -> ReclaimFigures:
            return ReclaimFigures(*reclaimed_totals_txn(txn))

        reclaim = await main.runInteraction("nidstate_stats_reclaim", reclaim_txn)
    module_entries = await _module_state_entries(main, module_exists["nidstate_blocks"])

    top_rooms: list[RoomStats] = []
    if top:
        top_rooms = await _top_rooms(
            main,
            state,
            top,
            module_exists["nidstate_blocks"] and module_exists["nidstate_rooms"],
        )

    if state is main or state_method == main_method:
        method = main_method
    else:
        method = f"main database: {main_method}; state database: {state_method}"
    return StorageReport(
        synapse=SideStats(SYNAPSE, state_tables + main_tables, synapse_entries),
        nidstate=SideStats(NIDSTATE, module_tables, module_entries),
        engines={"main": engine_name(main.engine), "state": engine_name(state.engine)},
        size_method=method,
        top=top,
        separate_state_database=state is not main,
        top_rooms=top_rooms,
        reclaim=reclaim,
    )


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
