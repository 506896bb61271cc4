"""The NID tables: interning strings, writing and reading blocks and snapshots.

Every ``*_txn`` function runs inside a transaction it is given (Synapse's own
persistence transaction for the mirror) and is idempotent, because Synapse's
``runInteraction`` retries a transaction function after a deadlock or a
serialization failure. In-process caches are filled only through
``txn.call_after``, so a NID from a rolled-back transaction is never cached.

The SQL is the same on SQLite and PostgreSQL (``?`` placeholders, ``ON
CONFLICT ... DO NOTHING``, Synapse's ``make_in_list_sql_clause``); the DDL,
which is not, lives in ``sql/<engine>/``.
"""

import functools
import json
import logging
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import attr
from synapse.storage.database import (
    DatabasePool,
    LoggingTransaction,
    make_in_list_sql_clause,
)
from synapse.storage.databases.state.store import StateGroupDataStore
from synapse.storage.engines import BaseDatabaseEngine, PostgresEngine
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter
from synapse.util.caches.dictionary_cache import DictionaryCache
from synapse.util.caches.lrucache import LruCache
from synapse.util.iterutils import batch_iter

from synapse_nidstate import algebra
from synapse_nidstate.algebra import Block, NidStateMap
from synapse_nidstate.metrics import MirrorStats

if TYPE_CHECKING:
    from synapse.server import HomeServer

    from synapse_nidstate.config import NidStateConfig

logger = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

# Binary columns are passed as bytearray: Synapse's PostgreSQL engine refuses
# `bytes` parameters (matrix-org/synapse#6186).

#: Key space of the per-room advisory locks (the other key is the room NID).
_ROOM_LOCK_CLASS = 0x6E6964  # "nid"

#: Bound on the number of values in one IN list of bound variables (SQLite's
#: variable limit); only binary values on SQLite need it, see in_list_clause.
_CHUNK = 500


def in_list_clause(
    engine: BaseDatabaseEngine, column: str, values: Collection[Any]
) -> tuple[str, list[Any]]:
    """``column`` is one of ``values``, as one clause with one parameter.

    PostgreSQL: Synapse's ``make_in_list_sql_clause`` (``= ANY(?)``). SQLite:
    one JSON array read by ``json_each`` (as Synapse's profile store does), so
    a list of any length is one statement instead of one per 500 variables.
    Only integers and strings: binary values have no JSON form.
    """
    if engine.supports_using_any_list:
        return make_in_list_sql_clause(engine, column, values)
    return f"{column} IN (SELECT value FROM json_each(?))", [json.dumps(list(values))]


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _StringTable:
    """An interned-string table: ``table(nid_column, string_column UNIQUE)``."""

    table: str
    nid_column: str
    string_column: str


ROOMS = _StringTable("nidstate_rooms", "room_nid", "room_id")
TYPES = _StringTable("nidstate_event_types", "type_nid", "event_type")
STATE_KEYS = _StringTable("nidstate_state_keys", "state_key_nid", "state_key")


@attr.s(slots=True, frozen=True, auto_attribs=True)
class GroupStep:
    """How the mirror builds the snapshot of one Synapse state group.

    The state of ``group`` is the state of ``prev_group`` with ``delta``
    applied, or it is ``full_state``. A step with neither is a plan that still
    needs its full state read (see ``SnapshotPlanner.with_full_state``).
    """

    group: int
    prev_group: int | None
    delta: StateMap[str] | None
    full_state: StateMap[str] | None

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


class ResolvedState:
    """A snapshot's whole state as strings, indexed by type for filtering.

    Immutable once built (callers get copies), so it can be cached for good.
    """

    __slots__ = ("full", "by_type")

    def __init__(self, full: dict[tuple[str, str], str]) -> None:
        self.full = full
        self.by_type: dict[str, dict[tuple[str, str], str]] = {}
        for key, event_id in full.items():
            self.by_type.setdefault(key[0], {})[key] = event_id

    def __len__(self) -> int:
        return len(self.full)

    def filter(self, state_filter: StateFilter) -> MutableStateMap[str]:
        """``state_filter.filter_state(self.full)``, touching only the types it names."""
        if state_filter.is_full():
            return dict(self.full)
        out: MutableStateMap[str] = {}
        for event_type, state_keys in state_filter.types.items():
            of_type = self.by_type.get(event_type)
            if not of_type:
                continue
            if state_keys is None:
                out.update(of_type)
            else:
                for state_key in state_keys:
                    event_id = of_type.get((event_type, state_key))
                    if event_id is not None:
                        out[(event_type, state_key)] = event_id
        if state_filter.include_others:
            for event_type, of_type in self.by_type.items():
                if event_type not in state_filter.types:
                    out.update(of_type)
        return out


class CacheMiss(Exception):
    """A cache-only read needed the database."""


class _TxnCaches:
    """Values learnt in one transaction attempt; published to the caches after commit."""

    def __init__(self) -> None:
        self.strings: dict[_StringTable, dict[str, int]] = {
            ROOMS: {},
            TYPES: {},
            STATE_KEYS: {},
        }
        self.events: dict[str, int] = {}
        self.groups: dict[int, int] = {}
        self.snapshots: dict[int, tuple[int, ...]] = {}
        self.blocks: dict[int, Block] = {}
        self.event_snapshots: dict[str, int] = {}


