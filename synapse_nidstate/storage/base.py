"""The base of the store: the database pool, the module's caches and how
a transaction's learnt values reach them.

Every ``*_txn`` function runs inside a transaction it is given (Synapse's own
persistence transaction for the mirror) and is idempotent, because Synapse's
``runInteraction`` retries a transaction function after a deadlock or a
serialization failure. In-process caches are filled only through
``txn.call_after``, so a NID from a rolled-back transaction is never cached.

The SQL is the same on SQLite and PostgreSQL (``?`` placeholders, ``ON
CONFLICT ... DO NOTHING``, Synapse's ``make_in_list_sql_clause``); the DDL,
which is not, lives in ``sql/<engine>/``.
"""

from array import array
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from synapse.storage.database import (
    DatabasePool,
    LoggingTransaction,
    make_in_list_sql_clause,
)
from synapse.storage.engines import PostgresEngine
from synapse.util.caches.lrucache import LruCache
from synapse.util.iterutils import batch_iter

from synapse_nidstate.algebra import Block
from synapse_nidstate.storage.common import (
    FIXED_NIDS,
    FIXED_STRINGS,
    ROOMS,
    STATE_KEYS,
    TYPES,
    StringTable,
    in_list_clause,
)
from synapse_nidstate.storage.prepared import PreparedStatements

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_nidstate.runtime.config import NidStateConfig

K = TypeVar("K")
V = TypeVar("V")

#: Key space of the per-room advisory locks (the other key is the room NID).
_ROOM_LOCK_CLASS = 0x6E6964  # "nid"

#: Bound on the number of values in one IN list of bound variables (SQLite's
#: variable limit); only binary values need it (they have no JSON form for
#: ``in_list_clause``): the content hashes ``_select_by_room_txn`` looks up.
_CHUNK = 500


class TxnLearnt:
    """Values learnt in one transaction attempt; published to the caches after commit."""

    def __init__(self) -> None:
        self.strings: dict[StringTable, dict[str, int]] = {
            ROOMS: {},
            TYPES: {},
            STATE_KEYS: {},
        }
        self.events: dict[str, int] = {}
        self.groups: dict[int, int] = {}
        self.snapshots: dict[int, tuple[int, ...]] = {}
        self.blocks: dict[int, Block] = {}
        #: blocks a narrow read took flat (three NIDs an entry), cached as they are
        self.flat_blocks: dict[int, array] = {}
        #: a big block's pieces a narrow read took (schema 8): the covers of
        #: them all, by block, and the entries of those it read, by (block, piece)
        self.piece_covers: dict[int, array] = {}
        self.pieces: dict[tuple[int, int], array] = {}
        self.event_snapshots: dict[str, int] = {}
        #: each snapshot's block list and its blocks' key ranges (two key
        #: numbers a block, in list order), once a narrow read knows them all
        self.snapshot_ranges: dict[int, tuple[Sequence[int], array]] = {}
        #: event NID -> ID, found beside the blocks by a narrow read
        #: (``storage/narrow_statement.py``): the read's strings, of which those
        #: its answer keeps are cached
        self.event_ids: dict[int, str] = {}


class WriteScope:
    """What a write transaction learnt, published only if its last attempt commits.

    Synapse retries a transaction function after a deadlock or serialization
    failure and runs *every* ``call_after`` callback of *every* attempt once an
    attempt commits. So the callback is registered once and publishes what the
    last attempt (the one that committed) learnt: a NID from a rolled-back
    attempt never reaches a cache. Create one scope per ``runInteraction``,
    outside the transaction function.

    ``publish=False``: nothing is published (the migration's writes: a
    history's blocks would push out of the caches what live reads use, and
    filling them took a sixth of a migration's time). The caches read
    through, so what they lack is read when asked for.
    """

    def __init__(self, publish: bool = True) -> None:
        self._txn: LoggingTransaction | None = None
        self._publish = publish
        self.learnt = TxnLearnt()

    def begin(self, txn: LoggingTransaction, store: "NidStoreBase") -> TxnLearnt:
        """Start (or continue, for the same attempt) writing in ``txn``."""
        if self._txn is None and self._publish:
            txn.call_after(lambda: store._publish(self.learnt))
        if txn is not self._txn:
            self._txn = txn
            self.learnt = TxnLearnt()
        return self.learnt

    def discard(self) -> None:
        """Forget what was learnt (the writes were rolled back to a savepoint)."""
        self.learnt = TxnLearnt()


