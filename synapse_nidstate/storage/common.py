"""What every part of the storage layer shares: the interned-string tables,
the values the write side is given, and one IN-list clause per engine."""

import inspect
import json
from array import array
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar

import attr
from synapse.storage.database import LoggingTransaction, make_in_list_sql_clause
from synapse.storage.engines import BaseDatabaseEngine, PostgresEngine
from synapse.types import StateMap

# Binary columns are passed as bytearray: Synapse's PostgreSQL engine refuses
# `bytes` parameters (matrix-org/synapse#6186).

def text_array_literal(values: Collection[str]) -> str:
    """PostgreSQL's input form of a ``text[]`` holding ``values``: each
    element double-quoted, its backslashes and double quotes escaped with a
    backslash, so that any string (commas, braces, ``NULL``, spaces) is read
    back as it is. PostgreSQL text holds no NUL character."""
    return "{" + ",".join(
        '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values
    ) + "}"


def in_list_clause(
    engine: BaseDatabaseEngine, column: str, values: Collection[Any]
) -> tuple[str, list[Any]]:
    """``column`` is one of ``values``, as one clause with one parameter.

    PostgreSQL: ``= ANY(?)`` with one array literal in text: integers (NIDs,
    state groups) as ``'{1,2,3}'::bigint[]``, strings as ``'{"a","b"}'::text[]``
    (:func:`text_array_literal`). Synapse's ``make_in_list_sql_clause`` passes
    a Python list, which psycopg2 turns into ``ARRAY['a','b']``: one
    expression per element for the client to adapt and the server to parse
    (for the strings of a full state at HQ scale, most of a cold read's time;
    docs/benchmarks.md, "Matrix HQ's scale, third run"). Anything else goes
    that way.
    SQLite: one JSON array read by ``json_each`` (as Synapse's profile store
    does), so a list of any length is one statement instead of one per 500
    variables. Only integers and strings: binary values have no JSON form.
    """
    if engine.supports_using_any_list:
        # One value as a scalar: a prepared statement's generic plan then
        # costs what a custom one does, so PostgreSQL keeps it instead of
        # planning each run (an array of unknown length is estimated at ten
        # rows). 0.15 ms a cold read's first statement at M.
        if values:
            try:
                # Checks every value is an int64 at C speed (strings raise).
                ints = array("q", values)
            except (TypeError, OverflowError):
                if all(isinstance(v, str) for v in values):
                    if len(values) == 1:
                        return f"{column} = ?", list(values)
                    return f"{column} = ANY(?::text[])", [text_array_literal(values)]
            else:
                if len(ints) == 1:
                    return f"{column} = ?", [ints[0]]
                return f"{column} = ANY(?::bigint[])", ["{" + ",".join(map(str, ints)) + "}"]
        return make_in_list_sql_clause(engine, column, values)
    return f"{column} IN (SELECT value FROM json_each(?))", [json.dumps(list(values))]


def insert_new_txn(
    txn: LoggingTransaction,
    table: str,
    columns: Sequence[str],
    conflict: str,
    rows: Sequence[tuple],
) -> None:
    """Insert ``rows``, leaving alone those whose ``conflict`` columns a row
    already holds (``ON CONFLICT (...) DO NOTHING``).

    PostgreSQL: one ``INSERT`` with a page of rows in its ``VALUES``
    (psycopg2's ``execute_values``, as Synapse's ``simple_upsert_many_txn``
    does), where ``execute_batch`` sends a statement per row for the server
    to parse: a quarter of a migration's time went there
    (``benchmarks.profile --migration``). SQLite: one prepared statement run
    per row."""
    names = ", ".join(columns)
    head = f"INSERT INTO {table} ({names}) VALUES"
    tail = f"ON CONFLICT ({conflict}) DO NOTHING"
    if isinstance(txn.database_engine, PostgresEngine):
        txn.execute_values(f"{head} ? {tail}", rows, fetch=False)
    else:
        txn.execute_batch(f"{head} ({', '.join('?' for _ in columns)}) {tail}", rows)


@attr.s(slots=True, frozen=True, auto_attribs=True)
class StringTable:
    """An interned-string table: ``table(nid_column, string_column UNIQUE)``."""

    table: str
    nid_column: str
    string_column: str


ROOMS = StringTable("nidstate_rooms", "room_nid", "room_id")
TYPES = StringTable("nidstate_event_types", "type_nid", "event_type")
STATE_KEYS = StringTable("nidstate_state_keys", "state_key_nid", "state_key")

