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

Row counts are exact (``COUNT(*)``), and the top rooms need a scan of
``state_groups_state``: on a large server this takes as long as reading it.
"""

import attr
from synapse.server import HomeServer
from synapse.storage.database import DatabasePool, LoggingTransaction
from synapse.storage.engines import PostgresEngine

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