class WriteScope:
    """What a write transaction learnt, published only if its last attempt commits.

    Synapse retries a transaction function after a deadlock or serialization
    failure and runs *every* ``call_after`` callback of *every* attempt once an
    attempt commits. So the callback is registered once and publishes what the
    last attempt (the one that committed) learnt: a NID from a rolled-back
    attempt never reaches a cache. Create one scope per ``runInteraction``,
    outside the transaction function.
    """

    def __init__(self) -> None:
        self._txn: LoggingTransaction | None = None
        self.learnt = _TxnCaches()

    def begin(self, txn: LoggingTransaction, store: "NidStore") -> _TxnCaches:
        """Start (or continue, for the same attempt) writing in ``txn``."""
        if self._txn is None:
            txn.call_after(lambda: store._publish(self.learnt))
        if txn is not self._txn:
            self._txn = txn
            self.learnt = _TxnCaches()
        return self.learnt

    def discard(self) -> None:
        """Forget what was learnt (the writes were rolled back to a savepoint)."""
        self.learnt = _TxnCaches()


@attr.s(slots=True, frozen=True, auto_attribs=True)
class _DictionaryCaches:
    """The two attributes Synapse's ``StateGroupDataStore._insert_into_cache``
    fills, here the module's per-snapshot caches."""

    _state_group_members_cache: DictionaryCache
    _state_group_cache: DictionaryCache


def _state_from_cache(
    cache: DictionaryCache, snapshot_nid: int, state_filter: StateFilter
) -> tuple[MutableStateMap[str], bool]:
    """Synapse's ``_get_state_for_group_using_cache`` (it uses nothing of its store)."""
    return StateGroupDataStore._get_state_for_group_using_cache(
        None,  # type: ignore[arg-type]
        cache,
        snapshot_nid,
        state_filter,
    )


@attr.s(slots=True, auto_attribs=True)
class _FilterNids:
    """The NIDs of a filter's types and state keys: cached ones, and those to read."""

    type_nids: dict[str, int]
    types_missing: list[str]
    key_nids: dict[str, int]
    keys_missing: list[str]

    @classmethod
    def of(cls, store: "NidStore", state_filter: StateFilter) -> "_FilterNids":
        types = state_filter.types
        keys = {k for ks in types.values() if ks for k in ks}
        type_nids, types_missing = store._split_cached(store._string_nids[TYPES], types)
        key_nids, keys_missing = store._split_cached(store._string_nids[STATE_KEYS], keys)
        return cls(type_nids, types_missing, key_nids, keys_missing)

    def learnt(
        self,
        txn: LoggingTransaction,
        store: "NidStore",
        type_rows: list[tuple[str, int]],
        key_rows: list[tuple[str, int]],
    ) -> None:
        """Rows read for the missing strings; a string without a row has no NID."""
        self.type_nids.update(type_rows)
        self.key_nids.update(key_rows)
        self.types_missing, self.keys_missing = [], []
        txn.call_after(store._fill, store._string_nids[TYPES], type_rows)
        txn.call_after(store._fill, store._string_nids[STATE_KEYS], key_rows)