#: The strings the schema writes with fixed NIDs (``sql/*/01_core.sql``): the
#: same in every database, so a read knows them without a cache or a
#: statement (a narrow read asks for a member's type, and a state key ""
#: names most non-member state). :func:`check_fixed_nids_txn` checks the rows
#: at start-up.
FIXED_NIDS: dict[StringTable, dict[str, int]] = {
    TYPES: {
        "m.room.create": 1,
        "m.room.power_levels": 2,
        "m.room.join_rules": 3,
        "m.room.third_party_invite": 4,
        "m.room.member": 5,
        "m.room.redaction": 6,
        "m.room.history_visibility": 7,
    },
    STATE_KEYS: {"": 1},
}
#: The same, string by NID.
FIXED_STRINGS: dict[StringTable, dict[int, str]] = {
    table: {nid: string for string, nid in nids.items()} for table, nids in FIXED_NIDS.items()
}


def check_fixed_nids_txn(txn: LoggingTransaction) -> None:
    """Refuse a database whose rows of :data:`FIXED_NIDS` differ from them
    (edited by hand): the reads would turn those NIDs into the wrong strings."""
    for table, nids in FIXED_NIDS.items():
        clause, args = in_list_clause(txn.database_engine, table.nid_column, list(nids.values()))
        txn.execute(
            f"SELECT {table.string_column}, {table.nid_column} FROM {table.table} WHERE {clause}",
            args,
        )
        found = dict(txn.fetchall())
        if found != nids:
            raise RuntimeError(
                f"synapse-nidstate: {table.table} does not hold the rows the schema"
                f" wrote ({nids}), but {found}; restore them, or drop the module's"
                " tables and migrate again"
            )


@attr.s(slots=True, frozen=True, auto_attribs=True)
class GroupStep:
    """How the mirror builds the snapshot of one Synapse state group.

    The state of ``group`` is the state of ``prev_group`` with ``delta``
    applied, or it is ``full_state``. A step with neither is a plan that still
    needs its full state read (see ``SnapshotPlanner.with_full_state``).

    ``base_group``, with a full state: a group whose snapshot is likely close
    to it (the migration's guess, from the event graph, for a group Synapse
    stored in full): the snapshot is that one's blocks plus the difference
    where it is small (``algebra.rebase``). Only a hint: the state written is
    ``full_state``, whatever the base holds.
    """

    group: int
    prev_group: int | None
    delta: StateMap[str] | None
    full_state: StateMap[str] | None
    base_group: int | None = None

    @property
    def needs_full_state(self) -> bool:
        return self.delta is None and self.full_state is None


@attr.s(slots=True, auto_attribs=True)
class EventRow:
    """What the mirror records for an event persisted with state."""

    event_id: str
    #: The group Synapse maps the event to (the state before it if rejected);
    #: None: no snapshot (partial state).
    state_group: int | None


class CacheMiss(Exception):
    """A cache-only read needed the database."""


class CorruptState(Exception):
    """The NID tables contradict themselves: a row one of them names is missing,
    or a stored value does not match its content hash. Never answered around:
    the caller falls back to Synapse's rows where they exist, or fails."""


T = TypeVar("T")


def arguments_by_name(function: Callable) -> Callable[[tuple, dict], dict[str, Any]]:
    """The arguments of a call of ``function``, by parameter name. The module's
    wrappers of Synapse's methods take whatever Synapse passes (``*args,
    **kwargs``), pass all of it through, and read only what they need, wherever
    the caller put it (``runtime.compat`` checks that those names exist)."""
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if not inspect.ismethod(function) and parameters and parameters[0].name == "self":
        # A ``@cached`` method, bound: its wrapper names the unbound function
        # (``__wrapped__``) and supplies ``self`` itself.
        signature = signature.replace(parameters=parameters[1:])

    var_keyword = next(
        (p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None
    )

    def named(args: tuple, kwargs: dict) -> dict[str, Any]:
        arguments = signature.bind(*args, **kwargs).arguments
        if var_keyword in arguments:  # ``**kwargs``: its names, each on its own
            arguments.update(arguments.pop(var_keyword))
        return arguments

    return named

class WriteCounters(Protocol):
    """What the write side counts (the runtime's ``MirrorStats`` is one)."""

    #: events recorded with a snapshot
    events_mirrored: int
    #: snapshots written for new state groups
    snapshots_built: int
    #: of those, the ones that hit the 64-block limit and were compacted
    compactions: int
    #: of those, the ones whose last blocks were merged with their change at
    #: the 64-block limit (``algebra.merge_point``) instead
    tail_merges: int
    #: full states stored as a small difference on a similar snapshot
    full_states_rebased: int
    #: events whose state group had neither a snapshot nor a plan
    unprepared: int
