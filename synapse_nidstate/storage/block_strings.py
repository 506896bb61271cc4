"""The strings stored beside blocks (schema 7): filled, and read.

A block of :data:`MIN_ENTRIES` entries or more carries its entries' types,
state keys and event IDs as text (``algebra.pack_strings``), so that a whole
read takes them with the block (``BlockStore._blocks_txn`` with ``strings``,
into a :class:`NidStrings`) instead of one probe per NID, and resolves a
state in strings (:func:`in_strings`). They are filled after the block is
written (:meth:`BlockStringsStore.fill_block_strings_txn`): by the migration,
and for the live mirror's blocks by a background process once its write
commits (``runtime/block_strings.py``); the mirror writes a compaction from
its parent's NIDs, and reading their strings in Synapse's event transaction
would cost the writer what it saves the reader. A block not filled yet is
read by NID, as before: filling is never needed for an answer, only for speed.
"""

from array import array
from collections.abc import Mapping
from typing import cast

from synapse.storage.database import LoggingTransaction

from synapse_nidstate import algebra
from synapse_nidstate.storage.common import CorruptState
from synapse_nidstate.storage.strings import ByNid, StringStore

#: Blocks with at least this many entries carry their strings. The partial
#: index ``nidstate_blocks_without_strings`` (sql/*/07_block_strings.sql)
#: names the same number: change both together.
MIN_ENTRIES = 16

#: How many blocks one filling transaction takes (a compaction's chunk holds
#: up to a few thousand entries).
FILL_PAGE = 32