class NidStore:
    """Reads and writes the module's tables in Synapse's main database."""

    def __init__(self, hs: "HomeServer", config: "NidStateConfig") -> None:
        self.db_pool: DatabasePool = hs.get_datastores().main.db_pool
        self.engine = self.db_pool.engine
        clock = hs.get_clock()
        name = hs.hostname

        #: Every in-process cache of the module, by its metrics name.
        self.named_caches: dict[str, LruCache] = {}

        def cache(cache_name: str, size: int, **kwargs: Any) -> LruCache:
            full_name = f"nidstate_{cache_name}"
            self.named_caches[full_name] = LruCache(
                max_size=size,
                clock=clock,
                server_name=name,
                cache_name=full_name,
                **kwargs,
            )
            return self.named_caches[full_name]

        strings = config.string_cache_size
        self._string_nids: dict[_StringTable, LruCache[str, int]] = {
            table: cache(f"{table.table[9:]}_nids", strings)
            for table in (ROOMS, TYPES, STATE_KEYS)
        }
        self._nid_strings: dict[_StringTable, LruCache[int, str]] = {
            table: cache(f"{table.table[9:]}_strings", strings)
            for table in (ROOMS, TYPES, STATE_KEYS)
        }
        self._event_nids: LruCache[str, int] = cache("event_nids", strings)
        self._event_ids: LruCache[int, str] = cache("event_ids", strings)
        self._group_snapshots: LruCache[int, int] = cache(
            "group_snapshots", config.snapshot_cache_size
        )
        self._event_snapshots: LruCache[str, int] = cache(
            "event_snapshots", config.snapshot_cache_size
        )
        self._snapshot_blocks: LruCache[int, tuple[int, ...]] = cache(
            "snapshot_blocks", config.snapshot_cache_size
        )
        self._blocks: LruCache[int, Block] = cache("blocks", config.block_cache_size)
        # snapshot -> parts of its state as strings, as Synapse caches a state
        # group's: members, and everything else (sized in state entries).
        self._members: DictionaryCache[int, tuple[str, str], str] = DictionaryCache(
            name="nidstate_snapshot_members",
            clock=clock,
            server_name=name,
            max_entries=config.resolved_state_cache_size,
        )
        self._non_members: DictionaryCache[int, tuple[str, str], str] = DictionaryCache(
            name="nidstate_snapshot_non_members",
            clock=clock,
            server_name=name,
            max_entries=config.resolved_state_cache_size,
        )
        self.named_caches["nidstate_snapshot_members"] = self._members.cache
        self.named_caches["nidstate_snapshot_non_members"] = self._non_members.cache
        # snapshot -> its whole state as strings (immutable), sized in entries.
        self._resolved: LruCache[int, ResolvedState] = cache(
            "resolved_state", config.resolved_state_cache_size, size_callback=len
        )

    # ------------------------------------------------------------------ caches

    def caches(self) -> list[LruCache]:
        """Every in-process cache of the module (for metrics, benchmarks and tests)."""
        return list(self.named_caches.values())

    def clear_caches(self) -> None:
        for cache in self.caches():
            cache.clear()

    def _publish(self, learnt: _TxnCaches) -> None:
        """Fill the shared caches with what a committed transaction learnt."""
        for table, values in learnt.strings.items():
            for string, nid in values.items():
                self._string_nids[table].set(string, nid)
                self._nid_strings[table].set(nid, string)
        for event_id, nid in learnt.events.items():
            self._event_nids.set(event_id, nid)
            self._event_ids.set(nid, event_id)
        for group, snapshot_nid in learnt.groups.items():
            self._group_snapshots.set(group, snapshot_nid)
        for snapshot_nid, block_nids in learnt.snapshots.items():
            self._snapshot_blocks.set(snapshot_nid, block_nids)
        for block_nid, block in learnt.blocks.items():
            self._blocks.set(block_nid, block)
        for event_id, snapshot_nid in learnt.event_snapshots.items():
            self._event_snapshots.set(event_id, snapshot_nid)

    @staticmethod
    def _split_cached(
        cache: LruCache[K, V], keys: Iterable[K]
    ) -> tuple[dict[K, V], list[K]]:
        found: dict[K, V] = {}
        missing: list[K] = []
        # A membership test on the cache's own dict first: LruCache.get costs
        # about a microsecond even for a miss, and a cold read misses thousands.
        present = cache.cache
        for key in keys:
            value = cache.get(key) if key in present else None  # type: ignore[operator]
            if value is None:
                missing.append(key)
            else:
                found[key] = value
        return found, missing

    def _select_in_txn(
        self,
        txn: LoggingTransaction,
        sql: str,
        column: str,
        values: Collection[Any],
        args: tuple = (),
    ) -> list[tuple]:
        """Run ``sql`` (which ends in ``WHERE ... AND``-ready text) for ``values``:
        one statement, or chunks of bound variables for binary values on SQLite."""
        if values and not isinstance(next(iter(values)), (bytes, bytearray)):
            clause, clause_args = in_list_clause(self.engine, column, values)
            txn.execute(f"{sql} {clause}", (*args, *clause_args))
            return txn.fetchall()
        rows: list[tuple] = []
        for chunk in batch_iter(values, _CHUNK):
            clause, clause_args = make_in_list_sql_clause(self.engine, column, chunk)
            txn.execute(f"{sql} {clause}", (*args, *clause_args))
            rows.extend(txn.fetchall())
        return rows

    # -------------------------------------------------------------- interning

    def _intern_strings_txn(
        self,
        txn: LoggingTransaction,
        learnt: _TxnCaches,
        table: _StringTable,
        strings: Iterable[str],
    ) -> dict[str, int]:
        """Return the NID of each string, creating the missing ones.

        Safe under concurrent writers: a row another writer inserts first wins
        (``ON CONFLICT DO NOTHING``) and is read back.
        """
        known, missing = self._split_cached(self._string_nids[table], set(strings))
        for string in list(missing):
            if string in learnt.strings[table]:
                known[string] = learnt.strings[table][string]
                missing.remove(string)
        if not missing:
            return known
        select = f"SELECT {table.string_column}, {table.nid_column} FROM {table.table} WHERE"
        found = dict(self._select_in_txn(txn, select, table.string_column, missing))
        # Sorted: concurrent writers take the unique-index locks in one order.
        absent = sorted(s for s in missing if s not in found)
        if absent:
            txn.execute_batch(
                f"INSERT INTO {table.table} ({table.string_column}) VALUES (?)"
                f" ON CONFLICT ({table.string_column}) DO NOTHING",
                [(s,) for s in absent],
            )
            found.update(self._select_in_txn(txn, select, table.string_column, absent))
        learnt.strings[table].update(found)
        known.update(found)
        return known

    def _intern_events_txn(
        self,
        txn: LoggingTransaction,
        learnt: _TxnCaches,
        room_nid: int,
        events: Collection[str],
    ) -> dict[str, int]:
        """Return the NID of each event ID (interned in ``room_nid`` if new).

        A new row has no snapshot; :meth:`_set_event_state_txn` adds it for
        events persisted with state.
        """
        known, missing = self._split_cached(self._event_nids, events)
        missing = [e for e in missing if e not in learnt.events]
        known.update((e, learnt.events[e]) for e in events if e in learnt.events)
        if not missing:
            return known
        select = "SELECT event_id, event_nid FROM nidstate_events WHERE"
        found = dict(self._select_in_txn(txn, select, "event_id", missing))
        absent = sorted(e for e in missing if e not in found)
        if absent:
            txn.execute_batch(
                "INSERT INTO nidstate_events (event_id, room_nid)"
                " VALUES (?, ?) ON CONFLICT (event_id) DO NOTHING",
                [(e, room_nid) for e in absent],
            )
            found.update(self._select_in_txn(txn, select, "event_id", absent))
        learnt.events.update(found)
        known.update(found)
        return known

    def _intern_state_map_txn(
        self,
        txn: LoggingTransaction,
        learnt: _TxnCaches,
        room_nid: int,
        state_maps: Iterable[StateMap[str]],
    ) -> Callable[[StateMap[str]], NidStateMap]:
        """Intern every string of ``state_maps``; return a converter to NID maps."""
        state_maps = list(state_maps)
        types = {t for m in state_maps for t, _ in m}
        keys = {s for m in state_maps for _, s in m}
        type_nids = self._intern_strings_txn(txn, learnt, TYPES, types)
        key_nids = self._intern_strings_txn(txn, learnt, STATE_KEYS, keys)
        events = {e for m in state_maps for e in m.values()}
        event_nids = self._intern_events_txn(txn, learnt, room_nid, events)

        def convert(state: StateMap[str]) -> NidStateMap:
            return {
                (type_nids[t], key_nids[s]): event_nids[e] for (t, s), e in state.items()
            }

        return convert

    # ------------------------------------------------------------ the mirror

    def known_groups_txn(
        self,
        txn: LoggingTransaction,
        groups: Collection[int],
        learnt: _TxnCaches | None = None,
    ) -> dict[int, int]:
        """State group -> snapshot NID, for the groups the mirror has.

        In a write transaction pass its ``learnt``: rows it wrote itself must
        not be cached before it commits.
        """
        found, missing = self._split_cached(self._group_snapshots, groups)
        if learnt is not None:
            found.update((g, learnt.groups[g]) for g in missing if g in learnt.groups)
            missing = [g for g in missing if g not in learnt.groups]
        if missing:
            rows = self._select_in_txn(
                txn,
                "SELECT state_group, snapshot_nid FROM nidstate_state_groups WHERE",
                "state_group",
                missing,
            )
            found.update(rows)
            if learnt is None:
                txn.call_after(self._fill, self._group_snapshots, rows)
            else:
                learnt.groups.update(rows)
        return found

    async def known_groups(self, groups: Collection[int]) -> dict[int, int]:
        found, missing = self._split_cached(self._group_snapshots, groups)
        if not missing:
            return found
        found.update(
            await self.db_pool.runInteraction(
                "nidstate_known_groups", self.known_groups_txn, missing
            )
        )
        return found

    @staticmethod
    def _fill(cache: LruCache[K, V], rows: Iterable[tuple[K, V]]) -> None:
        for key, value in rows:
            cache.set(key, value)

    def _blocks_txn(
        self, txn: LoggingTransaction | None, learnt: _TxnCaches, block_nids: Collection[int]
    ) -> dict[int, Block]:
        found, missing = self._split_cached(self._blocks, block_nids)
        missing = [b for b in missing if b not in learnt.blocks]
        found.update((b, learnt.blocks[b]) for b in block_nids if b in learnt.blocks)
        if missing:
            if txn is None:
                raise CacheMiss()
            rows = self._select_in_txn(
                txn, "SELECT block_nid, entries FROM nidstate_blocks WHERE", "block_nid", missing
            )
            loaded = {nid: algebra.unpack_block(entries) for nid, entries in rows}
            if len(loaded) != len(missing):
                raise RuntimeError(f"state blocks missing: {set(missing) - set(loaded)}")
            learnt.blocks.update(loaded)
            found.update(loaded)
        return found

    def _snapshots_txn(
        self,
        txn: LoggingTransaction | None,
        learnt: _TxnCaches,
        snapshot_nids: Collection[int],
    ) -> dict[int, tuple[int, ...]]:
        found, missing = self._split_cached(self._snapshot_blocks, snapshot_nids)
        missing = [s for s in missing if s not in learnt.snapshots]
        found.update(
            (s, learnt.snapshots[s]) for s in snapshot_nids if s in learnt.snapshots
        )
        if missing:
            if txn is None:
                raise CacheMiss()
            rows = self._select_in_txn(
                txn,
                "SELECT snapshot_nid, block_nids FROM nidstate_snapshots WHERE",
                "snapshot_nid",
                missing,
            )
            loaded = {nid: algebra.unpack_nids(blocks) for nid, blocks in rows}
            if len(loaded) != len(missing):
                raise RuntimeError(f"snapshots missing: {set(missing) - set(loaded)}")
            learnt.snapshots.update(loaded)
            found.update(loaded)
        return found

    def _store_blocks_txn(
        self,
        txn: LoggingTransaction,
        learnt: _TxnCaches,
        room_nid: int,
        blocks: Collection[Block],
    ) -> list[int]:
        """Insert-or-select blocks by content; returns their NIDs in order."""
        nids = self._insert_or_select_txn(
            txn,
            "nidstate_blocks",
            "block_nid",
            ("entry_count", "entries"),
            room_nid,
            [algebra.block_hash(b) for b in blocks],
            [(len(b), bytearray(algebra.pack_block(b))) for b in blocks],
        )
        learnt.blocks.update(zip(nids, blocks))
        return nids

    def _store_snapshots_txn(
        self,
        txn: LoggingTransaction,
        learnt: _TxnCaches,
        room_nid: int,
        block_lists: list[tuple[int, ...]],
    ) -> list[int]:
        """Insert-or-select snapshots by their ordered block lists; their NIDs in order."""
        for block_nids in block_lists:
            if len(block_nids) > algebra.MAX_BLOCKS:
                raise algebra.AlgebraError(f"snapshot of {len(block_nids)} blocks")
        nids = self._insert_or_select_txn(
            txn,
            "nidstate_snapshots",
            "snapshot_nid",
            ("block_nids",),
            room_nid,
            [algebra.snapshot_hash(b) for b in block_lists],
            [(bytearray(algebra.pack_nids(b)),) for b in block_lists],
        )
        learnt.snapshots.update(zip(nids, block_lists))
        return nids

    def _insert_or_select_txn(
        self,
        txn: LoggingTransaction,
        table: str,
        nid_column: str,
        columns: tuple[str, ...],
        room_nid: int,
        digests: list[bytes],
        values: list[tuple],
    ) -> list[int]:
        """Rows deduplicated per room by content hash: insert those not there
        (in a fixed order, so concurrent writers lock alike), then read every
        one's NID; returns them in the order of ``digests``."""
        placeholders = ", ".join("?" for _ in range(2 + len(columns)))
        txn.execute_batch(
            f"INSERT INTO {table} (room_nid, content_hash, {', '.join(columns)})"
            f" VALUES ({placeholders}) ON CONFLICT (room_nid, content_hash) DO NOTHING",
            sorted((room_nid, bytearray(d), *v) for d, v in zip(digests, values)),
        )
        rows = self._select_in_txn(
            txn,
            f"SELECT content_hash, {nid_column} FROM {table} WHERE room_nid = ? AND",
            "content_hash",
            [bytearray(d) for d in set(digests)],
            (room_nid,),
        )
        by_digest = {bytes(d): nid for d, nid in rows}
        return [by_digest[d] for d in digests]

    def _build_groups_txn(
        self,
        txn: LoggingTransaction,
        learnt: _TxnCaches,
        room_nid: int,
        steps: list[GroupStep],
        stats: MirrorStats,
    ) -> None:
        """Give each step's state group a snapshot (parents before children)."""
        if not steps:
            return
        known = self.known_groups_txn(
            txn,
            {s.group for s in steps} | {s.prev_group for s in steps if s.prev_group},
            learnt,
        )
        todo = [s for s in steps if s.group not in known]
        if any(s.needs_full_state for s in todo):
            raise ValueError("a step still needs its full state read")
        convert = self._intern_state_map_txn(
            txn,
            learnt,
            room_nid,
            [s.delta if s.delta is not None else s.full_state for s in todo],  # type: ignore[misc]
        )
        # Plan every snapshot first, in Python: blocks new in this batch get a
        # temporary (negative) NID, so that a child step can extend a parent
        # planned just before it. Then three statements write them all: the
        # blocks, the snapshots, the groups' mapping (not three per group).
        new_blocks: dict[bytes, Block] = {}  # content hash -> block
        temporary: dict[bytes, int] = {}  # content hash -> temporary NID
        block_of_temporary: dict[int, Block] = {}
        lists: dict[int, tuple[int, ...]] = {}  # group -> block list (temporary NIDs too)

        def block_nid(block: Block) -> int:
            digest = algebra.block_hash(block)
            if digest not in temporary:
                temporary[digest] = -(len(temporary) + 1)
                new_blocks[digest] = block
                block_of_temporary[temporary[digest]] = block
            return temporary[digest]

        def load(nids: Sequence[int]) -> dict[int, Block]:
            loaded = self._blocks_txn(txn, learnt, [n for n in nids if n > 0])
            loaded.update((n, block_of_temporary[n]) for n in nids if n < 0)
            return loaded

        for step in todo:
            if step.full_state is not None:
                plan = algebra.full(convert(step.full_state))
            else:
                assert step.prev_group is not None and step.delta is not None
                parent_blocks = lists.get(step.prev_group)
                if parent_blocks is None:
                    parent = known[step.prev_group]
                    parent_blocks = self._snapshots_txn(txn, learnt, [parent])[parent]

                def parent_state(blocks: tuple[int, ...] = parent_blocks) -> NidStateMap:
                    loaded = load(blocks)
                    return algebra.resolve(loaded[b] for b in blocks)

                change = algebra.make_block(
                    (t, s, e) for (t, s), e in convert(step.delta).items()
                )
                plan = algebra.extend(parent_blocks, change, parent_state)
            if plan.compacted and step.full_state is None:
                stats.compactions += 1  # a delta on a parent at the 64-block limit
            lists[step.group] = tuple(plan.base) + tuple(block_nid(b) for b in plan.blocks)

        real: dict[int, int] = {}
        if new_blocks:
            nids = self._store_blocks_txn(txn, learnt, room_nid, list(new_blocks.values()))
            real = {temporary[digest]: nid for digest, nid in zip(new_blocks, nids)}
        groups = list(lists)
        snapshot_nids = self._store_snapshots_txn(
            txn, learnt, room_nid, [tuple(real.get(n, n) for n in lists[g]) for g in groups]
        )
        txn.execute_batch(
            "INSERT INTO nidstate_state_groups (state_group, snapshot_nid) VALUES (?, ?)"
            " ON CONFLICT (state_group) DO NOTHING",
            list(zip(groups, snapshot_nids)),
        )
        for group, snapshot_nid in zip(groups, snapshot_nids):
            known[group] = snapshot_nid
            learnt.groups[group] = snapshot_nid
        stats.snapshots_built += len(groups)

    def mirror_events_txn(
        self,
        txn: LoggingTransaction,
        scope: WriteScope,
        room_id: str,
        rows: list[EventRow],
        steps: list[GroupStep],
        stats: MirrorStats,
        keep_existing: bool = False,
    ) -> None:
        """Record ``rows`` and the snapshots of their state groups, in ``txn``.

        An event whose state group the mirror has no snapshot for (and no step
        to build one) is recorded without a snapshot; lookups for it fall back
        to Synapse. With ``keep_existing`` (the migration, beside the live
        mirror) an event that already has a snapshot keeps it.
        """
        learnt = scope.begin(txn, self)
        (room_nid,) = self._intern_strings_txn(txn, learnt, ROOMS, [room_id]).values()
        if steps:
            self._lock_room_txn(txn, room_nid)
        self._build_groups_txn(txn, learnt, room_nid, steps, stats)
        groups = self.known_groups_txn(
            txn, {r.state_group for r in rows if r.state_group is not None}, learnt
        )
        values = []
        for row in rows:
            snapshot_nid = groups.get(row.state_group) if row.state_group else None
            if row.state_group is not None and snapshot_nid is None:
                stats.unprepared += 1
            values.append((row.event_id, room_nid, snapshot_nid))
            if snapshot_nid is not None:
                stats.events_mirrored += 1
                if not keep_existing:
                    # A new event is looked up soon after (visibility, sync).
                    learnt.event_snapshots[row.event_id] = snapshot_nid
        # One write per event: an insert, or an update of a row interned
        # earlier (a state event named by its own snapshot) and only when it
        # changes, as PostgreSQL writes a new row version for every update.
        if keep_existing:
            changes = "nidstate_events.snapshot_nid IS NULL"
        elif isinstance(self.engine, PostgresEngine):
            changes = "nidstate_events.snapshot_nid IS DISTINCT FROM EXCLUDED.snapshot_nid"
        else:
            changes = "nidstate_events.snapshot_nid IS NOT excluded.snapshot_nid"
        txn.execute_batch(
            "INSERT INTO nidstate_events (event_id, room_nid, snapshot_nid) VALUES (?, ?, ?)"
            " ON CONFLICT (event_id) DO UPDATE SET snapshot_nid = EXCLUDED.snapshot_nid"
            f" WHERE {changes}",
            sorted(values),
        )

    # ---------------------------------------------------------------- purges

    def _lock_room_txn(self, txn: LoggingTransaction, room_nid: int) -> None:
        """Serialize, per room, writes that reuse blocks and snapshots with
        :meth:`reclaim_txn`, which deletes unreferenced ones: a write must not
        dedupe onto a row a concurrent reclaim is deleting. (SQLite has one
        writer at a time anyway.)"""
        if isinstance(self.engine, PostgresEngine):
            txn.execute(
                "SELECT pg_advisory_xact_lock(?, ?)", (_ROOM_LOCK_CLASS, room_nid % 2**31)
            )

    def reclaim_txn(self, txn: LoggingTransaction, room_id: str) -> tuple[int, int]:
        """Delete the room's snapshots no event or state group uses any more,
        then its blocks no snapshot lists; returns how many of each.

        Runs once Synapse has deleted unreferenced state groups: until then
        every snapshot is still a group's. Memory: the room's referenced block NIDs.
        """
        room_nid = self._room_nid_txn(txn, room_id)
        if room_nid is None:
            return 0, 0
        self._lock_room_txn(txn, room_nid)
        txn.execute(
            "SELECT snapshot_nid FROM nidstate_snapshots WHERE room_nid = ?"
            " AND snapshot_nid NOT IN"
            "  (SELECT snapshot_nid FROM nidstate_events"
            "   WHERE room_nid = ? AND snapshot_nid IS NOT NULL)"
            " AND snapshot_nid NOT IN (SELECT snapshot_nid FROM nidstate_state_groups)",
            (room_nid, room_nid),
        )
        snapshots = [row[0] for row in txn.fetchall()]
        if snapshots:
            clause, args = in_list_clause(self.engine, "snapshot_nid", snapshots)
            txn.execute(f"DELETE FROM nidstate_snapshots WHERE {clause}", args)
        referenced: set[int] = set()
        txn.execute("SELECT block_nids FROM nidstate_snapshots WHERE room_nid = ?", (room_nid,))
        for (block_nids,) in txn:
            referenced.update(algebra.unpack_nids(block_nids))
        txn.execute("SELECT block_nid FROM nidstate_blocks WHERE room_nid = ?", (room_nid,))
        blocks = [row[0] for row in txn.fetchall() if row[0] not in referenced]
        if blocks:
            clause, args = in_list_clause(self.engine, "block_nid", blocks)
            txn.execute(f"DELETE FROM nidstate_blocks WHERE {clause}", args)
        txn.call_after(self._forget_snapshots_and_blocks, snapshots, blocks)
        return len(snapshots), len(blocks)

    def _forget_snapshots_and_blocks(self, snapshots: list[int], blocks: list[int]) -> None:
        for snapshot_nid in snapshots:
            self._snapshot_blocks.invalidate(snapshot_nid)
            self._resolved.invalidate(snapshot_nid)
        for block_nid in blocks:
            self._blocks.invalidate(block_nid)

    def _room_nid_txn(self, txn: LoggingTransaction, room_id: str) -> int | None:
        txn.execute("SELECT room_nid FROM nidstate_rooms WHERE room_id = ?", (room_id,))
        row = txn.fetchone()
        return row[0] if row else None

    def forget_unmapped_events_txn(self, txn: LoggingTransaction, room_id: str) -> int:
        """After Synapse purged history: no snapshot for what it no longer maps.

        Synapse deletes the ``event_to_state_groups`` rows of every purged event
        (deleted ones, and state events it keeps as outliers); the mirror then
        must not answer for them either. Their rows stay (without a snapshot):
        blocks of the events that remain may still name them. Idempotent.

        The event -> snapshot cache is emptied by Synapse's own invalidation of
        the room's event caches, which the purge streams to every process
        (see ``hooks.install_purges``).
        """
        room_nid = self._room_nid_txn(txn, room_id)
        if room_nid is None:
            return 0
        txn.execute(
            "UPDATE nidstate_events SET snapshot_nid = NULL"
            " WHERE room_nid = ? AND snapshot_nid IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM event_to_state_groups AS esg"
            "  WHERE esg.event_id = nidstate_events.event_id)",
            (room_nid,),
        )
        return txn.rowcount

    def forget_event_snapshots(self) -> None:
        """Empty the event -> snapshot cache (a purge somewhere in the deployment)."""
        self._event_snapshots.clear()

    def purge_room_txn(self, txn: LoggingTransaction, room_id: str) -> None:
        """Delete every row of a room Synapse purges (idempotent: it runs twice)."""
        room_nid = self._room_nid_txn(txn, room_id)
        if room_nid is None:
            return
        txn.execute(
            "DELETE FROM nidstate_state_groups WHERE snapshot_nid IN"
            " (SELECT snapshot_nid FROM nidstate_snapshots WHERE room_nid = ?)",
            (room_nid,),
        )
        for table in ("nidstate_snapshots", "nidstate_blocks", "nidstate_events", "nidstate_rooms"):
            txn.execute(f"DELETE FROM {table} WHERE room_nid = ?", (room_nid,))
        # A purge is rare: forget every cached value rather than track the room's.
        txn.call_after(self.clear_caches)

    def forget_state_groups_txn(
        self, txn: LoggingTransaction, room_id: str, groups: Collection[int]
    ) -> None:
        """Drop the mapping of state groups Synapse deleted, then what only they used."""
        clause, args = in_list_clause(self.engine, "state_group", groups)
        txn.execute(f"DELETE FROM nidstate_state_groups WHERE {clause}", args)
        txn.call_after(self._forget_groups, list(groups))
        self.reclaim_txn(txn, room_id)

    def _forget_groups(self, groups: Iterable[int]) -> None:
        for group in groups:
            self._group_snapshots.invalidate(group)

    # ---------------------------------------------------------------- lookups
    #
    # Every read helper takes ``txn=None`` to read the caches only: a miss then
    # raises CacheMiss and the caller retries in a transaction. Warm lookups
    # so never leave the reactor thread, like Synapse's own cached state reads.

    def _event_snapshots_read(
        self,
        txn: LoggingTransaction | None,
        event_ids: Collection[str],
        learnt: _TxnCaches,
        filter_nids: "_FilterNids | None",
    ) -> dict[str, int]:
        """Snapshot of each event that has one (an event without one is left out).

        The snapshots' block lists come in the same query (into ``learnt``),
        and so do the NIDs of ``filter_nids``' strings not cached yet.
        """
        found, missing = self._split_cached(self._event_snapshots, event_ids)
        if missing:
            if txn is None:
                raise CacheMiss()
            clause, args = in_list_clause(self.engine, "e.event_id", missing)
            sql = (
                "SELECT 0, e.event_id, e.snapshot_nid, s.block_nids FROM nidstate_events AS e"
                f" JOIN nidstate_snapshots AS s ON s.snapshot_nid = e.snapshot_nid WHERE {clause}"
            )
            if filter_nids is not None:
                for kind, (table, missing_strings) in enumerate(
                    ((TYPES, filter_nids.types_missing), (STATE_KEYS, filter_nids.keys_missing)),
                    start=1,
                ):
                    if missing_strings:
                        string_clause, string_args = in_list_clause(
                            self.engine, table.string_column, missing_strings
                        )
                        sql += (
                            f" UNION ALL SELECT {kind}, {table.string_column}, {table.nid_column},"
                            f" NULL FROM {table.table} WHERE {string_clause}"
                        )
                        args += string_args
            txn.execute(sql, args)
            pairs = []
            strings: list[list[tuple[str, int]]] = [[], [], []]
            for kind, string, nid, block_nids in txn:
                if kind == 0:
                    pairs.append((string, nid))
                    learnt.snapshots[nid] = algebra.unpack_nids(block_nids)
                else:
                    strings[kind].append((string, nid))
            found.update(pairs)
            txn.call_after(self._fill, self._event_snapshots, pairs)
            if filter_nids is not None:
                filter_nids.learnt(txn, self, strings[1], strings[2])
        return found

    def cached_state_for_events(
        self, event_ids: Collection[str], state_filter: StateFilter
    ) -> dict[str, MutableStateMap[str]] | None:
        """:meth:`state_for_events_txn` from the caches alone; None if anything is not cached.

        Events the mirror has no snapshot for are never cached, so a request
        with one of them goes to the database (and then falls back).
        """
        try:
            return self.state_for_events_txn(None, event_ids, state_filter)
        except CacheMiss:
            return None

    def state_for_events_txn(
        self,
        txn: LoggingTransaction | None,
        event_ids: Collection[str],
        state_filter: StateFilter,
    ) -> dict[str, MutableStateMap[str]]:
        """The state at each event the mirror has a snapshot for, filtered.

        Events without a snapshot are left out of the result. A filter of
        concrete keys (what visibility checks ask, lazy-loading) resolves
        those keys in NIDs and keeps the answer in the per-snapshot member and
        non-member caches, as Synapse does per state group; any other filter
        resolves the whole state once, keeps it as strings in the
        resolved-state cache and filters it with ``StateFilter.filter_state``.
        """
        # Filters that need most of the state (full, wildcards) resolve it all
        # and keep it; narrower ones (concrete keys, lazy-loaded members)
        # resolve in NIDs and turn only what they keep into strings.
        # (StateFilter.has_wildcards() also counts include_others: not used here,
        # so that lazy-loading members stays on the narrow path.)
        whole = state_filter.is_full() or any(
            state_keys is None for state_keys in state_filter.types.values()
        )
        filter_nids = None if whole else _FilterNids.of(self, state_filter)
        learnt = _TxnCaches()
        snapshots = self._event_snapshots_read(txn, event_ids, learnt, filter_nids)
        if not snapshots:
            return {}
        by_snapshot: dict[int, MutableStateMap[str]] = {}
        todo = []
        member_filter, non_member_filter = state_filter.get_member_split()
        for snapshot_nid in set(snapshots.values()):
            resolved = self._resolved.get(snapshot_nid)
            if resolved is not None:
                by_snapshot[snapshot_nid] = resolved.filter(state_filter)
                continue
            # What narrower lookups left, per snapshot, in the two caches
            # Synapse keeps per state group (members, and everything else).
            non_members, got_non_members = _state_from_cache(
                self._non_members, snapshot_nid, non_member_filter
            )
            members, got_members = _state_from_cache(self._members, snapshot_nid, member_filter)
            if got_non_members and got_members:
                by_snapshot[snapshot_nid] = {**non_members, **members}
            else:
                todo.append(snapshot_nid)
        if todo:
            sequences = (self._members.sequence, self._non_members.sequence)
            block_lists = self._snapshots_txn(txn, learnt, todo)
            blocks = self._blocks_txn(
                txn, learnt, {b for nids in block_lists.values() for b in nids}
            )
            if txn is not None:
                # Caching what a read loaded is safe: blocks and snapshots never change.
                txn.call_after(self._publish, learnt)
            if whole:
                nid_states = {
                    s: algebra.resolve(blocks[b] for b in block_lists[s]) for s in todo
                }
            else:
                assert filter_nids is not None
                nid_filter = self._nid_filter_read(txn, state_filter, filter_nids)
                nid_states = {
                    s: nid_filter.apply([blocks[b] for b in block_lists[s]]) for s in todo
                }
            # A whole state is cached as strings (below): filling the per-NID
            # caches with thousands of entries as well would cost more than the read.
            strings = self._to_strings(txn, nid_states, fill=not whole)
            for snapshot_nid, state in strings.items():
                if whole:
                    resolved = ResolvedState(state)
                    if txn is None:  # built from the caches: committed data only
                        self._resolved.set(snapshot_nid, resolved)
                    else:
                        txn.call_after(self._resolved.set, snapshot_nid, resolved)
                    by_snapshot[snapshot_nid] = resolved.filter(state_filter)
                else:
                    by_snapshot[snapshot_nid] = state
            if not whole:
                # Synapse's own rule for what a filtered read tells each cache.
                insert = functools.partial(
                    StateGroupDataStore._insert_into_cache,
                    _DictionaryCaches(self._members, self._non_members),  # type: ignore[arg-type]
                    cast("dict[int, StateMap[str]]", strings),
                    state_filter,
                    cache_seq_num_members=sequences[0],
                    cache_seq_num_non_members=sequences[1],
                )
                if txn is None:
                    insert()
                else:
                    txn.call_after(insert)
        return {event_id: dict(by_snapshot[nid]) for event_id, nid in snapshots.items()}

    def _to_strings(
        self,
        txn: LoggingTransaction | None,
        nid_states: Mapping[int, NidStateMap],
        fill: bool = True,
    ) -> dict[int, dict[tuple[str, str], str]]:
        type_strings, key_strings, event_strings = self._strings_of_nids_read(
            txn,
            {t for m in nid_states.values() for t, _ in m},
            {s for m in nid_states.values() for _, s in m},
            {e for m in nid_states.values() for e in m.values()},
            fill,
        )
        return {
            snapshot_nid: {
                (type_strings[t], key_strings[s]): event_strings[e]
                for (t, s), e in state.items()
            }
            for snapshot_nid, state in nid_states.items()
        }

    def _strings_of_nids_read(
        self,
        txn: LoggingTransaction | None,
        type_nids: Collection[int],
        key_nids: Collection[int],
        event_nids: Collection[int],
        fill: bool = True,
    ) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
        """The strings of type, state key and event NIDs, in one query for all misses.

        ``fill=False`` leaves the state key and event caches as they were (the
        few types are always cached).
        """
        caches = (self._nid_strings[TYPES], self._nid_strings[STATE_KEYS], self._event_ids)
        found: list[dict[int, str]] = []
        missing: list[list[int]] = []
        for cache, nids in zip(caches, (type_nids, key_nids, event_nids)):
            hit, miss = self._split_cached(cache, nids)
            found.append(hit)
            missing.append(miss)
        if any(missing):
            if txn is None:
                raise CacheMiss()
            parts, args = [], []
            for kind, (table, nid_column, column) in enumerate(
                (
                    ("nidstate_event_types", "type_nid", "event_type"),
                    ("nidstate_state_keys", "state_key_nid", "state_key"),
                    ("nidstate_events", "event_nid", "event_id"),
                )
            ):
                if missing[kind]:
                    clause, clause_args = in_list_clause(self.engine, nid_column, missing[kind])
                    parts.append(
                        f"SELECT {kind}, {nid_column}, {column} FROM {table} WHERE {clause}"
                    )
                    args.extend(clause_args)
            txn.execute(" UNION ALL ".join(parts), args)
            rows: list[list[tuple[int, str]]] = [[], [], []]
            for kind, nid, string in txn.fetchall():
                rows[kind].append((nid, string))
            for kind, cache in enumerate(caches):
                found[kind].update(rows[kind])
                if fill or kind == 0:
                    txn.call_after(self._fill, cache, rows[kind])
        return found[0], found[1], found[2]

    def _nid_filter_read(
        self, txn: LoggingTransaction | None, state_filter: StateFilter, nids: "_FilterNids"
    ) -> algebra.NidFilter:
        """The filter in NIDs; strings that have no NID cannot match and are dropped."""
        if nids.types_missing or nids.keys_missing:
            if txn is None:
                raise CacheMiss()
            # One query for both tables (a read never creates a NID).
            type_clause, type_args = in_list_clause(self.engine, "event_type", nids.types_missing)
            key_clause, key_args = in_list_clause(self.engine, "state_key", nids.keys_missing)
            txn.execute(
                f"SELECT 0, event_type, type_nid FROM nidstate_event_types WHERE {type_clause}"
                " UNION ALL"
                f" SELECT 1, state_key, state_key_nid FROM nidstate_state_keys WHERE {key_clause}",
                (*type_args, *key_args),
            )
            rows: list[list[tuple[str, int]]] = [[], []]
            for kind, string, nid in txn.fetchall():
                rows[kind].append((string, nid))
            nids.learnt(txn, self, rows[0], rows[1])
        type_nids, key_nids = nids.type_nids, nids.key_nids
        nid_types: dict[int, frozenset[int] | None] = {}
        for event_type, keys in state_filter.types.items():
            if event_type not in type_nids:
                continue  # no event of this type was ever mirrored
            nid_types[type_nids[event_type]] = (
                None
                if keys is None
                else frozenset(key_nids[k] for k in keys if k in key_nids)
            )
        return algebra.NidFilter(nid_types, state_filter.include_others)
