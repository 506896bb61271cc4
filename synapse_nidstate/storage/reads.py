"""Where a lookup turns NIDs into strings: the state at events, filtered.

Every read helper takes ``txn=None`` to read the caches only: a miss then
raises ``CacheMiss`` and the caller retries in a transaction. Warm lookups so
never leave the reactor thread, like Synapse's own cached state reads.
"""

import functools
from collections.abc import Collection
from typing import TYPE_CHECKING, cast

import attr
from synapse.storage.database import LoggingTransaction
from synapse.types import MutableStateMap, StateMap
from synapse.types.state import StateFilter

from synapse_nidstate import algebra
from synapse_nidstate.storage.base import K, NidStoreBase, TxnLearnt
from synapse_nidstate.storage.blocks import checked_block_list
from synapse_nidstate.storage.common import (
    STATE_KEYS,
    TYPES,
    CacheMiss,
    CorruptState,
    in_list_clause,
)
from synapse_nidstate.storage.resolved import ResolvedStateStore
from synapse_nidstate.storage.split_cache import SplitFilter, SplitStateCache
from synapse_nidstate.storage.strings import ByNid

if TYPE_CHECKING:
    from synapse.server import HomeServer
    from synapse.util.caches.lrucache import LruCache

    from synapse_nidstate.runtime.config import NidStateConfig


@attr.s(slots=True, auto_attribs=True)
class _FilterNids:
    """The NIDs of a filter's types and state keys: cached ones, and those to read."""

    type_nids: dict[str, int]
    types_missing: list[str]
    key_nids: dict[str, int]
    keys_missing: list[str]

    @classmethod
    def of(cls, store: "NidStoreBase", state_filter: StateFilter) -> "_FilterNids":
        types = state_filter.types
        keys = {k for ks in types.values() if ks for k in ks}
        type_nids, types_missing = store._split_string_nids(TYPES, types)
        key_nids, keys_missing = store._split_string_nids(STATE_KEYS, keys)
        return cls(type_nids, types_missing, key_nids, keys_missing)

    def by_nid(self) -> "ByNid":
        """The filter's strings by NID (no event IDs), fresh dicts."""
        return (
            {nid: string for string, nid in self.type_nids.items()},
            {nid: string for string, nid in self.key_nids.items()},
            {},
        )

    def learnt(
        self,
        txn: LoggingTransaction,
        store: "NidStoreBase",
        type_rows: list[tuple[str, int]],
        key_rows: list[tuple[str, int]],
    ) -> None:
        """Rows read for the missing strings; a string without a row has no NID."""
        self.type_nids.update(type_rows)
        self.key_nids.update(key_rows)
        self.types_missing, self.keys_missing = [], []
        txn.call_after(store._fill, store._string_nids[TYPES], type_rows)
        txn.call_after(store._fill, store._string_nids[STATE_KEYS], key_rows)


def _is_whole(state_filter: StateFilter) -> bool:
    """Filters that need most of the state (full, wildcards) resolve it all and
    keep it; narrower ones (concrete keys, lazy-loaded members) resolve in NIDs
    and turn only what they keep into strings. (``StateFilter.has_wildcards()``
    also counts ``include_others``: not used here, so that lazy-loading members
    stays on the narrow path.)"""
    return state_filter.is_full() or any(
        state_keys is None for state_keys in state_filter.types.values()
    )


@attr.s(slots=True, frozen=True, auto_attribs=True)
class SnapshotRead:
    """What one read of snapshots learnt (block lists, blocks) and the NIDs of
    its filter's strings, filled by its first statement and used by the next."""

    learnt: TxnLearnt
    filter_nids: _FilterNids | None


