"""Interning: strings (rooms, event types, state keys, event IDs) to NIDs.

A NID is created by the first writer that needs it and never changes; reads
never create one.
"""

from collections.abc import Callable, Collection, Iterable, Mapping

from synapse.storage.database import LoggingTransaction
from synapse.types import StateMap

from synapse_nidstate.algebra import NidStateMap
from synapse_nidstate.storage.base import NidStoreBase, TxnLearnt
from synapse_nidstate.storage.common import STATE_KEYS, TYPES, StringTable, insert_new_txn

#: ``nidstate_events`` seen as a string table (its rows also name their room).
EVENTS = StringTable("nidstate_events", "event_nid", "event_id")


class InterningStore(NidStoreBase):
    def _nids_read_txn(
        self,
        txn: LoggingTransaction,
        table: StringTable,
        strings: Collection[str],
        fill: bool = False,
    ) -> dict[str, int]:
        """The NIDs ``strings`` have (cached or read); nothing is interned, a
        string without a NID is left out. ``fill``: those read are cached once
        the transaction commits (a string and its NID never change)."""
        cache = self._event_nids if table is EVENTS else self._string_nids[table]
        known, missing = self._split_cached(cache, strings)
        if missing:
            rows = self._select_in_txn(
                txn,
                f"SELECT {table.string_column}, {table.nid_column} FROM {table.table} WHERE",
                table.string_column,
                missing,
            )
            known.update(rows)
            if fill:
                txn.call_after(self._fill, cache, rows)
        return known

    def _intern_strings_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        table: StringTable,
        strings: Iterable[str],
    ) -> dict[str, int]:
        """Return the NID of each string, creating the missing ones.

        Safe under concurrent writers: a row another writer inserts first wins
        (``ON CONFLICT DO NOTHING``) and is read back.
        """
        known, missing = self._split_string_nids(table, set(strings))
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
            insert_new_txn(
                txn, table.table, (table.string_column,), table.string_column,
                [(s,) for s in absent],
            )
            found.update(self._select_in_txn(txn, select, table.string_column, absent))
        learnt.strings[table].update(found)
        known.update(found)
        return known

    def _intern_events_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        events: Mapping[str, int],
    ) -> dict[str, int]:
        """Return the NID of each event ID of ``events`` (event ID -> its room's
        NID, the room a new row is interned in)."""
        known, missing = self._split_cached(self._event_nids, events)
        missing = [e for e in missing if e not in learnt.events]
        known.update((e, learnt.events[e]) for e in events if e in learnt.events)
        if not missing:
            return known
        select = "SELECT event_id, event_nid FROM nidstate_events WHERE"
        found = dict(self._select_in_txn(txn, select, "event_id", missing))
        absent = sorted(e for e in missing if e not in found)
        if absent:
            insert_new_txn(
                txn, "nidstate_events", ("event_id", "room_nid"), "event_id",
                [(e, events[e]) for e in absent],
            )
            found.update(self._select_in_txn(txn, select, "event_id", absent))
        learnt.events.update(found)
        known.update(found)
        return known

    def _intern_state_map_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        state_maps: Iterable[tuple[int, StateMap[str]]],
    ) -> Callable[[StateMap[str]], NidStateMap]:
        """Intern every string of ``state_maps`` (each with its room's NID), in
        one statement or three per table whatever the number of rooms; return
        a converter to NID maps."""
        state_maps = list(state_maps)
        types = {t for _, m in state_maps for t, _ in m}
        keys = {s for _, m in state_maps for _, s in m}
        type_nids = self._intern_strings_txn(txn, learnt, TYPES, types)
        key_nids = self._intern_strings_txn(txn, learnt, STATE_KEYS, keys)
        events = {e: room_nid for room_nid, m in state_maps for e in m.values()}
        event_nids = self._intern_events_txn(txn, learnt, events)

        def convert(state: StateMap[str]) -> NidStateMap:
            return {
                (type_nids[t], key_nids[s]): event_nids[e] for (t, s), e in state.items()
            }

        return convert
