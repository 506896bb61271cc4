"""Creating and upgrading the module's tables in Synapse's main database.

Schema files live in ``sql/<engine>/NN_name.sql`` at the repository's top (in
the wheel: ``synapse_nidstate/storage/sql``). Each is applied once, in order, in one transaction
that also records the new version, so a crash half-way leaves the old schema.
"""

import logging
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from synapse.storage.database import LoggingDatabaseConnection, LoggingTransaction, make_conn
from synapse.storage.engines import BaseDatabaseEngine, PostgresEngine, Sqlite3Engine
from synapse.storage.prepare_database import get_statements

from synapse_nidstate.storage.common import arguments_by_name, check_fixed_nids_txn

if TYPE_CHECKING:
    from synapse.server import HomeServer

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Held while the schema is checked, so that the processes of a Synapse worker
#: deployment starting together apply it once.
_ADVISORY_LOCK_KEY = 0x6E6964737461  # "nidsta"

_FILE_RE = re.compile(r"^(\d+)_[a-z0-9_]+\.sql$")


def engine_name(engine: BaseDatabaseEngine) -> str:
    return "postgres" if isinstance(engine, PostgresEngine) else "sqlite"


def _sql_dir() -> Path:
    """The wheel ships ``sql/`` inside the package, beside this file; a checkout
    has it at the repository's top (pyproject.toml's force-include maps one to
    the other)."""
    shipped = Path(str(resources.files("synapse_nidstate.storage") / "sql"))
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent.parent / "sql"


def schema_dir(engine: BaseDatabaseEngine) -> Path:
    """Where this engine's schema files are."""
    return _sql_dir() / engine_name(engine)


def schema_files(engine: BaseDatabaseEngine) -> list[tuple[int, Path]]:
    """The schema files for this engine, by version."""
    directory = schema_dir(engine)
    files = []
    for path in directory.iterdir():
        match = _FILE_RE.match(path.name)
        if match:
            files.append((int(match.group(1)), path))
    if not files:
        raise RuntimeError(f"synapse-nidstate: no schema files in {directory}")
    return sorted(files)


def current_version_txn(txn: LoggingTransaction) -> int:
    """The applied schema version, 0 if the module's tables do not exist."""
    if isinstance(txn.database_engine, PostgresEngine):
        txn.execute("SELECT to_regclass('nidstate_meta') IS NOT NULL")
    else:
        txn.execute(
            "SELECT COUNT(*) > 0 FROM sqlite_master"
            " WHERE type = 'table' AND name = 'nidstate_meta'"
        )
    row = txn.fetchone()
    if not row or not row[0]:
        return 0
    txn.execute("SELECT value FROM nidstate_meta WHERE key = 'schema_version'")
    row = txn.fetchone()
    return int(row[0]) if row else 0


def apply_schema_txn(txn: LoggingTransaction, up_to: int | None = None) -> int:
    """Bring the module's tables up to the latest version (or ``up_to``); idempotent.

    Returns the version now applied. Raises RuntimeError if the database holds
    a newer schema than this release knows (a downgrade).
    """
    engine = txn.database_engine
    if isinstance(engine, PostgresEngine):
        txn.execute("SELECT pg_advisory_xact_lock(?)", (_ADVISORY_LOCK_KEY,))
    current = found = current_version_txn(txn)
    files = schema_files(engine)
    if current > files[-1][0]:
        raise RuntimeError(
            f"synapse-nidstate: the database has schema version {current}, newer than "
            f"this release's {files[-1][0]}; upgrade synapse-nidstate"
        )
    for version, path in files:
        if version <= current or (up_to is not None and version > up_to):
            continue
        logger.info("synapse-nidstate: applying schema %s", path.name)
        with path.open() as f:
            for statement in get_statements(f):
                txn.execute(statement)
        current = version
    if current != found:
        txn.execute("DELETE FROM nidstate_meta WHERE key = 'schema_version'")
        txn.execute(
            "INSERT INTO nidstate_meta (key, value) VALUES ('schema_version', ?)",
            (str(current),),
        )
    if isinstance(engine, PostgresEngine) and current >= LZ4_SINCE:
        _prefer_lz4_txn(txn)
    if current:
        check_fixed_nids_txn(txn)
    return current


#: The schema version from which :data:`LZ4_COLUMNS` exist.
LZ4_SINCE = 7

#: Columns PostgreSQL compresses with lz4 where the server has it (14 and
#: later, built with lz4), instead of its default pglz. A block's strings
#: (schema 7) are mostly event IDs, which pglz declines to compress (it
#: stores a value whole unless it saves a quarter); lz4 keeps whatever it
#: saves, on the state keys and types, and decompresses several times faster.
LZ4_COLUMNS = (("nidstate_blocks", "strings"),)