class NidStrings:
    """The strings a read found stored beside its blocks (schema 7,
    ``algebra.pack_strings``): each block's entries as strings, to resolve a
    whole state in strings, and by NID (built when first asked) for what
    turns NIDs into strings. Not cached: a whole state is cached as strings."""

    __slots__ = ("_blocks", "_maps")

    def __init__(self) -> None:
        self._blocks: dict[int, tuple[array, list[tuple[str, int]], list[str], list[str]]] = {}
        self._maps: tuple[dict[int, str], dict[int, str], dict[int, str]] | None = None

    def add(self, block_nid: int, flat: array, text: str) -> None:
        """The strings stored beside a block (its entries' NIDs ``flat``,
        three an entry), checked against it."""
        try:
            unpacked = algebra.unpack_strings(text, len(flat) // 3)
        except algebra.AlgebraError as e:
            raise CorruptState(f"block {block_nid}: {e}") from e
        if unpacked is not None:  # else stored without strings: read by NID
            self._blocks[block_nid] = (flat, *unpacked)
            self._maps = None

    def __contains__(self, block_nid: int) -> bool:
        return block_nid in self._blocks

    def apply(self, state: dict[tuple[str, str], str], block_nid: int) -> None:
        """Apply a block's entries, as strings, to ``state`` (a later block
        wins; a tombstone, stored as "", removes its key)."""
        _, runs, keys, events = self._blocks[block_nid]
        types: list[str] = []
        for event_type, count in runs:
            types += [event_type] * count
        state.update(zip(zip(types, keys), events))
        if "" in events:
            for key, event_id in zip(zip(types, keys), events):
                if not event_id:
                    state.pop(key, None)

    def maps(self) -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
        """Type, state key and event ID by NID, of every block added."""
        if self._maps is None:
            types: dict[int, str] = {}
            keys: dict[int, str] = {}
            events: dict[int, str] = {}
            for flat, runs, key_strings, event_strings in self._blocks.values():
                first = 0
                for event_type, count in runs:
                    types[flat[3 * first]] = event_type
                    first += count
                keys.update(zip(flat[1::3], key_strings))
                events.update(zip(flat[2::3], event_strings))
            events.pop(0, None)  # tombstones
            self._maps = (types, keys, events)
        return self._maps


def in_strings(
    block_nids: tuple[int, ...],
    entries_by_nid: Mapping[int, list[algebra.Entry]],
    known: NidStrings,
    by_nid: ByNid,
) -> dict[tuple[str, str], str | None]:
    """A snapshot's whole state resolved in strings: each block that
    carries its strings applied as they are stored, the others' entries
    (:func:`last_entries`) by NID, in the block list's order."""
    types, keys, events = by_nid
    state: dict[tuple[str, str], str] = {}
    for i, b in enumerate(block_nids):
        if b in known:
            known.apply(state, b)
            continue
        for type_nid, key_nid, event_nid in entries_by_nid.get(i, ()):
            key = (types[type_nid], keys[key_nid])
            if event_nid:
                state[key] = events[event_nid]
            else:
                state.pop(key, None)
    return cast("dict[tuple[str, str], str | None]", state)


def last_entries(
    block_nids: tuple[int, ...], blocks: Mapping[int, algebra.Block], known: NidStrings
) -> dict[int, list[algebra.Entry]]:
    """Of a block list's blocks without strings (by position), the entries no
    later block without strings sets again: the only ones whose strings a
    state resolved in strings reads by NID (a block with strings after them
    overwrites them as strings)."""
    last: dict[tuple[int, int], int] = {}
    for i, b in enumerate(block_nids):
        if b not in known:
            for type_nid, key_nid, _ in blocks[b]:
                last[(type_nid, key_nid)] = i
    kept: dict[int, list[algebra.Entry]] = {}
    for i, b in enumerate(block_nids):
        if b not in known:
            kept[i] = [e for e in blocks[b] if last[(e[0], e[1])] == i]
    return kept


class BlockStringsStore(StringStore):
    async def fill_block_strings(self, max_pages: int | None = None) -> int:
        """:meth:`fill_block_strings_txn`, a page a transaction, until none is
        left (or ``max_pages``); returns how many blocks were filled."""
        filled = pages = 0
        while max_pages is None or pages < max_pages:
            done = await self.db_pool.runInteraction(
                "nidstate_fill_block_strings", self.fill_block_strings_txn
            )
            if not done:
                break
            filled += done
            pages += 1
        return filled

    def fill_block_strings_txn(self, txn: LoggingTransaction, limit: int = FILL_PAGE) -> int:
        """Store the strings of up to ``limit`` blocks that should carry them
        and do not yet (oldest first); returns how many were filled, 0 when
        none is left. Resumable: a filled block is never selected again."""
        txn.execute(
            "SELECT block_nid, entries FROM nidstate_blocks"
            f" WHERE strings IS NULL AND entry_count >= {MIN_ENTRIES}"
            " ORDER BY block_nid LIMIT ?",
            (limit,),
        )
        blocks = [(nid, algebra.unpack_block(data)) for nid, data in txn.fetchall()]
        if not blocks:
            return 0
        try:
            filled = self._strings_txn(txn, blocks)
        except CorruptState:
            # A block names a NID without a row: the others are filled, it is
            # stored without strings, and the reads, by NID, report it.
            filled = []
            for block in blocks:
                try:
                    filled += self._strings_txn(txn, [block])
                except CorruptState:
                    filled.append(("", block[0]))
        txn.execute_batch("UPDATE nidstate_blocks SET strings = ? WHERE block_nid = ?", filled)
        return len(blocks)

    def _strings_txn(
        self, txn: LoggingTransaction, blocks: list[tuple[int, algebra.Block]]
    ) -> list[tuple[str, int]]:
        """(stored strings, block NID) of each block; read only."""
        types, keys, events = self._strings_of_nids_read(
            txn,
            {t for _, block in blocks for t, _, _ in block},
            {s for _, block in blocks for _, s, _ in block},
            {e for _, block in blocks for _, _, e in block if e},
            fill=False,
        )
        return [
            (
                algebra.pack_strings(
                    [types[t] for t, _, _ in block],
                    [keys[s] for _, s, _ in block],
                    [events[e] if e else "" for _, _, e in block],  # "": a tombstone
                ),
                nid,
            )
            for nid, block in blocks
        ]
