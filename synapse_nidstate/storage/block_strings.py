"""Filling the strings stored beside blocks (schema 7).

A whole read takes the strings of a block's entries from its row
(``BlockStore._blocks_txn`` with ``strings``) instead of one probe per NID.
Blocks of :data:`MIN_ENTRIES` entries or more carry them; they are filled
here, after the block is written, by the migration and the background job:
the live mirror writes a compaction from its parent's NIDs and does not have
the strings at hand, and reading them in Synapse's event transaction would
cost the writer what it saves the reader. A block not filled yet is read by
NID, as before, so filling is never needed for an answer, only for speed.
"""

from synapse.storage.database import LoggingTransaction

from synapse_nidstate import algebra
from synapse_nidstate.storage.common import CorruptState
from synapse_nidstate.storage.resolved import ResolvedStateStore

#: Blocks with at least this many entries carry their strings. The partial
#: index ``nidstate_blocks_without_strings`` (sql/*/07_block_strings.sql)
#: names the same number: change both together.
MIN_ENTRIES = 16

#: How many blocks one filling transaction takes (a compaction's chunk holds
#: up to a few thousand entries).
FILL_PAGE = 32


class BlockStringsStore(ResolvedStateStore):
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