def _prefer_lz4_txn(txn: LoggingTransaction) -> None:
    """Set :data:`LZ4_COLUMNS` to lz4 if the server can and they are not yet
    (checked at every start: a server upgraded to one with lz4 gets it). The
    values already stored keep their compression; rewritten or new ones take
    lz4. Changing it is a change of the catalogue only."""
    txn.execute(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    )
    row = txn.fetchone()
    if not row or not row[0]:
        return  # before PostgreSQL 14, or built without lz4: pglz, as before
    for table, column in LZ4_COLUMNS:
        txn.execute(
            "SELECT attcompression FROM pg_attribute"
            " WHERE attrelid = to_regclass(?) AND attname = ?",
            (table, column),
        )
        row = txn.fetchone()
        if row is not None and row[0] != "l":
            txn.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


#: Every table the module owns, for `drop` and for storage statistics.
TABLES = (
    "nidstate_meta",
    "nidstate_rooms",
    "nidstate_event_types",
    "nidstate_state_keys",
    "nidstate_events",
    "nidstate_blocks",
    "nidstate_block_pieces",
    "nidstate_snapshots",
    "nidstate_state_groups",
    "nidstate_reclaimed_groups",
)


def analyze_tables_txn(txn: LoggingTransaction) -> bool:
    """Fresh planner statistics for the module's tables, once a migration
    has filled them; False where there is nothing to do.

    PostgreSQL plans on a table's last statistics, and tables created empty
    and filled by ``migrate`` have none until autovacuum comes round (never,
    where it is off): meanwhile the reads' ``= ANY`` probes of a few dozen
    blocks are planned as scans of the whole table (0.36 against 0.05 ms for a
    cold narrow read's blocks at M, ``EXPLAIN ANALYZE``). SQLite keeps no
    statistics unless ``ANALYZE`` ran once, and Synapse never runs it there:
    its tables' plans are left as they are."""
    if not isinstance(txn.database_engine, PostgresEngine):
        return False
    for table in TABLES:
        txn.execute(f"ANALYZE {table}")
    return True


def apply_schema(hs: "HomeServer") -> int:
    """Create or upgrade the module's tables in ``hs``'s main database, now.

    Runs on a connection of its own, synchronously: the module calls it while
    Synapse starts (before any event can be persisted), the CLI before it works.
    Every way Synapse accepts to name a database works, since the connection is
    made by Synapse's own ``make_conn`` from the same settings (``database`` or
    ``dbname``, a DSN, a unix socket).

    An in-memory SQLite database (Synapse's own test harness) is a new, empty
    database on every connection: the tables are created on each connection
    Synapse's pool opens instead (see :func:`_apply_on_every_connection`).
    """
    db_pool = hs.get_datastores().main.db_pool
    if isinstance(db_pool.engine, Sqlite3Engine) and db_pool.engine._is_in_memory:
        return _apply_on_every_connection(hs)
    return on_own_connection(hs, _apply_on)


def on_own_connection(hs: "HomeServer", fn: Callable[[LoggingDatabaseConnection], T]) -> T:
    """``fn`` on a new connection to ``hs``'s main database, closed afterwards."""
    db_pool = hs.get_datastores().main.db_pool
    conn = make_conn(
        db_config=db_pool._database_config,
        engine=db_pool.engine,
        default_txn_name="nidstate_schema",
        server_name=hs.hostname,
    )
    try:
        return fn(conn)
    finally:
        conn.close()


def _apply_on(conn: LoggingDatabaseConnection) -> int:
    """Bring the schema up to date on ``conn`` and commit; returns the version."""
    cursor = conn.cursor(txn_name="nidstate_apply_schema")
    if isinstance(conn.engine, PostgresEngine):
        # Synapse's connections are REPEATABLE READ, whose snapshot would be
        # taken before the advisory lock is granted: the processes of a
        # worker deployment starting together would then read a stale
        # schema version and fail to serialize. Each statement sees what
        # the process that held the lock before committed.
        cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
    version = apply_schema_txn(cursor)
    conn.commit()
    return version


def _apply_on_every_connection(hs: "HomeServer") -> int:
    """In-memory SQLite: create the tables on the connections Synapse's pool holds
    and, by wrapping ``SQLite3Engine.on_new_connection`` (which rebuilds Synapse's
    own schema on every new in-memory connection), on every one it opens later."""
    db_pool = hs.get_datastores().main.db_pool
    engine = db_pool.engine
    prepare = engine.on_new_connection
    named = arguments_by_name(prepare)

    def on_new_connection(*args: Any, **kwargs: Any) -> None:
        prepare(*args, **kwargs)
        _apply_on(named(args, kwargs)["db_conn"])

    engine.on_new_connection = on_new_connection  # type: ignore[method-assign]
    version = schema_files(engine)[-1][0]
    for conn in list(db_pool._db_pool.connections.values()):
        version = _apply_on(
            LoggingDatabaseConnection(
                conn=conn,
                engine=engine,
                default_txn_name="nidstate_schema",
                server_name=hs.hostname,
            )
        )
    return version


def drop_tables_txn(txn: LoggingTransaction) -> None:
    """Remove every table (and sequence) of the module; Synapse's own are not touched."""
    for table in TABLES:
        txn.execute(f"DROP TABLE IF EXISTS {table}")
    if isinstance(txn.database_engine, PostgresEngine):
        txn.execute("DROP SEQUENCE IF EXISTS nidstate_event_types_seq")
        txn.execute("DROP SEQUENCE IF EXISTS nidstate_state_keys_seq")
