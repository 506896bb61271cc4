"""Following Synapse's purges: forget what Synapse deleted, then delete the
snapshots and blocks nothing uses any more."""

from collections.abc import Collection, Iterable

from synapse.storage.database import LoggingTransaction

from synapse_nidstate import algebra
from synapse_nidstate.storage.common import in_list_clause
from synapse_nidstate.storage.reclaim import ReclaimStore


class PurgeStore(ReclaimStore):
    def delete_unused_txn(self, txn: LoggingTransaction, room_id: str) -> tuple[int, int]:
        """Delete the room's snapshots no state group uses any more,
        then its blocks no snapshot lists; returns how many of each.

        Runs once Synapse has deleted unreferenced state groups: until then
        every snapshot is still a group's. Memory: the room's referenced block NIDs.
        """
        room_nid = self._room_nid_txn(txn, room_id)
        if room_nid is None:
            return 0, 0
        self._lock_room_txn(txn, room_nid)
        # NOT EXISTS on the index of nidstate_state_groups.snapshot_nid (schema 6):
        # a probe per snapshot of the room, not a scan of every group's row.
        txn.execute(
            "SELECT s.snapshot_nid FROM nidstate_snapshots AS s WHERE s.room_nid = ?"
            " AND NOT EXISTS (SELECT 1 FROM nidstate_state_groups AS g"
            " WHERE g.snapshot_nid = s.snapshot_nid)",
            (room_nid,),
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
            txn.execute(f"DELETE FROM nidstate_block_pieces WHERE {clause}", args)
            txn.execute(f"DELETE FROM nidstate_blocks WHERE {clause}", args)
        txn.call_after(self._forget_snapshots_and_blocks, snapshots, blocks)
        return len(snapshots), len(blocks)

    def _forget_snapshots_and_blocks(self, snapshots: list[int], blocks: list[int]) -> None:
        self.invalidations += 1
        for snapshot_nid in snapshots:
            self._snapshot_blocks.invalidate(snapshot_nid)
            self._resolved.invalidate(snapshot_nid)
        for block_nid in blocks:
            self._blocks.invalidate(block_nid)
            covers = self._piece_covers.get(block_nid)
            if covers is not None:
                self._piece_covers.invalidate(block_nid)
                for piece in range(len(covers) // 2):
                    self._pieces.invalidate((block_nid, piece))

    def forget_event_snapshots(self) -> None:
        """Empty the event -> snapshot cache (a purge somewhere in the deployment)."""
        self.invalidations += 1
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
        txn.execute(
            "DELETE FROM nidstate_block_pieces WHERE block_nid IN"
            " (SELECT block_nid FROM nidstate_blocks WHERE room_nid = ?)",
            (room_nid,),
        )
        for table in (
            "nidstate_reclaimed_groups",
            "nidstate_snapshots",
            "nidstate_blocks",
            "nidstate_events",
            "nidstate_rooms",
        ):
            txn.execute(f"DELETE FROM {table} WHERE room_nid = ?", (room_nid,))
        self._unmark_if_none_left_txn(txn)
        # A purge is rare: forget every cached value rather than track the room's.
        txn.call_after(self.clear_caches)

    def forget_state_groups_txn(
        self, txn: LoggingTransaction, room_id: str, groups: Collection[int]
    ) -> None:
        """Drop the mapping of state groups Synapse deleted, then what only they used."""
        clause, args = in_list_clause(self.engine, "state_group", groups)
        txn.execute(f"DELETE FROM nidstate_state_groups WHERE {clause}", args)
        self.forget_reclaimed_txn(txn, groups)
        txn.call_after(self._forget_groups, list(groups))
        self.delete_unused_txn(txn, room_id)

    def _forget_groups(self, groups: Iterable[int]) -> None:
        self.invalidations += 1
        for group in groups:
            self._group_snapshots.invalidate(group)
