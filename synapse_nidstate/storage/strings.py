"""Where NIDs become strings: the strings of type, state key and event NIDs,
cached or read in one statement, for the reads and the proofs."""

import functools
from collections.abc import Collection, Mapping

from synapse.storage.database import LoggingTransaction

from synapse_nidstate.algebra import NidStateMap
from synapse_nidstate.storage.base import NidStoreBase
from synapse_nidstate.storage.common import (
    STATE_KEYS,
    TYPES,
    CacheMiss,
    CorruptState,
    in_list_clause,
)

#: Strings by NID: event types, state keys, event IDs.
ByNid = tuple[dict[int, str], dict[int, str], dict[int, str]]


class StringStore(NidStoreBase):
    def _to_strings(
        self,
        txn: LoggingTransaction | None,
        nid_states: Mapping[int, NidStateMap],
        fill: bool = True,
        known: "ByNid | None" = None,
    ) -> dict[int, dict[tuple[str, str], str | None]]:
        """NIDs to strings; a tombstone (event NID 0, in changes) to None.
        ``known``: strings the read has already (taken first, added to)."""
        by_nid = self._strings_of_nids_read(
            txn,
            {t for m in nid_states.values() for t, _ in m},
            {s for m in nid_states.values() for _, s in m},
            {e for m in nid_states.values() for e in m.values() if e},
            fill,
            known,
        )
        return {snapshot_nid: converted(by_nid, state) for snapshot_nid, state in nid_states.items()}

    def _strings_of_nids_read(
        self,
        txn: LoggingTransaction | None,
        type_nids: Collection[int],
        key_nids: Collection[int],
        event_nids: Collection[int],
        fill: bool = True,
        known: "ByNid | None" = None,
    ) -> "ByNid":
        """The strings of type, state key and event NIDs, in one query for all misses.

        ``fill=False`` leaves the state key and event caches as they were (the
        few types are always cached). ``known``: strings found beside blocks,
        taken first (the read's own: answered from, and added to).
        """
        caches = (self._nid_strings[TYPES], self._nid_strings[STATE_KEYS], self._event_ids)
        split = (
            functools.partial(self._split_nid_strings, TYPES),
            functools.partial(self._split_nid_strings, STATE_KEYS),
            functools.partial(self._split_cached, self._event_ids),
        )
        had = known if known is not None else ({}, {}, {})
        found: list[dict[int, str]] = []
        missing: list[list[int]] = []
        for split_cached, nids, have in zip(split, (type_nids, key_nids, event_nids), had):
            if have:  # the read's own: answered from, and added to
                hit, (cached, miss) = have, split_cached([n for n in nids if n not in have])
                hit.update(cached)
            else:
                hit, miss = split_cached(nids)
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
            self.prepared.execute(txn, "strings", " UNION ALL ".join(parts), args)
            rows: list[list[tuple[int, str]]] = [[], [], []]
            for kind, nid, string in txn.fetchall():
                rows[kind].append((nid, string))
            for kind, table in enumerate(("event type", "state key", "event")):
                if len(rows[kind]) != len(missing[kind]):
                    lost = set(missing[kind]) - {nid for nid, _ in rows[kind]}
                    raise CorruptState(f"{table} NIDs named by blocks missing: {sorted(lost)[:10]}")
            for kind, cache in enumerate(caches):
                found[kind].update(rows[kind])
                if fill or kind == 0:
                    txn.call_after(self._fill, cache, rows[kind])
        return found[0], found[1], found[2]


def converted(
    by_nid: ByNid, state: NidStateMap
) -> dict[tuple[str, str], str | None]:
    """A state in NIDs as strings; a tombstone (event NID 0, in changes) as None."""
    types, keys, events = by_nid
    return {(types[t], keys[s]): events[e] if e else None for (t, s), e in state.items()}
