"""The module's hot reads as server-side prepared statements (PostgreSQL).

A cold narrow read is three short statements (a group's snapshot, its
blocks, their strings), and PostgreSQL spent longer planning each than
running it: the first one of a one-member read at M planned in 0.15 ms and
ran in 0.03 (``EXPLAIN (ANALYZE, SUMMARY)``). So each read statement is
prepared once per connection, under a name that says what it reads, and run
with ``EXECUTE``; Synapse's own statements are untouched. After five runs
PostgreSQL keeps a generic plan where it costs no more than planning each
run: probes of primary keys by one value (``common.in_list_clause`` gives
one value as a scalar for this) or by ``= ANY`` of an array. Synapse's
state-group read of one member's key against the module's went from 0.76-0.78x
to 0.91-0.96x at M (``python -m benchmarks.profile --engine postgres --scale
M --lookup group-member --compare``; docs/benchmarks.md, session 26).

A prepared statement lives as long as its connection, whatever the
transactions on it do (``PREPARE`` is not undone by a rollback), so what was
prepared is remembered per connection (weakly: a connection Synapse closes
takes its statements with it). If the server has lost them anyway (a
connection pooler that hands a session to another client, ``DISCARD ALL``),
``EXECUTE`` fails with ``invalid_sql_statement_name``, which psycopg2 raises
as an ``OperationalError``: Synapse's ``runInteraction`` runs the
transaction again, and the connection's statements, forgotten first, are
prepared again. The third time a process finds its statements lost, it stops
preparing them and says so once (a pooler in transaction mode loses them on
every transaction); ``prepared_statements: false`` in the module's config
keeps them off from the start.

SQLite is in-process and caches its own compiled statements: a statement
runs as given.
"""

import itertools
import logging
import re
import weakref
from collections.abc import Sequence
from typing import Any, cast

from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine

#: At most this many statements are prepared on one connection; later shapes
#: run unprepared. The reads have a few dozen shapes in use (by table, by
#: which strings a read misses, by the number of key ranges), and each takes
#: about 32 KiB of the server's memory for its connection (a narrow read's
#: blocks statement at M, ``pg_backend_memory_contexts``): 100 bound it to
#: about 3 MiB a connection.
MOST_PER_CONNECTION = 100

#: SQLSTATEs meaning the server's prepared statements are not what this
#: process remembers: ``invalid_sql_statement_name`` (an ``EXECUTE`` of one it
#: lost) and ``duplicate_prepared_statement`` (a ``PREPARE`` of one it has).
_LOST = frozenset({"26000", "42P05"})

_PLACEHOLDER = re.compile(r"\?")

#: Lost this many times, the statements are no longer prepared in this process.
MOST_LOSSES = 3

#: Statements' numbers, process-wide: two module instances in one process
#: (Synapse's own tests run a worker's homeserver beside the main one, on the
#: same connections) never give two statements one name, which the second
#: ``PREPARE`` would refuse (``duplicate_prepared_statement``: the read then
#: fell back to Synapse's, in Synapse's replication tests).
_NUMBERS = itertools.count(1)

logger = logging.getLogger(__name__)


class PreparedStatements:
    """Which statements each connection has prepared, and running them."""

    def __init__(self, enabled: bool = True, most: int = MOST_PER_CONNECTION) -> None:
        self.enabled = enabled
        self._most = most
        self._by_connection: weakref.WeakKeyDictionary[Any, dict[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        #: How many times the server had lost statements this process prepared.
        self.losses = 0

    def execute(
        self, txn: LoggingTransaction, purpose: str, sql: str, args: Sequence[Any] = ()
    ) -> None:
        """Run ``sql`` (``?`` placeholders, none in a literal) with ``args``
        on ``txn``, prepared once per connection on PostgreSQL under a name
        that starts ``nidstate_<purpose>_``."""
        if not self.enabled or not isinstance(txn.database_engine, PostgresEngine):
            txn.execute(sql, args)
            return
        connection = cast(Any, txn.txn).connection  # the driver's (psycopg2's) connection
        prepared = self._by_connection.setdefault(connection, {})
        name = prepared.get(sql)
        try:
            if name is None:
                if len(prepared) >= self._most:
                    txn.execute(sql, args)
                    return
                name = f"nidstate_{purpose}_{next(_NUMBERS)}"
                numbered = itertools.count(1)
                txn.execute(
                    f"PREPARE {name} AS "
                    + _PLACEHOLDER.sub(lambda _: f"${next(numbered)}", sql)
                )
                prepared[sql] = name
            txn.execute(
                f"EXECUTE {name}" + (f"({', '.join('?' * len(args))})" if args else ""),
                args,
            )
        except Exception as e:
            if getattr(e, "pgcode", None) in _LOST:
                self._lost(connection)
            raise

    def _lost(self, connection: Any) -> None:
        self._by_connection.pop(connection, None)
        self.losses += 1
        if self.losses >= MOST_LOSSES and self.enabled:
            self.enabled = False
            logger.warning(
                "synapse-nidstate: the database lost this process's prepared statements"
                " %d times (a connection pooler in transaction mode?); the module's reads"
                " now run unprepared. Set prepared_statements: false in the module's config"
                " to keep them so",
                self.losses,
            )