class StateReadStore(ResolvedStateStore):
    def __init__(self, hs: "HomeServer", config: "NidStateConfig") -> None:
        super().__init__(hs, config)
        self._event_snapshots: LruCache[str, int] = self._cache(
            "event_snapshots", config.snapshot_cache_size
        )
        #: snapshot -> parts of its state as strings, as Synapse caches a state
        #: group's: members, and everything else (sized in state entries).
        self._split = SplitStateCache(
            self._clock, self._server_name, config.resolved_state_cache_size
        )
        self.named_caches["nidstate_snapshot_parts"] = self._split.cache

    def _publish(self, learnt: TxnLearnt) -> None:
        super()._publish(learnt)
        for event_id, snapshot_nid in learnt.event_snapshots.items():
            self._event_snapshots.set(event_id, snapshot_nid)

    def _event_snapshots_read(
        self,
        txn: LoggingTransaction | None,
        event_ids: Collection[str],
        learnt: TxnLearnt,
        filter_nids: "_FilterNids | None",
    ) -> dict[str, int]:
        """Snapshot of each event that has one (an event without one is left out).

        The snapshots' block lists come in the same query (into ``learnt``),
        and so do the NIDs of ``filter_nids``' strings not cached yet.
        """
        # The state at an event is its state group's: Synapse's own row says
        # which group (the state before the event when rejected).
        return self._snapshots_read(
            txn,
            event_ids,
            learnt,
            filter_nids,
            self._event_snapshots,
            "esg.event_id",
            " FROM event_to_state_groups AS esg"
            " JOIN nidstate_state_groups AS g ON g.state_group = esg.state_group",
        )

    def group_snapshots_read(
        self,
        txn: LoggingTransaction | None,
        groups: Collection[int],
        learnt: TxnLearnt,
        filter_nids: "_FilterNids | None",
    ) -> dict[int, int]:
        """:meth:`_event_snapshots_read` for state groups: the snapshot of each
        group the mirror has, its block list and the filter's NIDs in one query."""
        return self._snapshots_read(
            txn,
            groups,
            learnt,
            filter_nids,
            self._group_snapshots,
            "g.state_group",
            " FROM nidstate_state_groups AS g",
        )

    def _snapshots_read(
        self,
        txn: LoggingTransaction | None,
        keys: Collection[K],
        learnt: TxnLearnt,
        filter_nids: "_FilterNids | None",
        cache: "LruCache[K, int]",
        key_column: str,
        source: str,
    ) -> dict[K, int]:
        """Snapshot of each of ``keys`` (events or groups) that has one, read
        ``source`` (whose rows ``key_column`` names, with ``g`` the groups' map)."""
        found, missing = self._split_cached(cache, keys)
        if missing:
            if txn is None:
                raise CacheMiss()
            clause, args = in_list_clause(self.engine, key_column, missing)
            # LEFT JOIN: a mapping to a snapshot that is not there is an error
            # (CorruptState), not a key without a snapshot. The key is the
            # second column (an event ID or a group), a string the third.
            sql = (
                f"SELECT 0, {key_column}, NULL, g.snapshot_nid, s.block_nids, s.content_hash"
                f"{source}"
                " LEFT JOIN nidstate_snapshots AS s ON s.snapshot_nid = g.snapshot_nid"
                f" WHERE {clause}"
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
                            f" UNION ALL SELECT {kind}, NULL, {table.string_column},"
                            f" {table.nid_column}, NULL, NULL FROM {table.table}"
                            f" WHERE {string_clause}"
                        )
                        args += string_args
            self.prepared.execute(txn, "snapshots", sql, args)
            # The cache is keyed by the caller's objects, not the rows' copies
            # (an event ID is a string of about 90 bytes, which the caller's
            # events hold already; Synapse's own cache keeps the caller's too).
            given = {key: key for key in missing}
            pairs = []
            strings: list[list[tuple[str, int]]] = [[], [], []]
            for kind, key, string, nid, block_nids, digest in txn:
                if kind == 0:
                    pairs.append((given[key], nid))
                    if nid not in learnt.snapshots:  # keys of a batch share snapshots
                        if block_nids is None:
                            raise CorruptState(f"snapshot {nid} of {key} missing")
                        learnt.snapshots[nid] = checked_block_list(nid, block_nids, digest)
                else:
                    strings[kind].append((string, nid))
            found.update(pairs)
            txn.call_after(self._fill, cache, pairs)
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
        # The filter's NIDs ride on the first statement; from the caches alone
        # they are only looked up if a narrow answer is not cached as strings.
        filter_nids = (
            None if txn is None or _is_whole(state_filter) else _FilterNids.of(self, state_filter)
        )
        learnt = TxnLearnt()
        snapshots = self._event_snapshots_read(txn, event_ids, learnt, filter_nids)
        if not snapshots:
            return {}
        by_snapshot = self._states_of_snapshots_read(
            txn, set(snapshots.values()), state_filter, filter_nids, learnt
        )
        # Each state is the read's own (never a cache's): the first event of
        # a snapshot takes it, the others a copy (a caller may change one).
        # A copy for each took a cold whole read's peak at HQ scale (50,010
        # entries) to 18.5 MiB instead of 17.1 (python -m benchmarks.whole_read).
        given: set[int] = set()
        answer = {}
        for event_id, nid in snapshots.items():
            state = by_snapshot[nid]
            answer[event_id] = dict(state) if nid in given else state
            given.add(nid)
        return answer

    def snapshot_states_txn(
        self,
        txn: LoggingTransaction | None,
        snapshot_nids: Collection[int],
        state_filter: StateFilter,
        read: "SnapshotRead | None" = None,
    ) -> dict[int, MutableStateMap[str]]:
        """The state of each snapshot, filtered (callers copy before changing it);
        ``txn=None``: from the caches alone (a miss raises ``CacheMiss``).
        ``read``: what the read learnt so far (:meth:`snapshot_read`)."""
        if not snapshot_nids:
            return {}
        if read is None:
            read = SnapshotRead(TxnLearnt(), None) if txn is None else self.snapshot_read(state_filter)
        return self._states_of_snapshots_read(
            txn, set(snapshot_nids), state_filter, read.filter_nids, read.learnt
        )

    def snapshot_read(self, state_filter: StateFilter) -> "SnapshotRead":
        """The start of a read of snapshots with ``state_filter``: what its
        first statement fills (:meth:`group_snapshots_read`)."""
        return SnapshotRead(
            TxnLearnt(),
            None if _is_whole(state_filter) else _FilterNids.of(self, state_filter),
        )

    def _states_of_snapshots_read(
        self,
        txn: LoggingTransaction | None,
        snapshot_nids: set[int],
        state_filter: StateFilter,
        filter_nids: "_FilterNids | None",
        learnt: TxnLearnt,
    ) -> dict[int, MutableStateMap[str]]:
        """Each snapshot's state as strings, filtered, each a new dict (see
        ``state_for_events_txn``)."""
        whole = _is_whole(state_filter)
        by_snapshot: dict[int, MutableStateMap[str]] = {}
        todo = []
        split: SplitFilter | None = None
        for snapshot_nid in snapshot_nids:
            resolved = self._cached_resolved(snapshot_nid)
            if resolved is not None:
                by_snapshot[snapshot_nid] = resolved(state_filter)
                continue
            # What narrower lookups left, per snapshot, as Synapse keeps them
            # per state group (members, and everything else).
            if split is None:
                split = self._split.prepare(state_filter)
            parts = self._split.get(snapshot_nid, split)
            if parts is not None:
                by_snapshot[snapshot_nid] = parts
            else:
                todo.append(snapshot_nid)
        if not todo:
            return by_snapshot
        block_lists = self._snapshots_txn(txn, learnt, todo)
        if whole:
            by_snapshot.update(self._resolve_whole(txn, learnt, block_lists, state_filter))
            return by_snapshot
        sequence = self._split.sequence
        if filter_nids is None:
            filter_nids = _FilterNids.of(self, state_filter)
        nid_filter = self._nid_filter_read(txn, state_filter, filter_nids)
        key_ranges = nid_filter.key_ranges()
        blocks: dict[int, algebra.Block]
        if key_ranges is None:
            blocks = self._blocks_txn(txn, learnt, {b for nids in block_lists.values() for b in nids})
        else:
            # Only the blocks whose key range holds a wanted key (in a big
            # room one or two of a compaction's chunks, and the deltas after
            # them), and of each only the entries in the filter's ranges.
            # With a filter of exact keys, the event IDs of their entries
            # come with the blocks (PostgreSQL: storage/narrow_statement.py).
            narrow = self._narrow_blocks_txn(
                txn, learnt, block_lists, key_ranges, nid_filter.concrete_keys()
            )
            blocks = {b: algebra.entries_in_ranges(flat, key_ranges) for b, flat in narrow.items()}
        if txn is not None:
            # Caching what a read loaded is safe: blocks and snapshots never change.
            txn.call_after(self._publish, learnt)
        nid_states = {
            s: nid_filter.apply([blocks[b] for b in block_lists[s] if b in blocks]) for s in todo
        }
        # The filter's types and state keys are the read's already, and so
        # are the event IDs found beside the blocks.
        known = filter_nids.by_nid()
        if learnt.event_ids:
            known[2].update(learnt.event_ids)
            if txn is not None:  # cached as the strings' statement caches them: those kept
                kept = {e for state in nid_states.values() for e in state.values() if e}
                txn.call_after(
                    self._fill,
                    self._event_ids,
                    [(e, i) for e, i in learnt.event_ids.items() if e in kept],
                )
        strings = cast(
            "dict[int, MutableStateMap[str]]",
            self._to_strings(txn, nid_states, known=known),
        )
        by_snapshot.update(strings)
        insert = functools.partial(
            self._split.fill, cast("dict[int, StateMap[str]]", strings), state_filter, sequence
        )
        if txn is None:
            insert()
        else:
            txn.call_after(insert)
        return by_snapshot

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
            self.prepared.execute(
                txn,
                "filter_nids",
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
