"""The module's work inside Synapse's transactions, contained by a savepoint.

The mirror writes and the group reads run in Synapse's own transaction: a
failure of the module's must not abort Synapse's work in it. Each runs in a
savepoint that a failure of ours rolls back to; an error Synapse retries the
whole transaction for is left to Synapse.

The savepoint is taken at the first statement, not before: a group read
answered from the module's caches runs no statement, and then costs no round
trip (SAVEPOINT and RELEASE were a third of a warm group read on PostgreSQL;
docs/benchmarks.md, "PostgreSQL M before and after the containment work").
"""

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import BaseDatabaseEngine, PostgresEngine

T = TypeVar("T")


class Contained(Exception):
    """A failure of the module's own inside Synapse's transaction, rolled back
    to a savepoint (``in_savepoint``); ``__cause__`` is the original error."""


#: SQLite's primary result codes for "try again later" (SQLITE_BUSY, SQLITE_LOCKED).
_SQLITE_RETRY_CODES = (5, 6)


def must_retry(engine: BaseDatabaseEngine, error: BaseException) -> bool:
    """Whether ``error`` is one Synapse's ``runInteraction`` retries the whole
    transaction for and that no savepoint can undo: on PostgreSQL an
    ``OperationalError`` (serialization failure, deadlock, a lost connection, a
    lock or statement timeout) or an ``InterfaceError`` (connection closed); on
    SQLite "database is locked"/"busy" only. SQLite raises ``OperationalError``
    for "no such table", "no such column" and syntax errors too: those are
    faults of the module, rolled back to the savepoint, not retried."""
    module = engine.module
    if isinstance(engine, PostgresEngine):
        return isinstance(error, (module.OperationalError, module.InterfaceError)) or (
            isinstance(error, module.DatabaseError) and engine.is_deadlock(error)
        )
    if not isinstance(error, sqlite3.OperationalError):
        return False
    code = getattr(error, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in _SQLITE_RETRY_CODES
    message = str(error)
    return "locked" in message or "busy" in message


class _SavepointOnFirstStatement:
    """Synapse's transaction as the module's code sees it inside
    :func:`in_savepoint`: every way of running a statement first takes the
    savepoint (once); everything else is the transaction's own."""

    __slots__ = ("_txn", "_name", "opened")

    def __init__(self, txn: LoggingTransaction, name: str) -> None:
        self._txn = txn
        self._name = name
        self.opened = False

    def _open(self) -> None:
        if not self.opened:
            self._txn.execute(f"SAVEPOINT {self._name}")
            self.opened = True

    def execute(self, sql: str, parameters: Any = ()) -> None:
        self._open()
        self._txn.execute(sql, parameters)

    def executemany(self, sql: str, *args: Any) -> None:
        self._open()
        self._txn.executemany(sql, *args)

    def execute_batch(self, sql: str, *args: Any, **kwargs: Any) -> None:
        self._open()
        self._txn.execute_batch(sql, *args, **kwargs)

    def execute_values(self, sql: str, *args: Any, **kwargs: Any) -> list[tuple]:
        self._open()
        return self._txn.execute_values(sql, *args, **kwargs)

    def executescript(self, sql: str) -> None:
        self._open()
        self._txn.executescript(sql)

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._txn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._txn, name)


def in_savepoint(
    txn: LoggingTransaction, name: str, fn: Callable[[LoggingTransaction], T]
) -> T:
    """``fn(txn)`` in a savepoint of ``txn`` (Synapse's transaction), taken at
    ``fn``'s first statement (``fn`` runs every statement on the transaction it
    is given): an error Synapse must retry (:func:`must_retry`) is raised as it
    is; any other error rolls back to the savepoint, if ``fn`` got as far as a
    statement, so Synapse's own work in ``txn`` goes on, and is raised as
    :class:`Contained`."""
    contained = _SavepointOnFirstStatement(txn, name)
    try:
        result = fn(cast(LoggingTransaction, contained))
    except Exception as e:
        if must_retry(txn.database_engine, e):
            raise
        if contained.opened:
            txn.execute(f"ROLLBACK TO SAVEPOINT {name}")
            txn.execute(f"RELEASE SAVEPOINT {name}")
        raise Contained(str(e)) from e
    if contained.opened:
        txn.execute(f"RELEASE SAVEPOINT {name}")
    return result
