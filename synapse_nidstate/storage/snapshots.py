"""Where a snapshot is built and written: blocks, snapshots and the state
group -> snapshot map, planned in Python and written in a few statements."""

import functools
from collections.abc import Mapping, Sequence
from typing import TypeVar

import attr
from synapse.storage.database import LoggingTransaction

from synapse_nidstate import algebra
from synapse_nidstate.algebra import Block
from synapse_nidstate.algebra.pieces import Piece, cut_pieces
from synapse_nidstate.storage.base import TxnLearnt, WriteScope
from synapse_nidstate.storage.blocks import EVERY_KEY, BlockStore
from synapse_nidstate.storage.common import (
    ROOMS,
    EventRow,
    GroupStep,
    WriteCounters,
    insert_new_txn,
)
from synapse_nidstate.storage.interning import InterningStore

T = TypeVar("T")


def _key_range_columns(block: Block) -> tuple[int, int]:
    """``first_key``, ``last_key`` of a block: every key when its range is not
    known (NULL is kept for blocks written before schema 5, not filled yet)."""
    key_range = algebra.block_key_range(block)
    return key_range if key_range is not None else EVERY_KEY


class SnapshotStore(BlockStore, InterningStore):
    def _store_blocks_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        blocks: Sequence[tuple[int, Block]],
    ) -> list[int]:
        """Insert-or-select ``(room_nid, block)`` by content, a big block with
        its pieces (schema 8); their NIDs in order."""
        packed = [bytes(algebra.pack_block(b)) for _, b in blocks]
        pieces = [cut_pieces(b, data) for (_, b), data in zip(blocks, packed)]
        nids = self._insert_or_select_txn(
            txn,
            "nidstate_blocks",
            "block_nid",
            ("entry_count", "entries", "first_key", "last_key", "pieces"),
            [
                (
                    room_nid,
                    algebra.block_hash(b),
                    (len(b), bytearray(data), *_key_range_columns(b), len(cut)),
                )
                for (room_nid, b), data, cut in zip(blocks, packed, pieces)
            ],
        )
        # A block that was there already has its pieces too (or, written
        # before schema 8, gets them now and is read whole until the filler
        # counts them).
        self._store_pieces_txn(txn, list(zip(nids, pieces)))
        learnt.blocks.update(zip(nids, (b for _, b in blocks)))
        return nids

    def _store_pieces_txn(self, txn: LoggingTransaction, pieces: list[tuple[int, list[Piece]]]) -> None:
        """Insert the pieces of each ``(block NID, its pieces)`` not there yet
        (the table's columns are :class:`Piece`'s fields, after the block's
        NID; binary values as ``bytearray``, as psycopg2 sends them as bytea)."""
        rows = sorted(
            (
                block_nid,
                *(bytearray(v) if isinstance(v, bytes) else v for v in attr.astuple(p)),
            )
            for block_nid, cut in pieces
            for p in cut
        )
        if rows:
            self.big_blocks_seen = True
            insert_new_txn(
                txn,
                "nidstate_block_pieces",
                ("block_nid", *(f.name for f in attr.fields(Piece))),
                "block_nid, piece",
                rows,
            )

    def fill_key_ranges_txn(self, txn: LoggingTransaction, after: int, limit: int) -> int | None:
        """Give up to ``limit`` blocks written before schema 5 (``first_key``
        NULL), after block NID ``after``, their key range; returns the last
        block NID looked at, None when there was none."""
        txn.execute(
            "SELECT block_nid, entries FROM nidstate_blocks"
            " WHERE block_nid > ? AND first_key IS NULL ORDER BY block_nid LIMIT ?",
            (after, limit),
        )
        rows = txn.fetchall()
        if not rows:
            return None
        txn.execute_batch(
            "UPDATE nidstate_blocks SET first_key = ?, last_key = ? WHERE block_nid = ?",
            [(*_key_range_columns(algebra.unpack_block(data)), nid) for nid, data in rows],
        )
        return rows[-1][0]

    def fill_pieces_txn(self, txn: LoggingTransaction, after: int, limit: int) -> int | None:
        """Count the pieces of up to ``limit`` blocks written before schema 8
        (``pieces`` NULL), after block NID ``after``, writing those of the
        big ones; returns the last block NID looked at, None when there was
        none. A block whose entries do not match its hash gets none: read
        whole, it is reported by every read, and no piece hash vouches for
        what it holds."""
        txn.execute(
            "SELECT block_nid, entries, content_hash FROM nidstate_blocks"
            " WHERE block_nid > ? AND pieces IS NULL ORDER BY block_nid LIMIT ?",
            (after, limit),
        )
        rows = txn.fetchall()
        if not rows:
            return None
        cut: list[tuple[int, list[Piece]]] = []
        for nid, data, digest in rows:
            try:
                block = algebra.unpack_block_checked(data, digest)
            except algebra.AlgebraError:
                cut.append((nid, []))
            else:
                cut.append((nid, cut_pieces(block, bytes(data))))
        self._store_pieces_txn(txn, cut)
        txn.execute_batch(
            "UPDATE nidstate_blocks SET pieces = ? WHERE block_nid = ?",
            [(len(pieces), nid) for nid, pieces in cut],
        )
        return rows[-1][0]

    def _store_snapshots_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        block_lists: Sequence[tuple[int, tuple[int, ...]]],
    ) -> list[int]:
        """Insert-or-select ``(room_nid, ordered block list)`` snapshots; their NIDs in order."""
        for _, block_nids in block_lists:
            if len(block_nids) > algebra.MAX_BLOCKS:
                raise algebra.AlgebraError(f"snapshot of {len(block_nids)} blocks")
        nids = self._insert_or_select_txn(
            txn,
            "nidstate_snapshots",
            "snapshot_nid",
            ("block_nids",),
            [
                (room_nid, algebra.snapshot_hash(b), (bytearray(algebra.pack_nids(b)),))
                for room_nid, b in block_lists
            ],
        )
        learnt.snapshots.update(zip(nids, (b for _, b in block_lists)))
        return nids

    def _insert_or_select_txn(
        self,
        txn: LoggingTransaction,
        table: str,
        nid_column: str,
        columns: tuple[str, ...],
        rows: list[tuple[int, bytes, tuple]],
    ) -> list[int]:
        """Rows ``(room_nid, content hash, values)`` deduplicated per room by
        content hash: insert those not there (in a fixed order, so concurrent
        writers lock alike), then read every one's NID; returns them in the
        order of ``rows``. Two statements (per 500 rows) whatever the rooms."""
        insert_new_txn(
            txn,
            table,
            ("room_nid", "content_hash", *columns),
            "room_nid, content_hash",
            [
                (room_nid, bytearray(digest), *values)
                for room_nid, digest, values in sorted(rows, key=lambda r: (r[0], r[1]))
            ],
        )
        found = self._select_by_room_txn(
            txn,
            f"SELECT room_nid, content_hash, {nid_column} FROM {table} WHERE",
            "content_hash",
            ((room_nid, digest) for room_nid, digest, _ in rows),
        )
        by_key = {(room_nid, bytes(digest)): nid for room_nid, digest, nid in found}
        return [by_key[(room_nid, digest)] for room_nid, digest, _ in rows]

    def _build_groups_txn(
        self,
        txn: LoggingTransaction,
        learnt: TxnLearnt,
        steps: Sequence[tuple[int, GroupStep]],
        stats: WriteCounters,
    ) -> None:
        """Give each ``(room_nid, step)``'s state group a snapshot (parents before
        children), in a fixed number of statements whatever the number of rooms."""
        if not steps:
            return
        known = self.known_groups_txn(
            txn,
            {s.group for _, s in steps}
            | {p for _, s in steps for p in (s.prev_group, s.base_group) if p},
            learnt,
        )
        todo = [(room_nid, s) for room_nid, s in steps if s.group not in known]
        if not todo:
            return
        if any(s.needs_full_state for _, s in todo):
            raise ValueError("a step still needs its full state read")
        convert = self._intern_state_map_txn(
            txn,
            learnt,
            [
                (room_nid, s.delta if s.delta is not None else s.full_state)  # type: ignore[misc]
                for room_nid, s in todo
            ],
        )
        # The parents' (and bases') block lists not cached, in one read.
        self._snapshots_txn(
            txn,
            learnt,
            {known[p] for _, s in todo for p in (s.prev_group, s.base_group) if p in known},
        )
        # Plan every snapshot first, in Python: blocks new in this batch get a
        # temporary (negative) NID, so that a child step can extend a parent
        # planned just before it. Then three statements write them all: the
        # blocks, the snapshots, the groups' mapping (not three per group).
        new_blocks: dict[tuple[int, bytes], Block] = {}  # (room, content hash) -> block
        temporary: dict[tuple[int, bytes], int] = {}  # (room, content hash) -> temporary NID
        block_of_temporary: dict[int, Block] = {}
        lists: dict[int, tuple[int, ...]] = {}  # group -> block list (temporary NIDs too)
        room_of: dict[int, int] = {}  # group -> room NID

        def block_nid(room_nid: int, block: Block) -> int:
            key = (room_nid, algebra.block_hash(block))
            if key not in temporary:
                temporary[key] = -(len(temporary) + 1)
                new_blocks[key] = block
                block_of_temporary[temporary[key]] = block
            return temporary[key]

        def load(nids: Sequence[int]) -> dict[int, Block]:
            loaded = self._blocks_txn(txn, learnt, [n for n in nids if n > 0])
            loaded.update((n, block_of_temporary[n]) for n in nids if n < 0)
            return loaded

        def blocks_of(group: int | None) -> tuple[int, ...] | None:
            """The block list of a group built earlier in this call or before."""
            if group is None:
                return None
            if group in lists:
                return lists[group]
            if group not in known:
                return None
            return self._snapshots_txn(txn, learnt, [known[group]])[known[group]]

        def blocks_in_order(nids: tuple[int, ...]) -> list[Block]:
            loaded = load(nids)
            return [loaded[b] for b in nids]

        for room_nid, step in todo:
            base_blocks: tuple[int, ...] | None = ()
            if step.full_state is not None:
                state = convert(step.full_state)
                base_blocks = blocks_of(step.base_group)
                if base_blocks is None:
                    plan = algebra.full(state)
                else:
                    plan = algebra.rebase(base_blocks, blocks_in_order(base_blocks), state)
                    if not plan.compacted:
                        stats.full_states_rebased += 1
            else:
                assert step.prev_group is not None and step.delta is not None
                base_blocks = blocks_of(step.prev_group)
                assert base_blocks is not None, "a delta step before its parent"
                change = algebra.make_block(
                    (t, s, e) for (t, s), e in convert(step.delta).items()
                )
                plan = algebra.extend(
                    base_blocks, change, functools.partial(blocks_in_order, base_blocks)
                )
            if plan.compacted and step.full_state is None:
                stats.compactions += 1  # a delta on a parent at the 64-block limit
            elif not plan.compacted and len(plan.base) < len(base_blocks or ()):
                stats.tail_merges += 1  # at the limit, its last blocks merged instead
            lists[step.group] = tuple(plan.base) + tuple(
                block_nid(room_nid, b) for b in plan.blocks
            )
            room_of[step.group] = room_nid

        real: dict[int, int] = {}
        if new_blocks:
            nids = self._store_blocks_txn(
                txn, learnt, [(room_nid, block) for (room_nid, _), block in new_blocks.items()]
            )
            real = {temporary[key]: nid for key, nid in zip(new_blocks, nids)}
        groups = list(lists)
        snapshot_nids = self._store_snapshots_txn(
            txn,
            learnt,
            [(room_of[g], tuple(real.get(n, n) for n in lists[g])) for g in groups],
        )
        insert_new_txn(
            txn, "nidstate_state_groups", ("state_group", "snapshot_nid"), "state_group",
            list(zip(groups, snapshot_nids)),
        )
        for group, snapshot_nid in zip(groups, snapshot_nids):
            learnt.groups[group] = snapshot_nid
        stats.snapshots_built += len(groups)

    def mirror_events_txn(
        self,
        txn: LoggingTransaction,
        scope: WriteScope,
        room_id: str,
        rows: list[EventRow],
        steps: list[GroupStep],
        stats: WriteCounters,
    ) -> None:
        """Build the snapshots of ``rows``' state groups, in ``txn``.

        Nothing is written per event: the state at an event is the snapshot of
        the group Synapse maps it to in ``event_to_state_groups``, which the
        lookups join. An event whose group the mirror has no snapshot for (and
        no step to build one) is counted as unprepared; its lookups fall back
        to Synapse until the migration builds the group. The events' snapshots
        go into the event -> snapshot cache once ``txn`` commits, where the
        scope publishes (the live mirror's: new events are looked up soon; not
        the migration's).
        """
        self.mirror_rooms_txn(txn, scope, {room_id: (rows, steps)}, stats)

    def mirror_rooms_txn(
        self,
        txn: LoggingTransaction,
        scope: WriteScope,
        rooms: Mapping[str, tuple[list[EventRow], list[GroupStep]]],
        stats: WriteCounters,
    ) -> None:
        """:meth:`mirror_events_txn` for several rooms at once (the migration's
        batch): the same rows, in a number of statements that does not grow
        with the number of rooms."""
        learnt = scope.begin(txn, self)
        room_nids = self._intern_strings_txn(txn, learnt, ROOMS, rooms)
        self._lock_rooms_txn(txn, [room_nids[r] for r, (_, steps) in rooms.items() if steps])
        self._build_groups_txn(
            txn,
            learnt,
            [(room_nids[r], step) for r, (_, steps) in rooms.items() for step in steps],
            stats,
        )
        groups = self.known_groups_txn(
            txn,
            {row.state_group for rows, _ in rooms.values() for row in rows if row.state_group},
            learnt,
        )
        for rows, _ in rooms.values():
            for row in rows:
                snapshot_nid = groups.get(row.state_group) if row.state_group else None
                if row.state_group is not None and snapshot_nid is None:
                    stats.unprepared += 1
                if snapshot_nid is not None:
                    stats.events_mirrored += 1
                    learnt.event_snapshots[row.event_id] = snapshot_nid