class NidStoreBase:
    """The database pool, the string caches every part uses, and how the caches
    (declared by the parts that fill them) are named, filled after commit and
    emptied; the parts of the store build on it."""

    def __init__(self, hs: "HomeServer", config: "NidStateConfig") -> None:
        self.db_pool: DatabasePool = hs.get_datastores().main.db_pool
        self.engine = self.db_pool.engine
        clock = hs.get_clock()
        name = hs.hostname

        #: How many times a purge (or a caller) made the caches forget values:
        #: a read in flight meanwhile may have cached what was purged
        #: (:meth:`forget_if_invalidated_since`).
        self.invalidations = 0
        #: Every in-process cache of the module, by its metrics name.
        self.named_caches: dict[str, LruCache] = {}

        self._clock = clock
        self._server_name = name
        #: The read statements, prepared once per connection (PostgreSQL).
        self.prepared = PreparedStatements(config.prepared_statements)
        cache = self._cache

        strings = config.string_cache_size
        self._string_nids: dict[StringTable, LruCache[str, int]] = {
            table: cache(f"{table.table[9:]}_nids", strings)
            for table in (ROOMS, TYPES, STATE_KEYS)
        }
        self._nid_strings: dict[StringTable, LruCache[int, str]] = {
            table: cache(f"{table.table[9:]}_strings", strings)
            for table in (ROOMS, TYPES, STATE_KEYS)
        }
        self._event_nids: LruCache[str, int] = cache("event_nids", strings)
        self._event_ids: LruCache[int, str] = cache("event_ids", strings)
        # The other caches are declared by the part of the store that fills them.

    # ------------------------------------------------------------------ caches

    def _cache(self, cache_name: str, size: int, **kwargs: Any) -> LruCache:
        """A new cache of the module, named for Synapse's cache metrics."""
        full_name = f"nidstate_{cache_name}"
        self.named_caches[full_name] = LruCache(
            max_size=size,
            clock=self._clock,
            server_name=self._server_name,
            cache_name=full_name,
            **kwargs,
        )
        return self.named_caches[full_name]

    def caches(self) -> list[LruCache]:
        """Every in-process cache of the module (for metrics, benchmarks and tests)."""
        return list(self.named_caches.values())

    def clear_caches(self) -> None:
        self.invalidations += 1
        for cache in self.caches():
            cache.clear()

    def forget_if_invalidated_since(self, invalidations: int) -> None:
        """After a read that started when :attr:`invalidations` was
        ``invalidations``: if a purge forgot cached values meanwhile, what the
        read cached after that (read from a snapshot of the tables taken before
        the purge committed) may name purged rows, so everything goes, as
        Synapse's caches do with their sequence numbers. Purges are rare."""
        if self.invalidations != invalidations:
            self.clear_caches()

    def _publish(self, learnt: TxnLearnt) -> None:
        """Fill the shared caches with what a committed transaction learnt."""
        for table, values in learnt.strings.items():
            for string, nid in values.items():
                self._string_nids[table].set(string, nid)
                self._nid_strings[table].set(nid, string)
        for event_id, nid in learnt.events.items():
            self._event_nids.set(event_id, nid)
            self._event_ids.set(nid, event_id)

    @staticmethod
    def _split_cached(
        cache: LruCache[K, V], keys: Collection[K]
    ) -> tuple[dict[K, V], list[K]]:
        found: dict[K, V] = {}
        # A membership test on the cache's own dict first: LruCache.get does
        # more work even for a miss, and a cold read of a big room's state misses
        # on every one of its strings, so misses take one pass without it and
        # only the keys present go through it.
        present = cache.cache
        missing = [key for key in keys if key not in present]  # type: ignore[operator]
        if len(missing) < len(keys):
            missing = []
            for key in keys:
                value = cache.get(key) if key in present else None  # type: ignore[operator]
                if value is None:
                    missing.append(key)
                else:
                    found[key] = value
        return found, missing

    def _split_string_nids(
        self, table: StringTable, strings: Collection[str]
    ) -> tuple[dict[str, int], list[str]]:
        """The NIDs of ``strings`` known without a statement (the schema's
        fixed ones, :data:`FIXED_NIDS`, then the cache), and the rest."""
        return self._split_fixed(FIXED_NIDS.get(table), self._string_nids[table], strings)

    def _split_nid_strings(
        self, table: StringTable, nids: Collection[int]
    ) -> tuple[dict[int, str], list[int]]:
        """:meth:`_split_string_nids` the other way: strings by NID."""
        return self._split_fixed(FIXED_STRINGS.get(table), self._nid_strings[table], nids)

    @classmethod
    def _split_fixed(
        cls, fixed: Mapping[K, V] | None, cache: LruCache[K, V], keys: Collection[K]
    ) -> tuple[dict[K, V], list[K]]:
        """:meth:`_split_cached`, the values ``fixed`` holds taken from it."""
        if not fixed:
            return cls._split_cached(cache, keys)
        found, missing = cls._split_cached(cache, [k for k in keys if k not in fixed])
        found.update((k, fixed[k]) for k in keys if k in fixed)
        return found, missing

    def _select_in_txn(
        self,
        txn: LoggingTransaction,
        sql: str,
        column: str,
        values: Collection[Any],
        purpose: str | None = None,
    ) -> list[tuple]:
        """Run ``sql`` (which ends in ``WHERE``) for ``values`` (integers or
        strings), in one statement; binary values go per room through
        :meth:`_select_by_room_txn`. With ``purpose`` (a read), prepared
        (``storage/prepared.py``)."""
        if not values:
            return []
        clause, clause_args = in_list_clause(self.engine, column, values)
        if purpose is None:
            txn.execute(f"{sql} {clause}", clause_args)
        else:
            self.prepared.execute(txn, purpose, f"{sql} {clause}", clause_args)
        return txn.fetchall()

    @staticmethod
    def _fill(cache: LruCache[K, V], rows: Iterable[tuple[K, V]]) -> None:
        for key, value in rows:
            cache.set(key, value)

    def _lock_room_txn(self, txn: LoggingTransaction, room_nid: int) -> None:
        """Serialize, per room, writes that reuse blocks and snapshots with
        :meth:`delete_unused_txn`, which deletes unreferenced ones: a write must not
        dedupe onto a row a concurrent ``delete_unused_txn`` is deleting. (SQLite has one
        writer at a time anyway.)"""
        self._lock_rooms_txn(txn, [room_nid])

    def _lock_rooms_txn(self, txn: LoggingTransaction, room_nids: Collection[int]) -> None:
        """:meth:`_lock_room_txn` for several rooms in one statement, taken in
        ascending order (``unnest`` yields the sorted array in order), so two
        writers locking overlapping rooms cannot deadlock."""
        if not room_nids or not isinstance(self.engine, PostgresEngine):
            return
        txn.execute(
            "SELECT pg_advisory_xact_lock(?, r) FROM unnest(?::integer[]) AS r",
            (_ROOM_LOCK_CLASS, sorted({n % 2**31 for n in room_nids})),
        )
        txn.fetchall()

    def _select_by_room_txn(
        self,
        txn: LoggingTransaction,
        sql: str,
        column: str,
        values: Iterable[tuple[int, Any]],
    ) -> list[tuple]:
        """Run ``sql`` (which ends in ``WHERE``) for ``(room_nid, value)`` pairs:
        ``(room_nid = ? AND column IN ...) OR ...``, one statement per
        :data:`_CHUNK` pairs whatever the number of rooms. Binary values are
        given as ``bytes`` (hashable) and bound as ``bytearray`` (see ``common``)."""
        rows: list[tuple] = []
        for chunk in batch_iter(sorted(set(values)), _CHUNK):
            by_room: dict[int, list[Any]] = {}
            for room_nid, value in chunk:
                by_room.setdefault(room_nid, []).append(
                    bytearray(value) if isinstance(value, bytes) else value
                )
            clauses, args = [], []
            for room_nid, room_values in by_room.items():
                clause, clause_args = make_in_list_sql_clause(self.engine, column, room_values)
                clauses.append(f"(room_nid = ? AND {clause})")
                args += [room_nid, *clause_args]
            txn.execute(f"{sql} {' OR '.join(clauses)}", args)
            rows.extend(txn.fetchall())
        return rows

    def _room_nid_txn(self, txn: LoggingTransaction, room_id: str) -> int | None:
        txn.execute("SELECT room_nid FROM nidstate_rooms WHERE room_id = ?", (room_id,))
        row = txn.fetchone()
        return row[0] if row else None
